"""``python -m retrieval index``: embeddings -> sharded FAISS index (inner product)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import CommandError, add_common

if TYPE_CHECKING:
    from ..embed import Embeddings
    from ..index import BuildReport

HELP = "build a sharded FAISS index (Flat, IVF, PQ, HNSW by factory string) over embeddings"
EXAMPLES = """\
  # exact search, 4 shards with global ids
  python -m retrieval index --embeddings emb/db --output idx/flat --num-shards 4
  # IVF-PQ trained once on 100k rows, then one shard per array task, then merged on disk
  python -m retrieval index --embeddings emb/db --output idx/ivfpq \\
      --factory IVF1024,PQ32 --num-shards 8 --shard 3
  python -m retrieval index --embeddings emb/db --output idx/ivfpq \\
      --factory IVF1024,PQ32 --num-shards 8 --merge
  # HNSW graph
  python -m retrieval index --embeddings emb/db --output idx/hnsw --factory HNSW32

Without --shard a SLURM array task builds its share of the shards
(SLURM_ARRAY_TASK_ID/COUNT); alone, all of them. Existing shard files that match
the size and sha256 in index.json are kept; a damaged one is rebuilt, and an index
built from other embeddings is rebuilt whole. --merge runs once every shard is
built (not with --shard).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", required=True, metavar="EMB", help="embeddings folder")
    p.add_argument("--output", required=True, metavar="IDX", help="index folder")
    p.add_argument("--factory", default="Flat",
                   help="FAISS factory string: Flat, IVF{n},Flat, IVF{n},PQ{m}, HNSW32, ...")
    p.add_argument("--num-shards", type=int, default=1, metavar="S", help="index shards")
    p.add_argument("--shard", type=int, metavar="I", help="build only shard I")
    p.add_argument("--task-index", type=int, metavar="I",
                   help="array task (default: SLURM_ARRAY_TASK_ID); builds shards I, I+T, ...")
    p.add_argument("--num-tasks", type=int, metavar="T",
                   help="array tasks (default: SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--train-size", type=int, metavar="N",
                   help="rows sampled to train IVF/PQ (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="training sample seed")
    p.add_argument("--merge", action="store_true",
                   help="merge IVF shards into one on-disk index (merged.index + .ivfdata)")
    add_common(p)


def shard_list(numbers: list[int]) -> str:
    return str(numbers) if len(numbers) < 10 else f"{len(numbers)} shards"


def summary(args: argparse.Namespace, emb: "Embeddings", report: "BuildReport") -> str:
    """What this run did: built (new or repaired) and kept shards, each named once."""
    done = [f"built {shard_list(report.built)}" if report.built else "built none"]
    if report.repaired:
        done.append(f"repaired {shard_list(sorted(report.repaired))}")
    if report.kept:
        done.append(f"kept {shard_list(report.kept)}, already built")
    return (f"{args.factory}: {len(emb)} rows x {emb.dim}-d in {args.num_shards} shards "
            f"({'; '.join(done)})")


def run(args: argparse.Namespace) -> int:
    from ..distributed import array_task, take_part
    from ..embed import Embeddings
    from ..index import build_index_folder, merge_ondisk, new_index, takes_global_ids

    if args.num_shards < 1:
        raise CommandError("--num-shards must be >= 1")
    if args.train_size is not None and args.train_size < 1:
        raise CommandError("--train-size must be >= 1")
    if args.merge and args.shard is not None:
        raise CommandError("--merge merges every shard, so it does not go with --shard: build "
                           "the shards, then run once with --merge and without --shard")
    emb = Embeddings.open(args.embeddings)
    probe = new_index(emb.dim or 1, args.factory)   # a bad factory fails before any work
    if args.merge and not takes_global_ids(probe):
        raise CommandError(f"--merge needs an IVF index, --factory {args.factory} is not one")
    if args.shard is not None:
        shards = [args.shard]
    else:
        task, ntasks = array_task(args.task_index, args.num_tasks)
        shards = take_part(list(range(args.num_shards)), task, ntasks)
    report = build_index_folder(emb, args.output, args.factory, args.num_shards, shards,
                                args.train_size, args.seed, progress=not args.no_progress)
    msg = summary(args, emb, report)
    if report.index is None:
        wait = f"; {args.output} waits for shards {shard_list(report.missing)}"
        print(msg + wait + ("; --merge runs once they are built" if args.merge else ""))
        return 0
    if args.merge:
        msg += f"; merged into {merge_ondisk(args.output)}"
    print(msg + f"; index complete: {report.index.ntotal} vectors in {args.output}")
    return 0
