"""An index is trusted by what made it: index.json records the embeddings' digest, the
encoder and each file's size and sha256; search checks them and re-running index rebuilds
what does not match. Bad search input is one line, flags that do nothing are said."""
from __future__ import annotations

import json
import shutil

import numpy as np

from retrieval.index import resolve_embeddings_path
from shard_tools.cli import error_line
from tests.retrieval.helpers import run_cli, unit_rows
from tests.retrieval.test_index_search import brute_force, write_embeddings


def cli(*args) -> tuple[int, list[str], str]:
    """(exit code, stderr lines other than INFO logging, stdout)."""
    proc = run_cli(*args, "--no-progress")
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("INFO")]
    return proc.returncode, lines, proc.stdout


def index(emb, idx, *more) -> tuple[int, list[str], str]:
    return cli("index", "--embeddings", emb, "--output", idx, *more)


def search_ids(idx, qemb, out, k=5, *more) -> tuple[int, list[str], list[list[int]]]:
    code, err, _ = cli("search", "--index", idx, "--queries", qemb, "-k", k, "--output", out,
                       *more)
    ids = [json.loads(ln)["ids"] for ln in out.read_text().splitlines()] if code == 0 else []
    return code, err, ids


def set_encoder(emb, encoder: dict) -> None:
    """What embed records for the encoder that made a folder (embeddings.json "encoder")."""
    path = emb / "embeddings.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"encoder": encoder}))


def test_index_rerun_after_the_embeddings_were_replaced_rebuilds_from_the_new_ones(tmp_path):
    a, b, q = unit_rows(60, 8, 1), unit_rows(60, 8, 2), unit_rows(6, 8, 3)
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    qemb = write_embeddings(tmp_path / "q", q, 6)
    write_embeddings(emb, a, 30)
    assert index(emb, idx, "--num-shards", "2", "--shard", "0")[0] == 0
    shutil.rmtree(emb)
    write_embeddings(emb, b, 30)                       # another model's rows, same count
    code, err, out = index(emb, idx, "--num-shards", "2", "--shard", "1")
    assert code == 0 and any("built from other embeddings" in ln and "rebuilding" in ln
                             for ln in err), err
    assert "built [1]" in out and "waits for shards [0]" in out, out
    code, _, out = index(emb, idx, "--num-shards", "2", "--shard", "0")
    assert code == 0 and "index complete" in out
    code, err, ids = search_ids(idx, qemb, tmp_path / "r.jsonl")
    assert code == 0, err
    assert ids == brute_force(b, q, 5)[1].tolist()


def test_rows_replaced_behind_embeddings_json_are_refused_by_search_and_rebuilt_by_index(
        tmp_path):
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    write_embeddings(emb, unit_rows(60, 8, 1), 30)
    q = unit_rows(4, 8, 3)
    qemb = write_embeddings(tmp_path / "q", q, 4)
    assert index(emb, idx, "--num-shards", "2")[0] == 0
    other = unit_rows(60, 8, 2)
    np.save(emb / "images-000000.npy", other[:30])     # same shape, embeddings.json kept
    code, err, _ = search_ids(idx, qemb, tmp_path / "r.jsonl")
    assert code == 2 and err[-1].startswith(f"error: {idx / 'index.json'}: the embeddings in "
                                            f"{emb} are not those the index was built from"), err
    assert any(ln.startswith("WARNING") and str(emb / "images-000000.npy") in ln
               for ln in err), err
    code, err, out = index(emb, idx, "--num-shards", "2")
    assert code == 0 and any("built from other embeddings" in ln for ln in err), err
    assert "built [0, 1]" in out and "kept" not in out, out
    code, err, ids = search_ids(idx, qemb, tmp_path / "r.jsonl")
    rows = np.concatenate([other[:30], unit_rows(60, 8, 1)[30:]])
    assert code == 0 and ids == brute_force(rows, q, 5)[1].tolist(), err


