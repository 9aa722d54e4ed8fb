"""``python -m retrieval evaluate``: encoder + shards -> recall@K per region (cached embeddings)."""
from __future__ import annotations

import hashlib
import json
import logging
import os

from . import (CommandError, add_common, add_search_params, load_model, model_label, parse_ints,
               search_params)

HELP = "evaluate recall@K end to end: embed (cached), index, search, ground truth, per region"
EXAMPLES = """\
  # APL on the six EarthLoc test regions (database at 4 rotations, recall with and without dedupe)
  python -m retrieval evaluate --model runs/demo/train/final --database runs/demo/shards/database \\
      --queries runs/demo/shards/queries-test --protocol apl --regions earthloc-test \\
      --output runs/demo/report.json
  # chosen regions, an approximate index
  python -m retrieval evaluate --model best --database shards/db --queries shards/q \\
      --regions alps,texas --factory IVF256,Flat --nprobe 16
  # VPR (UTM 25 m), one database
  python -m retrieval evaluate --model best --database shards/sfxs-db --queries shards/sfxs-q \\
      --protocol vpr --k 1,5,10,20
  # precomputed embeddings instead of a model
  python -m retrieval evaluate --database-embeddings emb/db --query-embeddings emb/q

Embeddings are cached under --cache (default: embeddings/ beside --output) per
encoder, so a re-run only searches. Under `accelerate launch` the embedding is
split across ranks and rank 0 evaluates.
"""

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--model", metavar="ENCODER", help="saved encoder folder")
    p.add_argument("--database", metavar="SRC", help="database image shards")
    p.add_argument("--queries", metavar="SRC", help="query image shards")
    p.add_argument("--database-embeddings", metavar="EMB", help="precomputed database embeddings")
    p.add_argument("--query-embeddings", metavar="EMB", help="precomputed query embeddings")
    p.add_argument("--protocol", choices=("apl", "vpr"), default="apl",
                   help="apl: footprints intersect; vpr: within 25 m (UTM)")
    p.add_argument("--regions", metavar="LIST",
                   help="comma-separated regions, groups or name:lat,lon,query_km,db_km; "
                        "'all' for the whole set (default: earthloc-test for apl, all for vpr)")
    p.add_argument("--year", default="2021",
                   help="apl region databases use this year's tiles ('any' for all years)")
    p.add_argument("--k", default="1,5,10,20,100", help="recall cut-offs")
    p.add_argument("--factory", default="Flat", help="FAISS factory string")
    add_search_params(p)
    p.add_argument("--rotations", metavar="LIST",
                   help="database rotations (default 0,90,180,270 for apl, 0 for vpr)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--workers", type=int, default=2, help="JPEG decoding threads")
    p.add_argument("--cache", metavar="DIR", help="embedding cache folder")
    p.add_argument("--output", metavar="REPORT.json", help="write the report as JSON")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for URLs")
    add_common(p)


def split_regions(text: str) -> list[str]:
    """``alps,texas,paris:48.86,2.35,800,1500`` -> names and specs (a spec takes 4 numbers)."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    out: list[str] = []
    while tokens:
        tok = tokens.pop(0)
        if ":" in tok:
            tok = ",".join([tok] + tokens[:3])
            tokens = tokens[3:]
        out.append(tok)
    return out


def _embed_both(args, rank: int, world: int) -> tuple[str, str]:
    from shard_tools import storage

    from ..distributed import barrier
    from ..embed import embed_shards, finalize_embeddings

    if not args.database or not args.queries:
        raise CommandError("--model needs --database and --queries (image shards)")
    rotations = parse_ints(args.rotations, "--rotations") if args.rotations else \
        ([0, 90, 180, 270] if args.protocol == "apl" else [0])
    model, size, _ = load_model(args.model)
    label = model_label(args.model)
    key = hashlib.sha1(json.dumps([label, list(size), args.dtype]).encode()).hexdigest()[:12]
    cache = args.cache or os.path.join(os.path.dirname(args.output or "") or ".", "embeddings")
    opts = storage.parse_storage_options(args.storage_options)
    out = []
    for what, src, rots in (("database", args.database, rotations), ("queries", args.queries, [0])):
        folder = os.path.join(cache, key, f"{what}-{hashlib.sha1(src.encode()).hexdigest()[:8]}"
                              f"-r{'_'.join(map(str, rots))}")
        embed_shards(model, src, folder, size, rots, args.batch_size, args.dtype, rank, world,
                     label, workers=args.workers, storage_options=opts,
                     progress=not args.no_progress)
        barrier()
        if rank == 0 and not finalize_embeddings(folder):
            raise CommandError(f"embeddings in {folder} are incomplete")
        out.append(folder)
    log.info("embeddings cached in %s", os.path.join(cache, key))
    return out[0], out[1]


def run(args) -> int:
    from shard_tools import storage

    from ..distributed import init_process_group_from_env
    from ..evaluate import evaluate

    ks = parse_ints(args.k, "--k")
    if min(ks) < 1:
        raise CommandError("--k values must be >= 1")
    params = search_params(args)
    if args.model:
        if args.database_embeddings or args.query_embeddings:
            raise CommandError("give --model (with image shards) or precomputed embeddings, "
                               "not both")
    elif not (args.database_embeddings and args.query_embeddings):
        raise CommandError("give --model with --database/--queries, or --database-embeddings "
                           "with --query-embeddings")
    if args.regions is None:
        regions = ["earthloc-test"] if args.protocol == "apl" else []
    elif args.regions.strip() == "all":
        regions = []
    else:
        regions = split_regions(args.regions)
    if regions and args.protocol == "vpr":
        raise CommandError("--regions applies to apl only (vpr evaluates one database)")
    year = None if args.year in ("any", "all") else int(args.year)
    rank, world = init_process_group_from_env()
    if args.model:
        db_emb, q_emb = _embed_both(args, rank, world)
    else:
        db_emb, q_emb = args.database_embeddings, args.query_embeddings
    if rank != 0:
        return 0
    report = evaluate(db_emb, q_emb, args.protocol, regions, ks, args.factory, year=year, **params)
    print(report.table())
    if args.output:
        doc = report.to_dict() | {"database_embeddings": os.path.abspath(db_emb),
                                  "query_embeddings": os.path.abspath(q_emb),
                                  "model": os.path.abspath(args.model) if args.model else None}
        storage.write_json_atomic(args.output, doc)
        print(f"report -> {args.output}")
    return 0
