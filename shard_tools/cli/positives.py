"""``positives``: ground truth for recall@K (APL footprint overlap, VPR UTM radius)."""
from __future__ import annotations

import json
import logging

import numpy as np

from .. import storage
from ..formats import parse_earthloc_name, parse_vpr_name
from ..ground_truth import (VPR_RADIUS_M, apl_positives_from_records, positives_to_lists,
                            vpr_positives_from_records)
from ..sources import read_records

log = logging.getLogger(__name__)

HELP = "ground-truth positives of each query: footprint overlap (apl) or UTM radius (vpr)"
EXAMPLES = """\
  # APL: database tiles whose footprint intersects each query footprint
  python -m shard_tools positives --protocol apl --database data/database \\
      --queries data/queries --output positives.json
  # VPR: database images within 25 m (UTM, inclusive) of each query
  python -m shard_tools positives --protocol vpr --database sf-xs/val_database.txt \\
      --queries sf-xs/val_queries.txt --output val_positives.json

The output is a JSON list with one entry per query, in input order (list order
for .txt lists, sorted names for folders): the sorted indices of its positives
in the database, in the same order.
"""


def add_arguments(p) -> None:
    p.add_argument("--protocol", required=True, choices=("apl", "vpr"),
                   help="apl: EarthLoc names, footprints intersect; vpr: VPR names, UTM radius")
    p.add_argument("--database", required=True, metavar="SRC",
                   help="database images: folder, .txt list or URL")
    p.add_argument("--queries", required=True, metavar="SRC",
                   help="query images: folder, .txt list or URL")
    p.add_argument("--radius-m", type=float, default=VPR_RADIUS_M,
                   help=f"vpr: positive radius in metres, inclusive (default {VPR_RADIUS_M:g})")
    p.add_argument("--output", required=True, metavar="POS.json", help="output JSON path or URL")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for URLs")


def run(args) -> int:
    opts = storage.parse_storage_options(args.storage_options)
    if not (args.radius_m >= 0 and np.isfinite(args.radius_m)):
        raise ValueError(f"--radius-m must be a finite number >= 0, got {args.radius_m}")
    storage.check_output_file(args.output, opts)  # before the work, not after it
    if args.protocol == "apl":
        db = read_records(args.database, parse_earthloc_name, "database", opts)
        queries = read_records(args.queries, parse_earthloc_name, "queries", opts)
        positives = apl_positives_from_records(db, queries, progress=True)
        rule = "footprints intersect"
    else:
        db = read_records(args.database, lambda n: parse_vpr_name(n, "database"), "database",
                          opts)
        queries = read_records(args.queries, lambda n: parse_vpr_name(n, "query"), "queries",
                               opts)
        positives = vpr_positives_from_records(db, queries, args.radius_m)
        rule = f"within {args.radius_m:g} m"
    lists = positives_to_lists(positives)
    storage.write_bytes_atomic(args.output, json.dumps(lists).encode(), opts)
    counts = np.array([len(p) for p in lists])
    print(f"{len(lists)} queries x {len(db)} database ({rule}): "
          f"{counts.sum()} positives, median {np.median(counts):g} per query, "
          f"{(counts == 0).sum()} queries without any -> {args.output}")
    return 0
