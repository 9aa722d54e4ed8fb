"""``python -m retrieval evaluate``: encoder + shards -> recall@K per region (cached embeddings)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

from . import (CommandError, add_common, add_search_params, load_model, model_identity,
               parse_ints, search_params)

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

Embeddings are cached under --cache (default: embeddings/ beside --output, else
$XDG_CACHE_HOME/streamloc/embeddings, i.e. ~/.cache/streamloc/embeddings) per encoder
weights, so a re-run only searches; a shard whose manifest sha256 changed is embedded
again. Precomputed embeddings of two encoders are refused (--allow-mixed-encoders to
score them anyway). Under `accelerate launch` the embedding is split across ranks and
rank 0 evaluates.
"""

log = logging.getLogger(__name__)

DEFAULT_YEAR = 2021


def add_arguments(p) -> None:
    p.add_argument("--model", metavar="ENCODER", help="saved encoder folder")
    p.add_argument("--database", metavar="SRC", help="database image shards")
    p.add_argument("--queries", metavar="SRC", help="query image shards")
    p.add_argument("--database-embeddings", metavar="EMB", help="precomputed database embeddings")
    p.add_argument("--query-embeddings", metavar="EMB", help="precomputed query embeddings")
    p.add_argument("--allow-mixed-encoders", action="store_true",
                   help="score precomputed embeddings even when they record different encoders")
    p.add_argument("--protocol", choices=("apl", "vpr"), default="apl",
                   help="apl: footprints intersect; vpr: within 25 m (UTM)")
    p.add_argument("--regions", metavar="LIST",
                   help="comma-separated regions, groups or name:lat,lon,query_km,db_km; "
                        "'all' for the whole set (default: earthloc-test for apl, all for vpr)")
    p.add_argument("--year", metavar="YEAR",
                   help=f"apl region databases use this year's tiles (default {DEFAULT_YEAR}; "
                        "'any' for all years); the whole set (--regions all, vpr) uses every year")
    p.add_argument("--k", default="1,5,10,20,100", help="recall cut-offs")
    p.add_argument("--factory", default="Flat", help="FAISS factory string")
    add_search_params(p)
    p.add_argument("--rotations", metavar="LIST",
                   help="database rotations (default 0,90,180,270 for apl, 0 for vpr)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--workers", type=int, default=2, help="JPEG decoding threads")
    p.add_argument("--cache", metavar="DIR",
                   help="embedding cache folder (default: embeddings/ beside --output, else "
                        "the user cache folder)")
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


def parse_year(text: str | None, regions: list[str]) -> int | None:
    """The year of the region databases (None: every year). A year given where no region
    selects tiles by year would be ignored: refused instead."""
    if text is not None and not regions and text not in ("any", "all"):
        raise CommandError(f"--year {text} selects the tiles of apl regions; the whole set "
                           "(--regions all, --protocol vpr) uses every year: drop --year or "
                           "name --regions")
    if text is None:
        return DEFAULT_YEAR
    if text in ("any", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        raise CommandError(f"--year must be a year such as {DEFAULT_YEAR}, or 'any', "
                           f"got {text!r}") from None


def default_cache(output: str | None) -> str:
    """Where embeddings are cached without --cache: beside the report, else the user's
    cache folder (never the current folder, which may be anything)."""
    if output:
        return os.path.join(os.path.dirname(os.path.abspath(output)), "embeddings")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "streamloc", "embeddings")


