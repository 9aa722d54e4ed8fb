"""``regions``: how many queries and database images each named region selects."""
from __future__ import annotations

import json

from .. import storage
from ..formats import parse_earthloc_name
from ..regions import REGION_GROUPS, REGIONS, region_counts, resolve_regions
from ..sources import read_records
from .args import ExtendFlat, region_list

HELP = "count the queries (and database images) of EarthLoc's test regions or your own"
EXAMPLES = """\
  # the six EarthLoc test sets, the two validation sets and their union (earthloc-test)
  python -m shard_tools regions --queries data/queries.txt
  # with a database, as JSON: {region: {"queries": n, "database": m}}
  python -m shard_tools regions --queries data/queries --database data/database --json
  # chosen regions, comma-separated; one of your own as name:lat,lon,query_km,db_km
  python -m shard_tools regions --queries q.txt --regions alps,paris:48.86,2.35,800,1500

Queries are selected by nadir within query_km, database images (of --year) by
centre within db_km; distances are haversine with R = 6371 km.
"""

DEFAULT = tuple(REGIONS) + tuple(REGION_GROUPS)


def add_arguments(p) -> None:
    p.add_argument("--queries", required=True, metavar="SRC",
                   help="query images (EarthLoc names): folder, .txt list or URL")
    p.add_argument("--database", metavar="SRC", help="database images to count as well")
    p.add_argument("--regions", type=region_list, nargs="+", action=ExtendFlat, default=None,
                   metavar="R,R",
                   help="comma-separated names, groups or name:lat,lon,query_km,db_km specs "
                        f"(default: {','.join(DEFAULT)})")
    p.add_argument("--year", type=int, default=2021,
                   help="database year to count (default 2021, as EarthLoc's test sets)")
    p.add_argument("--any-year", action="store_true", help="count database images of any year")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for URLs")


def run(args) -> int:
    opts = storage.parse_storage_options(args.storage_options)
    names = list(args.regions or DEFAULT)
    resolved = {}       # every name checked before anything is read; specs as given
    for n in names:
        for r in resolve_regions([n]):
            resolved.setdefault(r.name, r)
    queries = read_records(args.queries, parse_earthloc_name, "queries", opts)
    database = (read_records(args.database, parse_earthloc_name, "database", opts)
                if args.database else None)
    counts = region_counts(queries, names, database, None if args.any_year else args.year)
    if args.json:
        print(json.dumps(counts))
        return 0
    print(f"{'region':<16} {'centre':>16} {'query_km':>9} {'db_km':>7} {'queries':>8}"
          + (f" {'database':>9}" if database is not None else ""))
    for name, c in counts.items():
        if name in REGION_GROUPS:
            centre, qkm, dkm = f"union of {len(REGION_GROUPS[name])}", "", ""
        else:
            r = resolved[name]
            centre, qkm, dkm = f"{r.lat:g}, {r.lon:g}", f"{r.query_km:g}", f"{r.db_km:g}"
        line = f"{name:<16} {centre:>16} {qkm:>9} {dkm:>7} {c['queries']:>8}"
        if database is not None:
            line += f" {c['database']:>9}"
        print(line)
    print(f"({len(queries)} queries" + (f", {len(database)} database images)"
                                         if database is not None else ")"))
    return 0
