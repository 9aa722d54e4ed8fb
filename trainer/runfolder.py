"""Which run a run folder belongs to, who writes it now, and what happened to it.

- ``RUN/run.json`` (``{"run_id", "created"}``) is written at a run's first start; each
  checkpoint's ``complete.json`` repeats the ``run_id``. A fresh start (no ``--resume``,
  or ``--resume`` from another folder) into a folder that holds checkpoints is refused:
  they belong to the run that made them, and pruning or ``--resume latest`` would mix
  the two. ``--overwrite`` first moves that run's files to ``RUN/overwritten/<time>-<id>/``.
- ``RUN/.train-lock.json`` (PID, host, SLURM job) is held by the main process while it
  trains (``shard_tools.lock.FolderLock``): a second run into the same folder is refused
  with one line; a lock left by a dead process on this host, or by an earlier start of
  the same SLURM job (a requeue), is taken over. On ``s3://`` there is no exclusive
  create, so the lock catches runs that start seconds apart, not at the same instant.
- ``RUN/resumes.jsonl`` gets one line per resume: the checkpoint, the update, the recipe
  keys that changed (old and new) and whether breaking changes were allowed.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Mapping

from shard_tools import storage
from shard_tools.lock import FolderLock

__all__ = ["RUN_FILE", "LOCK_FILE", "RESUMES_FILE", "run_lock", "read_run_id", "start_run",
           "refuse_foreign_checkpoints", "archive_previous_run", "record_resume",
           "RunFolderError"]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOCK_FILE = ".train-lock.json"
RESUMES_FILE = "resumes.jsonl"
# what a run writes into its folder (moved away by --overwrite)
RUN_OUTPUTS = ("checkpoints", "best", "final", "init", "eval", "tensorboard", "summary.json",
               "config.yaml", RUN_FILE, RESUMES_FILE)


class RunFolderError(ValueError):
    """A run folder that this start must not write into (one line, names the folder)."""


def run_lock(run_dir: str) -> FolderLock:
    return FolderLock(run_dir, LOCK_FILE, what="training into this run folder")


def read_run_id(run_dir: str) -> str | None:
    try:
        data = storage.read_json(storage.join(run_dir, RUN_FILE))
    except (FileNotFoundError, ValueError):
        return None
    return data.get("run_id") if isinstance(data, dict) else None


def start_run(run_dir: str) -> str:
    """This folder's run id, written now when the folder has none (a first start, or a
    folder from before run ids, whose checkpoints it then adopts)."""
    run_id = read_run_id(run_dir)
    if run_id:
        return run_id
    run_id = uuid.uuid4().hex
    storage.write_json_atomic(storage.join(run_dir, RUN_FILE),
                              {"run_id": run_id, "created": time.time()})
    return run_id


def refuse_foreign_checkpoints(run_dir: str, has_checkpoints: bool, resuming_here: bool) -> None:
    """A fresh start must not write into another run's checkpoints."""
    if has_checkpoints and not resuming_here:
        raise RunFolderError(
            f"{storage.join(run_dir, 'checkpoints')} holds the checkpoints of another run; "
            "continue it with --resume latest, train into another folder (train.run_dir=...), "
            "or pass --overwrite to move the old run's files aside")


def archive_previous_run(run_dir: str) -> str | None:
    """Move the previous run's outputs to ``RUN/overwritten/<time>-<run id>/`` (nothing is
    deleted); returns that folder, or None when there was nothing to move."""
    fs, _ = storage.filesystem(run_dir)
    present = [n for n in RUN_OUTPUTS if storage.exists(storage.join(run_dir, n))]
    if not present:
        return None
    old_id = read_run_id(run_dir) or "unknown"
    target = storage.join(run_dir, "overwritten",
                          f"{time.strftime('%Y%m%d-%H%M%S')}-{old_id[:8]}")
    storage.makedirs(target)
    for name in present:
        _, src = storage.filesystem(storage.join(run_dir, name))
        _, dst = storage.filesystem(storage.join(target, name))
        fs.mv(src, dst, recursive=True)
    log.warning("--overwrite: the previous run's files are now in %s", target)
    return target


def record_resume(run_dir: str, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``RUN/resumes.jsonl`` (read and rewritten: object stores
    have no append)."""
    url = storage.join(run_dir, RESUMES_FILE)
    old = storage.read_bytes(url) if storage.exists(url) else b""
    line = json.dumps({"time": time.time(), **record}, sort_keys=True, default=str)
    storage.write_bytes_atomic(url, old + line.encode() + b"\n")
