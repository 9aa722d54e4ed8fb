"""``python -m retrieval search``: query embeddings -> top-k per query (JSON lines)."""
from __future__ import annotations

import argparse
import errno
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import CommandError, add_common, add_search_params, search_params

if TYPE_CHECKING:
    import numpy as np

    from ..embed import Embeddings
    from ..index import ShardedIndex
    from ..search import SearchResult

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="IDX", help="index folder")
    p.add_argument("--queries", required=True, metavar="EMB", help="query embeddings folder")
    p.add_argument("-k", "--k", type=int, default=100, help="results per query (default 100)")
    add_search_params(p)
    p.add_argument("--dedupe", action="store_true",
                   help="one result per database image (its best rotation)")
    p.add_argument("--batch-size", type=int, default=4096, help="queries per search call")
    p.add_argument("--allow-mixed-encoders", action="store_true",
                   help="search even when the queries and the index's embeddings were made by "
                        "different encoders (their scores are then not comparable)")
    p.add_argument("--output", required=True, metavar="RESULTS.jsonl", help="output file")
    add_common(p)


@dataclass
class Inputs:
    """What every rank reads and checks before any collective: its index shards, the
    database embeddings (digest checked), the queries (rows on rank 0 only)."""

    index: "ShardedIndex"
    database: "Embeddings"
    queries: "Embeddings"
    vectors: "np.ndarray | None"


def open_inputs(args: argparse.Namespace, rank: int, world: int) -> Inputs:
    from ..distributed import take_part
    from ..embed import Embeddings, check_same_encoder
    from ..index import ShardedIndex, read_meta
    from ..search import check_finite

    meta = read_meta(args.index)
    queries = Embeddings.open(args.queries)
    if queries.dim != meta["dim"]:
        raise CommandError(f"dimension mismatch: the index holds {meta['dim']}-d vectors, "
                           f"the queries are {queries.dim}-d")
    numbers = take_part(list(range(len(meta["shards"]))), rank, world) if world > 1 else None
    index = ShardedIndex.load(args.index, numbers, check_embeddings=False)
    database = index.open_embeddings()
    # the encoder the index records, else the one its embeddings record
    check_same_encoder(meta.get("encoder") or database.encoder, queries.encoder,
                       f"the index's embeddings ({database.root})",
                       f"the queries ({queries.root})", allow=args.allow_mixed_encoders)
    vectors = None
    if rank == 0:
        vectors = queries.all()
        check_finite(vectors, f"{args.queries}: query")
    return Inputs(index, database, queries, vectors)


def check_output(path: str) -> None:
    """Fail before the search, with the messages the final write would give."""
    from shard_tools import storage

    if storage.is_remote(path):
        return
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file to write", path)
    storage.makedirs(os.path.dirname(os.path.abspath(path)))


def write_results(args: argparse.Namespace, inputs: Inputs, res: "SearchResult") -> None:
    from shard_tools import storage

    keys = inputs.database.keys
    lines = []
    for rec, s, i in zip(inputs.queries.records, res.scores, res.ids):
        valid = i >= 0
        lines.append(json.dumps({"query": rec.get("key"), "rotation": rec.get("rotation", 0),
                                 "ids": i[valid].tolist(),
                                 "scores": [round(float(v), 6) for v in s[valid]],
                                 "keys": keys[i[valid]].tolist()}))
    storage.write_bytes_atomic(args.output, ("\n".join(lines) + "\n").encode())


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..distributed import checked_together, init_process_group_from_env
    from ..search import dedupe, search_distributed

    if args.k < 1 or args.batch_size < 1:
        raise CommandError(f"-k and --batch-size must be >= 1, got {args.k} and {args.batch_size}")
    params = search_params(args)
    rank, world = init_process_group_from_env()
    with checked_together():     # a bad input on any rank stops every rank here
        if rank == 0:
            check_output(args.output)
        inputs = open_inputs(args, rank, world)
    n_rot = len(inputs.database.rotations) if args.dedupe else 1
    k = min(args.k * n_rot, len(inputs.database))
    res = search_distributed(inputs.index, inputs.vectors, k, batch_size=args.batch_size,
                             progress=not args.no_progress, **params)
    with checked_together():     # rank 0 writes; the others wait to hear it went well
        if rank == 0:
            if args.dedupe:
                res = dedupe(res, inputs.database.image_of_row, args.k)
            write_results(args, inputs, res)
    if rank != 0:
        return 0
    hits = int(np.sum(res.ids >= 0))
    meta = inputs.index.meta
    print(f"searched {len(res)} queries over {meta['rows']} rows ({len(meta['shards'])} shards, "
          f"{world} ranks): {hits} results -> {args.output}")
    return 0
