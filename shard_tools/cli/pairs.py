"""``pairs``: mine query-tile pairs by footprint IoU (EarthLoc2's query data)."""
from __future__ import annotations

import json
import logging

from .. import storage
from ..formats import parse_earthloc_name
from ..ground_truth import mine_pairs
from ..regions import outside_regions, resolve_regions
from ..sources import read_records
from .args import ExtendFlat, region_list

log = logging.getLogger(__name__)

HELP = "mine query-database pairs whose footprint IoU exceeds a threshold"
EXAMPLES = """\
  # EarthLoc2's training pairs (IoU > 0.5), test-region queries excluded
  python -m shard_tools pairs --database data/database --queries data/queries \\
      --min-iou 0.5 --exclude-regions earthloc-test --output pairs_iou050.json
  # names only: .txt lists of EarthLoc file names work, no image is opened
  python -m shard_tools pairs --database database_candidates.txt \\
      --queries queries_outside_test_regions.txt --min-iou 0.25 --output pairs_iou025.json
  # exclude a region of your own too (comma-separated; a spec is name:lat,lon,query_km,db_km)
  python -m shard_tools pairs --database db.txt --queries q.txt --min-iou 0.5 \\
      --exclude-regions earthloc-test,myval:48.8,2.3,800,1500 --output pairs.json

The output maps each database path (as listed in SRC) to the sorted names of the
queries whose IoU with it is strictly above --min-iou. IoU is computed on the
equal-area projection (x = lon in radians, y = sin lat).
"""


def add_arguments(p) -> None:
    p.add_argument("--database", required=True, metavar="SRC",
                   help="database images (EarthLoc names): folder, .txt list or URL")
    p.add_argument("--queries", required=True, metavar="SRC",
                   help="query images (EarthLoc names): folder, .txt list or URL")
    p.add_argument("--min-iou", type=float, default=0.5,
                   help="keep pairs with IoU strictly above this (default 0.5)")
    p.add_argument("--output", required=True, metavar="PAIRS.json",
                   help="output JSON path or URL")
    p.add_argument("--exclude-regions", type=region_list, nargs="+", action=ExtendFlat,
                   default=[], metavar="R,R",
                   help="drop queries whose footprint centre lies within a region's query "
                        "radius: comma-separated names (alps, ..., earthloc-test) or "
                        "name:lat,lon,query_km,db_km specs")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for URLs")


def run(args) -> int:
    if not 0.0 <= args.min_iou < 1.0:
        raise ValueError(f"--min-iou must be in [0, 1), got {args.min_iou}")
    opts = storage.parse_storage_options(args.storage_options)
    regions = resolve_regions(args.exclude_regions)
    storage.check_output_file(args.output, opts)  # before the work, not after it
    db = read_records(args.database, parse_earthloc_name, "database", opts)
    queries = read_records(args.queries, parse_earthloc_name, "queries", opts)
    if regions:
        keep = outside_regions(queries, regions, by="centroid")
        log.info("%d of %d queries lie outside %s", keep.sum(), len(queries),
                 ", ".join(r.name for r in regions))
        queries = [q for q, k in zip(queries, keep) if k]
    pairs = mine_pairs(db, queries, args.min_iou, progress=True) if queries else {}
    data = (json.dumps(pairs, indent=0) + "\n").encode()
    storage.write_bytes_atomic(args.output, data, opts)
    n_pairs = sum(len(v) for v in pairs.values())
    n_q = len({q for v in pairs.values() for q in v})
    print(f"{len(pairs)} database images, {n_pairs} pairs, {n_q} queries "
          f"(IoU > {args.min_iou:g}) -> {args.output}")
    return 0