def test_search_refuses_an_index_whose_embeddings_were_replaced_by_fewer_rows(tmp_path):
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    write_embeddings(emb, unit_rows(60, 8, 1), 30)
    qemb = write_embeddings(tmp_path / "q", unit_rows(4, 8, 3), 4)
    assert index(emb, idx, "--num-shards", "2")[0] == 0
    shutil.rmtree(emb)
    write_embeddings(emb, unit_rows(20, 8, 1), 10)
    code, err, _ = search_ids(idx, qemb, tmp_path / "r.jsonl")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {idx / 'index.json'}: the embeddings in {emb} are not "
                             "those the index was built from") and "20 rows" in err[0], err


def test_truncated_shard_is_refused_by_search_and_rebuilt_by_index(tmp_path):
    db, q = unit_rows(90, 8, 4), unit_rows(5, 8, 5)
    emb = write_embeddings(tmp_path / "emb", db, 30)
    qemb = write_embeddings(tmp_path / "q", q, 5)
    idx = tmp_path / "idx"
    assert index(emb, idx, "--num-shards", "3")[0] == 0
    shard = idx / "shard-001.index"
    shard.write_bytes(shard.read_bytes()[:-40])
    code, err, _ = search_ids(idx, qemb, tmp_path / "r.jsonl")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {shard}: ") \
        and "truncated" in err[0], err
    code, err, out = index(emb, idx, "--num-shards", "3")
    assert code == 0 and "built [1]; repaired [1]; kept [0, 2], already built" in out, out
    assert any("rebuilding it" in ln for ln in err), err
    code, err, ids = search_ids(idx, qemb, tmp_path / "r.jsonl")
    assert code == 0 and ids == brute_force(db, q, 5)[1].tolist(), err


def test_moved_index_folder_finds_its_embeddings_and_names_index_json_when_not(tmp_path):
    db, q = unit_rows(40, 8, 6), unit_rows(3, 8, 7)
    write_embeddings(tmp_path / "a" / "emb", db, 20)
    qemb = write_embeddings(tmp_path / "q", q, 3)
    assert index(tmp_path / "a" / "emb", tmp_path / "a" / "idx")[0] == 0
    meta = json.loads((tmp_path / "a" / "idx" / "index.json").read_text())
    assert meta["embeddings"] == "../emb"
    (tmp_path / "a").rename(tmp_path / "b")
    idx = tmp_path / "b" / "idx"
    code, err, ids = search_ids(idx, qemb, tmp_path / "r.jsonl", 4)
    assert code == 0 and ids == brute_force(db, q, 4)[1].tolist(), err
    shutil.rmtree(tmp_path / "b" / "emb")
    code, err, _ = search_ids(idx, qemb, tmp_path / "r.jsonl")
    assert code == 2 and err == [f"error: embeddings folder not found: {tmp_path / 'b' / 'emb'} "
                                 f"(the path '../emb' comes from {idx / 'index.json'})"], err
    # index.json files from before store absolute paths: still used as they are
    assert resolve_embeddings_path("/data/emb", "/x/idx") == "/data/emb"


def test_search_refuses_queries_from_another_encoder_unless_allowed(tmp_path):
    emb = write_embeddings(tmp_path / "emb", unit_rows(40, 8, 1), 20)
    qemb = write_embeddings(tmp_path / "q", unit_rows(3, 8, 2), 3)
    set_encoder(emb, {"path": "/runs/x/init", "weights_sha256": "a" * 64})
    set_encoder(qemb, {"path": "/runs/x/final", "weights_sha256": "b" * 64})
    idx = tmp_path / "idx"
    assert index(emb, idx)[0] == 0
    assert json.loads((idx / "index.json").read_text())["encoder"]["weights_sha256"] == "a" * 64
    code, err, _ = search_ids(idx, qemb, tmp_path / "r.jsonl")
    assert code == 2 and len(err) == 1, err
    assert "/runs/x/init (weights aaaaaaaaaaaa)" in err[0] \
        and "/runs/x/final (weights bbbbbbbbbbbb)" in err[0] \
        and "--allow-mixed-encoders" in err[0], err
    code, err, ids = search_ids(idx, qemb, tmp_path / "r.jsonl", 5, "--allow-mixed-encoders")
    assert code == 0 and len(ids) == 3 and any("different encoders" in ln for ln in err), err
    set_encoder(qemb, {"path": "/elsewhere/copy", "weights_sha256": "a" * 64})  # same weights
    assert search_ids(idx, qemb, tmp_path / "r.jsonl")[0] == 0


