"""Sharded FAISS indexes: merge order, sharded == flat, IVF/PQ/HNSW, on-disk merge, dedupe."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from conftest import PYTHON, run_env
from retrieval import Embeddings, ShardedIndex, build_index, dedupe, merge_ondisk, merge_topk, search
from retrieval.search import SearchResult
from tests.retrieval.helpers import unit_rows


def brute_force(db: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: scores by matmul, larger first, ties by smaller id."""
    s = q @ db.T
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), s.shape), -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def write_embeddings(root, vectors, per_shard, records=None, rotations=(0,)):
    """An embeddings folder written as ``embed_shards`` writes it (small helper for tests)."""
    from retrieval.embed import PARAMS, finalize_embeddings, write_shard_embeddings
    from shard_tools import storage

    root.mkdir(parents=True, exist_ok=True)
    names = []
    for a in range(0, len(vectors), per_shard):
        name = f"images-{a // per_shard:06d}"
        recs = records[a:a + per_shard] if records else [
            {"key": f"k{i}", "rotation": 0, "image": i - a} for i in range(a, a + per_shard)]
        write_shard_embeddings(str(root), name, vectors[a:a + per_shard], recs)
        names.append(name)
    storage.write_json_atomic(str(root / PARAMS), {
        "format_version": 1, "model": "test", "dtype": "float32", "rotations": list(rotations),
        "image_size": [32, 32], "shards": names, "sources": names})
    assert finalize_embeddings(str(root))
    return root


def test_merge_topk_larger_is_better_ties_by_id_invalid_last():
    s1, i1 = np.array([[0.9, 0.5, 0.1]]), np.array([[7, 3, 1]])
    s2, i2 = np.array([[0.5, 0.95, -1.0]]), np.array([[2, 9, -1]])
    s, i = merge_topk([s1, s2], [i1, i2], 5)
    assert i.tolist() == [[9, 7, 2, 3, 1]]          # 0.5 tie: id 2 before id 3
    assert np.allclose(s, [[0.95, 0.9, 0.5, 0.5, 0.1]])
    s, i = merge_topk([np.array([[0.3]])], [np.array([[-1]])], 2)
    assert i.tolist() == [[-1, -1]] and np.isneginf(s).all()


@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_sharded_flat_equals_brute_force(num_shards):
    db, q = unit_rows(2000, 24, 1), unit_rows(40, 24, 2)
    index = build_index(db, None, "Flat", num_shards, progress=False)
    assert len(index.shards) == num_shards and index.ntotal == 2000
    res = search(index, q, 25)
    ref_s, ref_i = brute_force(db, q, 25)
    assert np.array_equal(res.ids, ref_i)
    assert np.allclose(res.scores, ref_s, atol=1e-5)
    assert (np.diff(res.scores, axis=1) <= 1e-7).all()   # inner product: descending


@pytest.mark.parametrize("factory", ["IVF8,Flat", "IVF8,PQ4x4", "HNSW16"])
def test_approximate_indexes_shard_consistently(factory):
    """Sharding must not change results: S shards == one index for the same trained state."""
    db, q = unit_rows(3000, 16, 3), unit_rows(30, 16, 4)
    one = build_index(db, None, factory, 1, progress=False)
    four = build_index(db, None, factory, 4, progress=False)
    a, b = search(one, q, 10, nprobe=8), search(four, q, 10, nprobe=8)
    if factory.startswith("IVF"):       # same training, exhaustive probing: identical
        assert np.array_equal(a.ids, b.ids)
        if factory.endswith("Flat"):
            assert np.array_equal(a.ids, brute_force(db, q, 10)[1])
    else:                                # graphs differ per shard; still near-exact here
        ref = brute_force(db, q, 10)[1]
        assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(b.ids, ref)]) > 0.9


