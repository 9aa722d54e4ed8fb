"""``python -m retrieval embed``: image shards -> per-shard embeddings (distributed, resumable)."""
from __future__ import annotations

import logging

from . import CommandError, add_common, load_model, model_identity, parse_ints

HELP = "embed image shards with a saved encoder (per-shard .npy + .jsonl, resumable)"
EXAMPLES = """\
  # one process; the database at EarthLoc's 4 rotations, stored as float16
  python -m retrieval embed --model runs/demo/train/final --shards runs/demo/shards/database \\
      --output runs/demo/emb/database --rotations 0,90,180,270 --dtype float16
  # every GPU of a node (ranks take disjoint shards)
  accelerate launch -m retrieval embed --model runs/demo/train/final \\
      --shards s3://bucket/earthloc/db --output emb/db
  # a SLURM array of 8 tasks (index/count from SLURM_ARRAY_TASK_ID/COUNT)
  sbatch --array=0-7 --wrap "python -m retrieval embed --model best --shards shards/db --output emb/db"

A killed run re-run with the same arguments skips the shards already written, except
those whose manifest sha256 changed since (they are embedded again); another encoder's
weights into the same folder are refused. EMB/embeddings.json appears when every shard
is done.
"""

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="ENCODER",
                   help="saved encoder folder (trainer.models.save_encoder)")
    p.add_argument("--shards", required=True, metavar="SRC",
                   help="image shard set: folder or URL with manifest.json")
    p.add_argument("--output", required=True, metavar="EMB", help="embeddings folder (local)")
    p.add_argument("--rotations", default="0", help="comma-separated degrees (default 0)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="images per batch")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage type of the rows (float16 halves the files)")
    p.add_argument("--workers", type=int, default=2, metavar="W", help="JPEG decoding threads")
    p.add_argument("--task-index", type=int, metavar="I",
                   help="this array task (default: SLURM_ARRAY_TASK_ID, else 0)")
    p.add_argument("--num-tasks", type=int, metavar="T",
                   help="array tasks (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--no-resume", action="store_true",
                   help="recompute this task's shards even when already written")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for URLs")
    add_common(p)


def run(args) -> int:
    from shard_tools import storage

    from ..distributed import array_task, checked_together, init_process_group_from_env, worker_part
    from ..embed import embed_shards, finalize_embeddings

    if args.batch_size < 1 or args.workers < 1:
        raise CommandError("--batch-size and --workers must be >= 1")
    rotations = parse_ints(args.rotations, "--rotations")
    task, ntasks = array_task(args.task_index, args.num_tasks)
    rank, world = init_process_group_from_env()
    part, parts = worker_part(rank, world, task, ntasks)
    with checked_together():   # a bad shard on one rank stops every rank here, said once
        model, size, dim = load_model(args.model)
        identity = model_identity(args.model)
        stats = embed_shards(model, args.shards, args.output, size, rotations, args.batch_size,
                             args.dtype, part, parts, identity["path"],
                             resume=not args.no_resume, workers=args.workers,
                             storage_options=storage.parse_storage_options(args.storage_options),
                             progress=not args.no_progress, encoder_id=identity)
    with checked_together():   # every rank's shards are written: rank 0 finalizes
        complete = finalize_embeddings(args.output) if rank == 0 else stats.complete
    changed = f" ({stats.shards_changed} changed since embedded)" if stats.shards_changed else ""
    print(f"rank {rank}/{world} task {task}/{ntasks}: embedded {stats.images} images "
          f"({stats.rows} rows, {dim}-d) into {stats.shards_written} shards{changed}, "
          f"{stats.shards_skipped} already done, {stats.bad_samples} bad samples skipped"
          + ("; embeddings complete" if complete else "; waiting for other tasks' shards"))
    return 0
