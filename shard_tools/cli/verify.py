"""``python -m shard_tools verify``."""
from __future__ import annotations

import sys

from .. import storage
from ..verify import verify

HELP = "re-read every shard and check it against the manifest (counts, sha256, images)"
EXAMPLES = """\
  python -m shard_tools verify shards/database           # decodes every image
  python -m shard_tools verify s3://bucket/places --quick  # structure and hashes only
"""


def add_arguments(p) -> None:
    p.add_argument("output", metavar="DST", help="shard set folder or URL")
    p.add_argument("--quick", action="store_true", help="do not decode images")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options (JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    manifest, problems = verify(args.output, quick=args.quick,
                                storage_options=storage.parse_storage_options(
                                    args.storage_options),
                                progress=not args.no_progress)
    t = manifest["totals"]
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"verify: {len(problems)} problem(s) in {args.output}")
        return 1
    print(f"verify: OK, {t['shards']} shards, {t['samples']} samples, {t['images']} images")
    return 0