def test_bad_search_input_is_one_line_naming_what(tmp_path):
    emb = write_embeddings(tmp_path / "emb", unit_rows(40, 8, 1), 20)
    q = unit_rows(8, 8, 2)
    q[[1, 6]] = np.nan
    q[3, 0] = np.inf
    qemb = write_embeddings(tmp_path / "q", q, 8)
    idx = tmp_path / "idx"
    assert index(emb, idx)[0] == 0
    assert search_ids(idx, qemb, tmp_path / "r.jsonl")[:2] == (
        2, [f"error: {qemb}: query rows 1, 3, 6 (3 of 8) hold NaN or Inf values"])
    good = write_embeddings(tmp_path / "good", unit_rows(2, 8, 3), 2)
    meta = idx / "index.json"
    text = meta.read_text()
    meta.write_text(text[:-5])
    code, err, _ = search_ids(idx, good, tmp_path / "r.jsonl")
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {meta} is not valid JSON")
    # an index.json from before files were recorded: FAISS reads the file and its message
    # is one sentence, without the C++ signature and source location
    legacy = {k: v for k, v in json.loads(text).items() if k != "files"}
    meta.write_text(json.dumps(legacy))
    (idx / "shard-000.index").write_bytes(b"abcd" * 8)
    code, err, _ = search_ids(idx, good, tmp_path / "r.jsonl")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot read index {idx / 'shard-000.index'}: ") \
        and "not recognized" in err[0] and "Error in" not in err[0] and ".cpp" not in err[0]


def test_ivf0_is_refused_before_any_work(tmp_path):
    emb = write_embeddings(tmp_path / "emb", unit_rows(40, 8, 1), 20)
    code, err, _ = index(emb, tmp_path / "idx", "--factory", "IVF0,Flat")
    assert (code, err) == (2, ["error: bad FAISS factory string 'IVF0,Flat': an IVF index "
                               "needs at least 1 list"])
    assert not (tmp_path / "idx").exists()


def test_flags_that_do_nothing_are_said(tmp_path):
    emb = write_embeddings(tmp_path / "emb", unit_rows(40, 8, 1), 20)
    qemb = write_embeddings(tmp_path / "q", unit_rows(3, 8, 2), 3)
    idx = tmp_path / "idx"
    code, _, out = index(emb, idx, "--num-shards", "2")
    assert code == 0 and "(built [0, 1])" in out, out
    code, _, out = index(emb, idx, "--num-shards", "2")
    assert code == 0 and "(built none; kept [0, 1], already built)" in out, out
    code, err, _ = search_ids(idx, qemb, tmp_path / "r.jsonl", 5, "--nprobe", "4")
    assert code == 0 and err == ["WARNING retrieval.search: nprobe (--nprobe) has no effect on "
                                 "a Flat index (no IVF lists): ignored"], err
    code, err, _ = index(emb, tmp_path / "ivf", "--factory", "IVF2,Flat", "--num-shards", "2",
                         "--shard", "1", "--merge")
    assert code == 2 and len(err) == 1 and "--merge" in err[0] and "--shard" in err[0], err
    code, err, _ = index(emb, idx, "--num-shards", "2", "--merge")
    assert (code, err) == (2, ["error: --merge needs an IVF index, --factory Flat is not one"])


def test_error_line_keeps_the_first_sentence_of_faiss_messages():
    cpp = ("Error in void faiss::Clustering::train_encoded(faiss::idx_t, const uint8_t*) at "
           "/project/faiss/Clustering.cpp:66: Error: 'nx >= k' failed: Number of training "
           "points (10) should be at least as large as number of clusters (64)")
    assert error_line(RuntimeError(cpp)) == ("Number of training points (10) should be at "
                                             "least as large as number of clusters (64)")
    assert error_line(ValueError("plain: kept\nsecond line")) == "plain: kept"
