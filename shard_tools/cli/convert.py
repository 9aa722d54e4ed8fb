"""``python -m shard_tools convert``."""
from __future__ import annotations

import logging

from .. import storage
from ..convert import ConvertConfig, convert
from ..jpeg import DEFAULT_MAX_PIXELS
from ..manifest import REJECTS
from ..sources import FORMATS
from .args import int_range

HELP = "pack images (folder, .txt list, CSV or URL) into WebDataset shards"
EXAMPLES = """\
  # EarthLoc database tiles, one sample per image, 1000 images a shard
  python -m shard_tools convert --format earthloc --kind images \\
      --input data/database --output shards/database
  # training places (a tile across its years) with EarthLoc2's mined queries, to S3
  python -m shard_tools convert --format earthloc --kind places --input data/database \\
      --queries data/queries --query-pairs pairs_iou050.json \\
      --output s3://bucket/earthloc/places --max-side 800 --workers 8
  # GSV-Cities (Dataframes/ + Images/) as place shards
  python -m shard_tools convert --format gsv-cities --kind places --input gsv_cities \\
      --output shards/gsv
  # one task of four by hand (what a SLURM array task does from SLURM_ARRAY_*)
  python -m shard_tools convert --format earthloc --kind images --input data/database \\
      --output shards/database --task-index 0 --num-tasks 4
  # SLURM array: FORMAT KIND SRC DST [convert options]; each task converts its own range
  sbatch --array=0-15 slurm/convert.sbatch earthloc images data/database shards/database

A re-run with the same arguments resumes: complete shards are kept (after checking
that each still exists with its recorded size), the rest are rebuilt. A re-run
whose input changed since plan.json was written is refused.
"""

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--format", required=True, choices=FORMATS, help="input format")
    p.add_argument("--kind", required=True, choices=("images", "places"),
                   help="images: one sample per image; places: one sample per place")
    p.add_argument("--input", required=True, metavar="SRC",
                   help="folder, .txt list of paths, .csv table (csv format), or fsspec URL")
    p.add_argument("--output", required=True, metavar="DST", help="output folder or URL")
    p.add_argument("--shard-size", type=int_range(1, name="--shard-size"), metavar="N",
                   help="samples per shard (default: 1000 images, 250 places)")
    p.add_argument("--max-side", type=int_range(16, name="--max-side"), metavar="PX",
                   help="shrink images whose longer side exceeds PX, turning EXIF-rotated "
                        "photos upright (default: copy bytes)")
    p.add_argument("--quality", type=int_range(1, 95, name="--quality"), default=90,
                   metavar="Q", help="JPEG quality when resizing, 1-95 (default 90)")
    p.add_argument("--max-pixels", type=int_range(1, name="--max-pixels"),
                   default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="reject images with more pixels than N as 'too large' "
                        f"(default {DEFAULT_MAX_PIXELS:,}, Pillow's decompression-bomb limit)")
    p.add_argument("--workers", type=int_range(1, name="--workers"), default=1, metavar="W",
                   help="writer processes")
    p.add_argument("--task-index", type=int_range(0, name="--task-index"), metavar="I",
                   help="this task's index (default: SLURM_ARRAY_TASK_ID, else 0)")
    p.add_argument("--num-tasks", type=int_range(1, name="--num-tasks"), metavar="T",
                   help="number of array tasks (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--queries", metavar="SRC", help="mined query images (places kind)")
    p.add_argument("--query-pairs", metavar="PAIRS.json",
                   help="{database path: [query names]}, e.g. from `shard_tools pairs`")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad input (exit 2) instead of skipping it")
    p.add_argument("--storage-options", metavar="JSON",
                   help='fsspec options, e.g. \'{"client_kwargs": {"endpoint_url": "..."}}\'')
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    if (args.task_index is None) != (args.num_tasks is None):
        raise ValueError("--task-index and --num-tasks go together")
    cfg = ConvertConfig(
        format=args.format, kind=args.kind, input=args.input, output=args.output,
        shard_size=args.shard_size, max_side=args.max_side, quality=args.quality,
        workers=args.workers, task_index=args.task_index, num_tasks=args.num_tasks,
        queries=args.queries, query_pairs=args.query_pairs, strict=args.strict,
        storage_options=storage.parse_storage_options(args.storage_options),
        progress=not args.no_progress, max_pixels=args.max_pixels,
    )
    res = convert(cfg)
    where = storage.join(args.output, REJECTS) if res.manifest_complete else args.output
    print(f"converted {res.images} images into {res.shards_written} shards "
          f"({res.shards_skipped} already complete), {res.rejects} rejected"
          + (f" (see {where})" if res.rejects else "")
          + ("; manifest complete" if res.manifest_complete
             else f"; manifest waits for {len(res.missing)} shards"))
    return 0
