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
