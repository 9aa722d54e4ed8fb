"""Atomic, resumable checkpoints in a run folder (local or ``s3://``).

Layout::

    RUN/checkpoints/step-000001000/state.pt        model, optimizer, scheduler, scaler, counters
    RUN/checkpoints/step-000001000/rank-00000.pt   per rank: every RNG and the data position
    RUN/checkpoints/step-000001000/complete.json   written last, after every rank wrote
    RUN/checkpoints/latest.json                    {"checkpoint": "step-000001000", "step": 1000}

Every file is written atomically (a temporary file then a rename locally, one PUT
on S3). A checkpoint counts only once its ``complete.json`` exists, so a run
killed while saving leaves ``latest`` on the previous one. Old checkpoints
beyond ``keep`` and the leftovers of a killed save are removed by the main process.
"""
from __future__ import annotations

import io
import logging
import random
import re
from typing import Any, Callable, Mapping

import numpy as np
import torch

from shard_tools import storage

__all__ = ["CheckpointStore", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{9})$")
COMPLETE = "complete.json"
LATEST = "latest.json"
STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    """Every random generator the training step may touch on this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    # our own files: RNG states are numpy/python objects, so not weights_only
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class CheckpointStore:
    """Checkpoints of one run folder; see the module docstring."""

    def __init__(self, run_dir: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.run_dir = storage.normalize(run_dir)
        self.root = storage.join(self.run_dir, "checkpoints")
        self.opts = dict(storage_options or {})

    @staticmethod
    def name(step: int) -> str:
        return f"step-{int(step):09d}"

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    # -- writing
    def save(self, step: int, shared: Mapping[str, Any] | None, per_rank: Mapping[str, Any],
             rank: int, world_size: int, barrier: Callable[[], None], keep: int) -> str:
        """Every rank calls this at the same step; ``shared`` comes from the main process."""
        folder = self.path(self.name(step))
        storage.makedirs(folder)
        storage.write_bytes_atomic(storage.join(folder, rank_file(rank)), _to_bytes(dict(per_rank)),
                                   self.opts)
        if rank == 0:
            if shared is None:
                raise ValueError("the main process must pass the shared state")
            storage.write_bytes_atomic(storage.join(folder, STATE), _to_bytes(dict(shared)),
                                       self.opts)
        barrier()                       # every rank's file is in place
        if rank == 0:
            storage.write_json_atomic(storage.join(folder, COMPLETE),
                                      {"step": int(step), "world_size": int(world_size)}, self.opts)
            storage.write_json_atomic(storage.join(self.root, LATEST),
                                      {"checkpoint": self.name(step), "step": int(step)}, self.opts)
            self.prune(keep)
            log.info("checkpoint %s", folder)
        return folder

    def prune(self, keep: int) -> None:
        complete = self.complete()
        newest = complete[-1] if complete else None
        doomed = complete[:-keep] if keep > 0 else list(complete)
        doomed += [n for n in self._names() if n not in complete and newest and n < newest]
        fs, _ = storage.filesystem(self.root, self.opts)
        for name in doomed:
            _, path = storage.filesystem(self.path(name), self.opts)
            try:
                fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass

    # -- reading
    def _names(self) -> list[str]:
        fs, path = storage.filesystem(self.root, self.opts)
        try:
            fs.invalidate_cache(path)
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if _NAME.match(n))

    def complete(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        return [n for n in self._names()
                if storage.exists(storage.join(self.path(n), COMPLETE), self.opts)]

    def latest(self) -> str | None:
        """The newest complete checkpoint folder, or None."""
        pointer = storage.join(self.root, LATEST)
        if storage.exists(pointer, self.opts):
            name = storage.read_json(pointer, self.opts).get("checkpoint", "")
            if storage.exists(storage.join(self.path(name), COMPLETE), self.opts):
                done = self.complete()
                if not done or done[-1] <= name:
                    return self.path(name)
        done = self.complete()
        return self.path(done[-1]) if done else None

    @staticmethod
    def resolve(spec: str, run_dir: str, storage_options: Mapping[str, Any] | None = None
                ) -> str | None:
        """``latest`` (None when the run has no checkpoint yet), a checkpoint folder, or another
        run folder (its latest checkpoint). Raises FileNotFoundError for a path that is neither."""
        if spec == "latest":
            return CheckpointStore(run_dir, storage_options).latest()
        spec = storage.normalize(spec).rstrip("/")
        if storage.exists(storage.join(spec, COMPLETE), storage_options):
            return spec
        if storage.exists(storage.join(spec, "checkpoints"), storage_options):
            found = CheckpointStore(spec, storage_options).latest()
            if found:
                return found
        raise FileNotFoundError(f"--resume {spec}: not a complete checkpoint nor a run folder "
                                "with one")

    @staticmethod
    def load(folder: str, rank: int, storage_options: Mapping[str, Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
        """(shared state, this rank's state or None if the checkpoint has no such rank, info)."""
        info = storage.read_json(storage.join(folder, COMPLETE), storage_options)
        shared = _from_bytes(storage.read_bytes(storage.join(folder, STATE), storage_options))
        path = storage.join(folder, rank_file(rank))
        per_rank = (_from_bytes(storage.read_bytes(path, storage_options))
                    if storage.exists(path, storage_options) else None)
        return shared, per_rank, info
