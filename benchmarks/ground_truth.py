"""Benchmark: APL positives of the 17,752 real ISS queries against a full tile grid.

The database is every z9-z11 EarthLoc tile id on the step-2 grid whose centre
lies between -60 and 60 degrees latitude (about 577k footprints, generated from
the ids). The indexed path (``ground_truth.apl_positives``: STRtree + shapely 2
predicates) runs on all queries; the baseline is a naive per-query loop that
tests one query against every tile with shapely, without an index, on a sample.
Both run on one core (shapely is single-threaded). The last line printed is one
JSON object with the timings and the speed-up.

    python benchmarks/ground_truth.py [--sample 200] [--queries PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import shapely

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shard_tools.formats import parse_earthloc_name  # noqa: E402
from shard_tools.geometry import (FootprintSet, footprints_from_records,  # noqa: E402
                                  rectangles_to_footprints, tile_grid, tiles_bounds)
from shard_tools.ground_truth import apl_positives  # noqa: E402

DEFAULT_QUERIES = ROOT.parent / "shared" / "data" / "earthloc" / "queries.txt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", default=str(DEFAULT_QUERIES), help="EarthLoc query list (.txt)")
    ap.add_argument("--sample", type=int, default=200,
                    help="queries for the naive baseline (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not os.path.exists(args.queries):
        print(json.dumps({"benchmark": "ground_truth", "skipped": f"{args.queries} not found"}))
        return 0

    names = [ln.strip() for ln in open(args.queries) if ln.strip()]
    q_fp = footprints_from_records(parse_earthloc_name(n) for n in names)

    t0 = time.perf_counter()
    zoom, row, col = tile_grid((9, 10, 11), -60.0, 60.0)
    db_fp = rectangles_to_footprints(tiles_bounds(zoom, row, col))
    db = FootprintSet(db_fp)
    _ = db.tree
    t_build = time.perf_counter() - t0
    print(f"database: {len(db_fp):,} tiles (z9-z11, |lat| <= 60), built in {t_build:.2f} s",
          file=sys.stderr)

    t0 = time.perf_counter()
    positives = apl_positives(db, q_fp, progress=True)
    t_index = time.perf_counter() - t0
    counts = np.array([len(p) for p in positives])
    qps = len(names) / t_index
    print(f"indexed: {len(names):,} queries in {t_index:.2f} s = {qps:,.0f} q/s; "
          f"positives per query: median {np.median(counts):g}, mean {counts.mean():.1f}, "
          f"{(counts == 0).sum()} without any", file=sys.stderr)

    # naive baseline: one query at a time against every tile, no index
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(len(names), size=min(args.sample, len(names)), replace=False))
    q = FootprintSet(q_fp[sample])
    tiles = db.polygons
    t0 = time.perf_counter()
    naive = [np.flatnonzero(shapely.intersects(tiles, q.polygons[i])) for i in range(q.n)]
    t_naive = time.perf_counter() - t0
    naive_qps = len(sample) / t_naive
    agree = all(np.array_equal(a, positives[s]) for a, s in zip(naive, sample))
    print(f"naive: {len(sample)} queries in {t_naive:.2f} s = {naive_qps:,.1f} q/s; "
          f"same positives as indexed: {agree}", file=sys.stderr)

    print(json.dumps({
        "benchmark": "ground_truth.apl_positives",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()},"
                   f" shapely {shapely.__version__}",
        "database_tiles": int(len(db_fp)), "queries": len(names),
        "build_s": round(t_build, 3), "indexed_s": round(t_index, 3),
        "indexed_qps": round(qps, 1), "total_s": round(t_build + t_index, 3),
        "positives_mean": round(float(counts.mean()), 2),
        "naive_queries": int(len(sample)), "naive_s": round(t_naive, 3),
        "naive_qps": round(naive_qps, 2), "speedup": round(qps / naive_qps, 1),
        "naive_agrees": bool(agree), "goal_under_30s": bool(t_build + t_index < 30.0),
    }))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