def _short_hash(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _first_record(shards: list, storage_options: Mapping[str, Any] | None) -> dict | None:
    """The record of the first sample of a listed image shard set (None when it holds none)."""
    from shard_tools.reader import iter_samples

    from ..embed import sample_record

    for shard in shards:
        for sample in iter_samples(shard.url, storage_options):
            return sample_record(sample)
    return None


def _cache_folder(cache: str, key: str, what: str, src: str, names: list[str],
                  rotations: list[int]) -> str:
    """One folder per encoder and shard set: another set of shard names is another
    folder; changed shards under the same names are re-embedded inside it."""
    tag = _short_hash([src, names])[:8]
    return os.path.join(cache, key, f"{what}-{tag}-r{'_'.join(map(str, rotations))}")


def _embed_both(args, rank: int, world: int) -> tuple[str, str]:
    from shard_tools import storage
    from shard_tools.reader import list_shards

    from ..distributed import checked_together
    from ..embed import embed_shards, finalize_embeddings
    from ..evaluate import check_protocol_record

    if not args.database or not args.queries:
        raise CommandError("--model needs --database and --queries (image shards)")
    rotations = parse_ints(args.rotations, "--rotations") if args.rotations else \
        ([0, 90, 180, 270] if args.protocol == "apl" else [0])
    opts = storage.parse_storage_options(args.storage_options)
    sets = (("database", args.database, rotations), ("queries", args.queries, [0]))
    listed = {}   # each manifest is listed once here; embed_shards reads it for its digests
    with checked_together():    # every rank checks; a failure is said once, by its rank
        for what, src, _ in sets:   # before any image is embedded
            listed[what] = list_shards(src, opts, "images", "embedding")
            check_protocol_record(args.protocol, _first_record(listed[what], opts),
                                  f"--{what} {src}")
        model, size, _ = load_model(args.model)
        identity = model_identity(args.model)
    key = _short_hash([identity["weights_sha256"], list(size), args.dtype])[:12]
    cache = args.cache or default_cache(args.output)
    if rank == 0:
        log.info("embedding cache: %s (--cache to choose another)", os.path.join(cache, key))
    out = []
    for what, src, rots in sets:
        folder = _cache_folder(cache, key, what, src, [s.url for s in listed[what]], rots)
        with checked_together():   # a bad shard on one rank stops every rank, said once
            embed_shards(model, src, folder, size, rots, args.batch_size, args.dtype, rank,
                         world, identity["path"], workers=args.workers, storage_options=opts,
                         progress=not args.no_progress, encoder_id=identity)
        with checked_together():
            if rank == 0 and not finalize_embeddings(folder):
                raise CommandError(f"embeddings in {folder} are incomplete")
        out.append(folder)
    return out[0], out[1]


def _regions(args) -> list[str]:
    if args.regions is None:
        regions = ["earthloc-test"] if args.protocol == "apl" else []
    elif args.regions.strip() == "all":
        regions = []
    else:
        regions = split_regions(args.regions)
    if regions and args.protocol == "vpr":
        raise CommandError("--regions applies to apl only (vpr evaluates one database)")
    return regions


def _check_inputs(args) -> None:
    if args.model:
        if args.database_embeddings or args.query_embeddings:
            raise CommandError("give --model (with image shards) or precomputed embeddings, "
                               "not both")
        if args.allow_mixed_encoders:
            raise CommandError("--allow-mixed-encoders applies to precomputed embeddings; "
                               "--model embeds both sets with one encoder")
    elif not (args.database_embeddings and args.query_embeddings):
        raise CommandError("give --model with --database/--queries, or --database-embeddings "
                           "with --query-embeddings")


def _provenance(db_emb: str, q_emb: str) -> dict:
    """What the report's figures were computed from (encoders, embeddings digests)."""
    from ..embed import Embeddings

    db, q = Embeddings.open(db_emb), Embeddings.open(q_emb)
    return {"database_embeddings": os.path.abspath(db_emb),
            "query_embeddings": os.path.abspath(q_emb),
            "database_digest": db.digest, "query_digest": q.digest,
            "database_encoder": db.encoder, "query_encoder": q.encoder}


def run(args) -> int:
    from shard_tools import storage

    from ..distributed import checked_together, init_process_group_from_env
    from ..environment import environment
    from ..evaluate import evaluate

    ks = parse_ints(args.k, "--k")
    if min(ks) < 1:
        raise CommandError("--k values must be >= 1")
    params = search_params(args)
    _check_inputs(args)
    regions = _regions(args)
    year = parse_year(args.year, regions)
    rank, world = init_process_group_from_env()
    if args.model:
        db_emb, q_emb = _embed_both(args, rank, world)
    else:
        db_emb, q_emb = args.database_embeddings, args.query_embeddings
    with checked_together():    # rank 0 scores; the others wait to hear it went well
        if rank == 0:
            report = evaluate(db_emb, q_emb, args.protocol, regions, ks, args.factory,
                              year=year, allow_mixed_encoders=args.allow_mixed_encoders,
                              **params)
            print(report.table())
            if args.output:
                doc = report.to_dict() | _provenance(db_emb, q_emb) | {
                    "model": os.path.abspath(args.model) if args.model else None,
                    "environment": environment()}
                storage.write_json_atomic(args.output, doc)
                print(f"report -> {args.output}")
    return 0