def test_on_disk_folder_shards_by_separate_processes_and_merge(tmp_path):
    db, q = unit_rows(1500, 16, 5), unit_rows(20, 16, 6)
    emb = write_embeddings(tmp_path / "emb", db, 500)
    idx = tmp_path / "idx"
    args = ["--embeddings", emb, "--output", idx, "--factory", "IVF8,Flat", "--num-shards", "3",
            "--no-progress"]
    # two array tasks at once (shards 0, 2 and shard 1): training happens once, under a lock
    env = [dict(run_env(), SLURM_ARRAY_TASK_ID=str(i), SLURM_ARRAY_TASK_COUNT="2")
           for i in range(2)]
    procs = [subprocess.Popen([PYTHON, "-m", "retrieval", "index", *map(str, args)], env=env[i],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    meta = json.loads((idx / "index.json").read_text())
    assert meta["metric"] == "inner_product" and meta["dim"] == 16
    assert [(s["start"], s["stop"]) for s in meta["shards"]] == [(0, 500), (500, 1000),
                                                               (1000, 1500)]
    assert sum("training IVF8,Flat" in err for _, err in outs) == 1
    index = ShardedIndex.load(str(idx))
    ref = brute_force(db, q, 10)[1]
    assert np.array_equal(search(index, q, 10, nprobe=8).ids, ref)   # global ids
    merge_ondisk(str(idx))
    merged = ShardedIndex.load(str(idx))
    assert len(merged.shards) == 1 and merged.ntotal == 1500
    assert np.array_equal(search(merged, q, 10, nprobe=8).ids, ref)


def test_dimension_mismatch_and_bad_factory_are_errors():
    index = build_index(unit_rows(50, 8), None, "Flat", progress=False)
    with pytest.raises(ValueError, match="dimension mismatch"):
        search(index, unit_rows(3, 9), 5)
    with pytest.raises(ValueError, match="bad FAISS factory"):
        build_index(unit_rows(50, 8), None, "NoSuchIndex", progress=False)


def test_cli_untrainable_index_and_unusable_outputs_are_one_line(tmp_path):
    emb = write_embeddings(tmp_path / "emb", unit_rows(60, 8, 3), 30)
    qemb = write_embeddings(tmp_path / "q", unit_rows(4, 8, 4), 4)
    idx = tmp_path / "idx"

    def cli(*args):
        proc = subprocess.run([PYTHON, "-m", "retrieval", *map(str, args), "--no-progress"],
                              env=run_env(), capture_output=True, text=True)
        lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("INFO")]
        return proc.returncode, lines

    # more IVF lists than rows: FAISS's error as one line, and the folder stays reusable
    code, err = cli("index", "--embeddings", emb, "--output", idx, "--factory", "IVF64,Flat")
    assert code == 2 and len(err) == 1 and err[0].startswith(
        "error: cannot train IVF64,Flat on 60 rows:") and "(60)" in err[0], err
    assert cli("index", "--embeddings", emb, "--output", idx, "--factory", "IVF4,Flat")[0] == 0
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    search_args = ("search", "--index", idx, "--queries", qemb, "-k", "3", "--output")
    assert cli(*search_args, tmp_path / "folder") == (
        2, [f"error: {tmp_path / 'folder'}: is a folder, not a file to write"])
    assert cli(*search_args, tmp_path / "file" / "r.jsonl") == (
        2, [f"error: {tmp_path / 'file'}: a file is in the way of this folder"])
    assert cli("index", "--embeddings", emb, "--output", tmp_path / "file" / "idx") == (
        2, [f"error: {tmp_path / 'file'}: a file is in the way of this folder"])
    assert cli(*search_args, tmp_path / "r.jsonl", "--batch-size", "0") == (
        2, ["error: -k and --batch-size must be >= 1, got 3 and 0"])


def test_dedupe_keeps_best_rotation_of_each_image():
    # 3 images x 4 rotations: rows 4*i + r belong to image i
    groups = np.repeat(np.arange(3), 4)
    res = SearchResult(np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], np.float32),
                       np.array([[5, 4, 9, 0, 6, 1]]))
    out = dedupe(res, groups, 3)
    assert out.ids.tolist() == [[5, 9, 0]]          # image 1 (rows 5, 4, 6) kept once
    assert np.allclose(out.scores, [[0.9, 0.7, 0.6]])
    # with enough candidates (k x rotations) dedupe finds k distinct images
    db = unit_rows(12, 8, 7)
    index = build_index(Embeddings.from_arrays(db), None, "Flat", 2, progress=False)
    wide = search(index, unit_rows(5, 8, 8), 3 * 4)
    out = dedupe(wide, groups, 3)
    assert all(len(set(groups[r])) == 3 for r in out.ids)


def test_k_factor_sets_the_refine_depth_of_rflat_indexes(tmp_path):
    """``,RFlat`` re-ranks the top k * k_factor PQ candidates exactly: with every row a
    candidate the result is exact; at k_factor 1 the PQ order shows through."""
    db, q = unit_rows(3000, 16, 9), unit_rows(40, 16, 10)
    ref = brute_force(db, q, 10)[1]
    index = build_index(db, None, "IVF8,PQ4x4,RFlat", 2, progress=False)
    shallow = search(index, q, 10, nprobe=8, k_factor=1)
    deep = search(index, q, 10, nprobe=8, k_factor=300)
    assert np.array_equal(deep.ids, ref)
    assert not np.array_equal(shallow.ids, ref)
    assert np.array_equal(search(index, q, 10).ids, deep.ids)     # stays set until changed
    with pytest.raises(ValueError, match="k_factor"):
        search(index, q, 10, k_factor=0.5)

    emb = write_embeddings(tmp_path / "emb", db, 1000)
    qemb = write_embeddings(tmp_path / "q", q, 40)
    idx = tmp_path / "idx"
    subprocess.run([PYTHON, "-m", "retrieval", "index", "--embeddings", str(emb), "--output",
                    str(idx), "--factory", "IVF8,PQ4x4,RFlat", "--no-progress"], env=run_env(),
                   check=True, capture_output=True)
    base = [PYTHON, "-m", "retrieval", "search", "--index", str(idx), "--queries", str(qemb),
            "-k", "10", "--nprobe", "8", "--no-progress", "--output"]
    out = subprocess.run(base + [str(tmp_path / "r.jsonl"), "--k-factor", "300"], env=run_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = [json.loads(line)["ids"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert got == ref.tolist()
    bad = subprocess.run(base + [str(tmp_path / "x.jsonl"), "--k-factor", "0"], env=run_env(),
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --k-factor must be >= 1, got 0"]
