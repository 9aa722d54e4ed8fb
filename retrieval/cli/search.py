"""``python -m retrieval search``: query embeddings -> top-k per query (JSON lines)."""
from __future__ import annotations

import json
import os

from . import CommandError, add_common, add_search_params, search_params

HELP = "search a sharded index with query embeddings; top-k merged over all shards"
EXAMPLES = """\
  python -m retrieval search --index idx/flat --queries emb/queries -k 100 --output results.jsonl
  # IVF: probe 32 lists; keep each database image's best rotation only
  python -m retrieval search --index idx/ivfpq --queries emb/queries -k 10 --nprobe 32 \\
      --dedupe --output results.jsonl
  # IVF-PQ with exact re-ranking of the top 4k candidates (factory IVF2048,PQ32x4fs,RFlat)
  python -m retrieval search --index idx/ivfpq-rflat --queries emb/queries -k 100 --nprobe 8 \\
      --k-factor 4 --output results.jsonl
  # 2 processes hold different index shards; queries broadcast, results merged
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m retrieval search \\
      --index idx/flat --queries emb/queries -k 100 --output results.jsonl

Each output line: {"query": key, "rotation": r, "ids": [global row ids],
"scores": [inner products, descending], "keys": [database keys]}.
"""


def add_arguments(p) -> None:
    p.add_argument("--index", required=True, metavar="IDX", help="index folder")
    p.add_argument("--queries", required=True, metavar="EMB", help="query embeddings folder")
    p.add_argument("-k", "--k", type=int, default=100, help="results per query (default 100)")
    add_search_params(p)
    p.add_argument("--dedupe", action="store_true",
                   help="one result per database image (its best rotation)")
    p.add_argument("--batch-size", type=int, default=4096, help="queries per search call")
    p.add_argument("--output", required=True, metavar="RESULTS.jsonl", help="output file")
    add_common(p)


def run(args) -> int:
    import numpy as np

    from shard_tools import storage

    from ..distributed import init_process_group_from_env, take_part
    from ..embed import Embeddings
    from ..index import INDEX_META, ShardedIndex
    from ..search import dedupe, search_distributed

    if args.k < 1 or args.batch_size < 1:
        raise CommandError(f"-k and --batch-size must be >= 1, got {args.k} and {args.batch_size}")
    params = search_params(args)
    rank, world = init_process_group_from_env()
    meta_path = os.path.join(args.index, INDEX_META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"not an index folder (no {INDEX_META}): {args.index}")
    with open(meta_path) as f:
        meta = json.load(f)
    queries = Embeddings.open(args.queries)
    if queries.dim != meta["dim"]:
        raise CommandError(f"dimension mismatch: the index holds {meta['dim']}-d vectors, "
                           f"the queries are {queries.dim}-d")
    if not meta.get("embeddings"):
        raise CommandError(f"{meta_path} names no source embeddings")
    database = Embeddings.open(meta["embeddings"])
    numbers = take_part(list(range(len(meta["shards"]))), rank, world) if world > 1 else None
    index = ShardedIndex.load(args.index, numbers)
    n_rot = len(database.rotations) if args.dedupe else 1
    k = min(args.k * n_rot, len(database))
    res = search_distributed(index, queries.all() if rank == 0 else None, k,
                             batch_size=args.batch_size, progress=not args.no_progress, **params)
    if rank != 0:
        return 0
    if args.dedupe:
        res = dedupe(res, database.image_of_row, args.k)
    keys = database.keys
    lines = []
    for rec, s, i in zip(queries.records, res.scores, res.ids):
        valid = i >= 0
        lines.append(json.dumps({"query": rec.get("key"), "rotation": rec.get("rotation", 0),
                                 "ids": i[valid].tolist(),
                                 "scores": [round(float(v), 6) for v in s[valid]],
                                 "keys": keys[i[valid]].tolist()}))
    storage.write_bytes_atomic(args.output, ("\n".join(lines) + "\n").encode())
    hits = int(np.sum(res.ids >= 0))
    print(f"searched {len(res)} queries over {meta['rows']} rows ({len(meta['shards'])} shards, "
          f"{world} ranks): {hits} results -> {args.output}")
    return 0
