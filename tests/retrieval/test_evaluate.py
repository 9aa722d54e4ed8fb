"""End-to-end evaluate on a tiny Blue Marble APL set and a tiny VPR set; errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval import Embeddings, evaluate
from shard_tools import ground_truth
from shard_tools.geometry.footprints import footprints_from_records
from shard_tools.regions import REGIONS, select_database, select_queries
from tests.retrieval.helpers import run_cli


@pytest.mark.slow
def test_apl_end_to_end_per_region_with_dedupe_and_cache(tiny_apl, encoder_dir, tmp_path):
    report_path = tmp_path / "report.json"
    args = ["evaluate", "--model", encoder_dir, "--database", tiny_apl["database"], "--queries",
            tiny_apl["queries"], "--protocol", "apl", "--regions", "earthloc-test", "--k",
            "1,5,10", "--output", report_path, "--no-progress"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout
    for name in ("alps", "texas", "toshka", "amazon", "napa", "gobi", "average", "dd R@1"):
        assert name in table
    report = json.loads(report_path.read_text())
    assert [r["name"] for r in report["regions"]] == ["alps", "texas", "toshka", "amazon",
                                                      "napa", "gobi"]
    db = Embeddings.open(report["database_embeddings"])
    q = Embeddings.open(report["query_embeddings"])
    assert db.rotations == [0, 90, 180, 270] and q.rotations == [0]
    # recompute one region independently: Flat inner product by matmul, raw rows
    alps = report["regions"][0]
    db_recs = db.image_records()
    d_mask = select_database(db_recs, REGIONS["alps"], 2021)
    q_mask = select_queries(q.records, REGIONS["alps"])
    d_idx, q_idx = np.flatnonzero(d_mask), np.flatnonzero(q_mask)
    assert alps["database"] == len(d_idx) and alps["rows"] == 4 * len(d_idx)
    pos = ground_truth.apl_positives(footprints_from_records([db_recs[i] for i in d_idx]),
                                     footprints_from_records([q.records[i] for i in q_idx]))
    rows = np.flatnonzero(np.isin(db.image_of_row, d_idx))
    scores = q.take(q_idx) @ db.take(rows).T
    ranked = np.argsort(-scores, axis=1, kind="stable")
    image_local = np.searchsorted(d_idx, db.image_of_row[rows])
    kept = [i for i, p in enumerate(pos) if len(p)]
    for k in (1, 5, 10):
        hits = [np.isin(image_local[ranked[i, :k]], pos[i]).any() for i in kept]
        assert report["regions"][0]["recall"][str(k)] == pytest.approx(100 * np.mean(hits))
    assert alps["queries"] == len(kept) and alps["dropped"] == len(pos) - len(kept)
    for r in report["regions"]:   # dedupe never hurts recall at the same K
        assert all(r["recall_dedupe"][k] >= r["recall"][k] - 1e-9 for k in r["recall"])
    avg1 = np.mean([r["recall"]["1"] for r in report["regions"]])
    assert report["average"]["1"] == pytest.approx(avg1)
    # cached: a re-run embeds nothing and gives the same report
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "embeddings").rglob("*.npy")}
    proc = run_cli(*args)
    assert proc.returncode == 0 and json.loads(report_path.read_text())["regions"] == \
        report["regions"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "embeddings").rglob("*.npy")} == stamp
    # precomputed embeddings in place of the model give the same numbers
    res = evaluate(report["database_embeddings"], report["query_embeddings"], "apl", ["alps"],
                   (1, 5, 10))
    assert res.regions[0].recall == {int(k): v for k, v in alps["recall"].items()}
    # an empty region is a one-line error
    proc = run_cli("evaluate", "--database-embeddings", report["database_embeddings"],
                   "--query-embeddings", report["query_embeddings"], "--regions",
                   "nowhere:0,-150,100,100")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: region 'nowhere' is empty")


@pytest.mark.slow
def test_vpr_end_to_end(tiny_vpr, encoder_dir, tmp_path):
    proc = run_cli("evaluate", "--model", encoder_dir, "--database", tiny_vpr["database"],
                   "--queries", tiny_vpr["queries"], "--protocol", "vpr", "--k", "1,3,5",
                   "--output", tmp_path / "r.json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    (region,) = report["regions"]
    assert region["name"] == "all" and region["database"] == 36 and region["queries"] == 12
    assert "recall_dedupe" not in region          # one rotation: nothing to dedupe
    # every query has exactly its place's 3 database images within 25 m
    db = Embeddings.open(report["database_embeddings"])
    q = Embeddings.open(report["query_embeddings"])
    pos = ground_truth.vpr_positives_from_records(db.image_records(), q.records)
    assert [len(p) for p in pos] == [3] * 12
    # recall@5 vs an independent matmul ranking
    ranked = np.argsort(-(q.all() @ db.all().T), axis=1, kind="stable")
    r5 = 100 * np.mean([np.isin(db.image_of_row[ranked[i, :5]], pos[i]).any()
                        for i in range(12)])
    assert region["recall"]["5"] == pytest.approx(r5)


def test_dimension_mismatch_is_an_error(tmp_path):
    from tests.retrieval.helpers import unit_rows

    with pytest.raises(ValueError, match="dimension mismatch"):
        evaluate(Embeddings.from_arrays(unit_rows(5, 8)), Embeddings.from_arrays(unit_rows(2, 4)),
                 "vpr")


def _embed_with(encoder_path, shards, out, rotations=(0,)) -> str:
    """Embed ``shards`` as ``embed`` does for the saved encoder at ``encoder_path``."""
    from retrieval import embed_shards
    from retrieval.provenance import encoder_identity
    from trainer.models import load_encoder

    model, size, _ = load_encoder(encoder_path)
    embed_shards(model, str(shards), str(out), size, rotations, progress=False,
                 model_name=str(encoder_path), encoder_id=encoder_identity(encoder_path))
    return str(out)


@pytest.fixture(scope="module")
def two_encoders(tmp_path_factory):
    from trainer.models import save_encoder
    from tests.retrieval.helpers import tiny_encoder

    root = tmp_path_factory.mktemp("encoders")
    for name, seed in (("init", 0), ("trained", 1)):
        save_encoder(tiny_encoder(seed), root / name)
    return root / "init", root / "trained"


def test_database_and_queries_of_two_encoders_are_refused_naming_both(tile_shards, two_encoders,
                                                                      tmp_path):
    from retrieval.provenance import file_sha256

    init, trained = two_encoders
    db = _embed_with(init, tile_shards, tmp_path / "db")
    q = _embed_with(trained, tile_shards, tmp_path / "q")
    args = ["evaluate", "--database-embeddings", db, "--query-embeddings", q, "--regions", "all",
            "--k", "1,5"]
    proc = run_cli(*args)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("error: the database and the query embeddings come from different "
                           "encoders")
    for enc in (init, trained):
        assert f"{enc} (weights {file_sha256(enc / 'model.safetensors')[:12]})" in last
    with pytest.raises(ValueError, match="different encoders"):
        evaluate(db, q, "apl", None, (1,))
    # explicitly overridden: scored
    proc = run_cli(*args, "--allow-mixed-encoders")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one encoder: scored without the flag, and the report says what it was computed from
    q_same = _embed_with(init, tile_shards, tmp_path / "q-same")
    proc = run_cli("evaluate", "--database-embeddings", db, "--query-embeddings", q_same,
                   "--regions", "all", "--k", "1,5", "--output", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["database_encoder"]["weights_sha256"] == \
        report["query_encoder"]["weights_sha256"] == file_sha256(init / "model.safetensors")
    assert report["database_digest"] == Embeddings.open(db).digest


def test_evaluate_re_embeds_database_shards_re_converted_since_cached(tile_shards, encoder_dir,
                                                                      tmp_path):
    from tests.retrieval.helpers import copy_shards, reconvert_with_other_images

    shards = copy_shards(tile_shards, tmp_path / "db")
    args = ["evaluate", "--model", encoder_dir, "--database", shards, "--queries", tile_shards,
            "--regions", "all", "--rotations", "0", "--k", "1,5", "--output",
            tmp_path / "r.json", "--no-progress"]
    assert run_cli(*args).returncode == 0
    first = json.loads((tmp_path / "r.json").read_text())
    reconvert_with_other_images(shards)              # same shard names and count
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shard images-000000 changed since it was embedded" in proc.stderr
    second = json.loads((tmp_path / "r.json").read_text())
    assert second["database_embeddings"] == first["database_embeddings"]   # the same cache
    assert second["database_digest"] != first["database_digest"]
    assert second["query_digest"] == first["query_digest"]


def test_without_output_the_cache_is_the_user_cache_folder_and_said(tiny_vpr, encoder_dir,
                                                                    tmp_path):
    from conftest import run_env

    env = run_env() | {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli("evaluate", "--model", encoder_dir, "--database", tiny_vpr["database"],
                   "--queries", tiny_vpr["queries"], "--protocol", "vpr", "--k", "1",
                   "--no-progress", env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(work.iterdir()) == []                # nothing in the current folder
    cache = tmp_path / "xdg" / "streamloc" / "embeddings"
    assert len(list(cache.glob("*/*/embeddings.json"))) == 2
    assert f"embedding cache: {cache}" in proc.stderr


def test_a_protocol_whose_field_the_records_lack_is_refused_before_embedding(tile_shards,
                                                                             encoder_dir,
                                                                             tmp_path):
    proc = run_cli("evaluate", "--model", encoder_dir, "--database", tile_shards, "--queries",
                   tile_shards, "--protocol", "vpr", "--cache", tmp_path / "cache",
                   "--no-progress")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last.startswith(f"error: protocol vpr needs a 'utm' in each record, and the first "
                           f"record of --database {tile_shards}")
    assert not (tmp_path / "cache").exists()         # refused before any image was embedded


@pytest.mark.parametrize("flags, message", [
    (["--year", "abc"], "error: --year must be a year such as 2021, or 'any', got 'abc'"),
    (["--year", "2019", "--regions", "all"], "error: --year 2019 selects the tiles of apl "
                                             "regions; the whole set"),
    (["--year", "2019", "--protocol", "vpr"], "error: --year 2019 selects the tiles of apl"),
])
def test_a_year_that_cannot_apply_is_one_line(tmp_path, flags, message):
    proc = run_cli("evaluate", "--database-embeddings", tmp_path / "db", "--query-embeddings",
                   tmp_path / "q", *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)


def _square(lat: float, lon: float, half: float = 0.5) -> list[list[float]]:
    return [[lat - half, lon - half], [lat + half, lon - half], [lat + half, lon + half],
            [lat - half, lon + half]]


def test_a_search_knob_the_index_lacks_is_said_once_not_once_per_region(caplog):
    from tests.retrieval.helpers import unit_rows

    centres = [(0.0, 0.0), (0.0, 60.0)]           # two regions far apart
    db_recs, q_recs = [], []
    for r, (lat, lon) in enumerate(centres):
        for i in range(4):
            db_recs.append({"key": f"t{r}{i}", "footprint": _square(lat + i, lon), "year": 2021,
                            "lat": lat + i, "lon": lon, "rotation": 0, "image": len(db_recs)})
        q_recs.append({"key": f"q{r}", "footprint": _square(lat, lon), "nadir": [lat, lon]})
    db = Embeddings.from_arrays(unit_rows(len(db_recs), 8), db_recs)
    q = Embeddings.from_arrays(unit_rows(len(q_recs), 8, seed=1), q_recs)
    regions = ["a:0,0,500,1000", "b:0,60,500,1000"]
    with caplog.at_level("WARNING"):
        report = evaluate(db, q, "apl", regions=regions, ks=[1], nprobe=8)
    assert [r.name for r in report.regions] == ["a", "b"]
    said = [m for m in caplog.messages if "nprobe" in m]
    assert len(said) == 1, said


@pytest.mark.slow
def test_a_failure_on_rank_0_of_two_while_scoring_is_one_line_and_both_ranks_stop(tmp_path):
    from tests.retrieval.helpers import (assert_one_error_line_and_no_traceback,
                                         launch_two_ranks, unit_rows)
    from tests.retrieval.test_index_search import write_embeddings

    db_recs = [{"key": f"t{i}", "footprint": _square(i, 0.0), "year": 2021, "lat": float(i),
                "lon": 0.0, "rotation": 0, "image": i} for i in range(8)]
    q_recs = [{"key": f"q{i}", "footprint": _square(i, 0.0), "nadir": [float(i), 0.0],
               "rotation": 0, "image": i} for i in range(2)]
    db = write_embeddings(tmp_path / "db", unit_rows(8, 8), 4, db_recs)
    q = write_embeddings(tmp_path / "q", unit_rows(2, 8, seed=1), 2, q_recs)
    # the alps hold none of these queries: rank 0 fails while scoring
    proc = launch_two_ranks("evaluate", "--database-embeddings", db, "--query-embeddings", q,
                            "--protocol", "apl", "--regions", "alps", "--output",
                            tmp_path / "r.json")
    assert_one_error_line_and_no_traceback(proc, "alps")
    assert not (tmp_path / "r.json").exists()
