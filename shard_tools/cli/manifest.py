"""``python -m shard_tools manifest``."""
from __future__ import annotations

from .. import storage
from ..manifest import merge_manifest

HELP = "merge per-shard stats into manifest.json once every shard is complete"
EXAMPLES = """\
  python -m shard_tools manifest shards/database
  # after a SLURM array (any task may run it; the last one completes it)
  python -m shard_tools manifest s3://bucket/earthloc/places
"""


def add_arguments(p) -> None:
    p.add_argument("output", metavar="DST", help="shard set folder or URL")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options (JSON)")


def run(args) -> int:
    res = merge_manifest(args.output, storage.parse_storage_options(args.storage_options))
    if not res.complete:
        shown = ", ".join(res.missing[:5]) + (" ..." if len(res.missing) > 5 else "")
        print(f"manifest incomplete: {len(res.missing)} shard(s) still missing ({shown})")
        return 1
    t = res.manifest["totals"]
    print(f"manifest: {t['shards']} shards, {t['samples']} samples, {t['images']} images, "
          f"{t['bytes'] / 1e6:.1f} MB, {t['rejects']} rejected")
    return 0
