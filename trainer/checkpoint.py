"""Atomic, resumable checkpoints in a run folder (local or ``s3://``).

Layout::

    RUN/checkpoints/step-000001000/state.pt        model, optimizer, scheduler, scaler, counters
    RUN/checkpoints/step-000001000/rank-00000.pt   per rank: every RNG and the data position
    RUN/checkpoints/step-000001000/complete.json   written last, after every rank wrote:
                                                   {"step", "world_size", "run_id", "seq"}
    RUN/checkpoints/latest.json                    {"checkpoint": "step-000001000", "step": 1000}

Every file is written atomically (a temporary file then a rename locally, one PUT
on S3). A checkpoint counts only once its ``complete.json`` exists, so a run
killed while saving leaves ``latest`` on the previous one; a save that fails on any
rank (a full disk) fails on every rank, the previous checkpoint untouched.

Each checkpoint knows its run (``run_id``, see ``trainer.runfolder``) and its place in
that run's save order (``seq``). "Newest" and pruning follow that order, not the step
number: a run resumed from an older checkpoint writes lower step numbers than the ones
it abandoned. Checkpoints written before ``seq`` existed count as older than any with
one, among themselves by step. Old checkpoints of this run beyond ``keep`` and the
leftovers of a killed save are removed by the main process; another run's checkpoints
never are.

Reading falls back: ``CheckpointStore.load_newest_intact`` takes the newest checkpoint
whose files every rank can read, warning about each broken one it skips.
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

__all__ = ["CheckpointStore", "CheckpointError", "CheckpointWriteError", "rng_state",
           "set_rng_state"]

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (one line naming the file)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written on some rank; the previous one is intact."""


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    # our own files: RNG states are numpy/python objects, so not weights_only
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _read_torch(url: str, storage_options: Mapping[str, Any] | None) -> Any:
    """A torch file, or ``CheckpointError`` naming it (truncated, missing, not torch)."""
    try:
        obj = _from_bytes(storage.read_bytes(url, storage_options))
    except FileNotFoundError:
        raise CheckpointError(f"{url}: missing") from None
    except Exception as exc:  # noqa: BLE001 - torch/pickle raise many kinds for a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{url}: unreadable ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{url}: not a checkpoint file (holds {type(obj).__name__})")
    return obj


def _read_info(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A JSON object, or None when it is missing or not an object."""
    try:
        data = storage.read_json(url, storage_options)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
             rank: int, world_size: int, agree: Callable[[bool], bool], keep: int,
             run_id: str | None = None) -> str:
        """Every rank calls this at the same step; ``shared`` comes from the main process.
        ``agree(ok)`` is collective: True only when every rank passed True (a barrier too).
        Raises ``CheckpointWriteError`` on every rank when any rank failed to write."""
        folder = self.path(self.name(step))
        error: OSError | None = None
        try:
            if rank == 0:   # re-saving a step: it stops counting before any file changes
                self._remove_file(storage.join(folder, COMPLETE))
        except OSError as exc:
            error = exc
        if not agree(error is None):
            raise self._write_error(folder, error)
        try:
            storage.makedirs(folder, self.opts)
            storage.write_bytes_atomic(storage.join(folder, rank_file(rank)),
                                       _to_bytes(dict(per_rank)), self.opts)
            if rank == 0:
                if shared is None:
                    raise ValueError("the main process must pass the shared state")
                storage.write_bytes_atomic(storage.join(folder, STATE), _to_bytes(dict(shared)),
                                           self.opts)
        except OSError as exc:
            error = exc
        if not agree(error is None):          # every rank's file is in place, or none counts
            if rank == 0:
                self._remove_folder(self.name(step))
            raise self._write_error(folder, error)
        if rank == 0:
            try:
                seq = 1 + max((self._seq(n) or 0 for n in self.complete()), default=0)
                storage.write_json_atomic(storage.join(folder, COMPLETE),
                                          {"step": int(step), "world_size": int(world_size),
                                           "run_id": run_id, "seq": seq}, self.opts)
                storage.write_json_atomic(storage.join(self.root, LATEST),
                                          {"checkpoint": self.name(step), "step": int(step),
                                           "run_id": run_id, "seq": seq}, self.opts)
            except OSError as exc:
                error = exc
        if not agree(error is None):
            raise self._write_error(folder, error)
        if rank == 0:
            self.prune(keep, run_id, current=self.name(step))
            log.info("checkpoint %s", folder)
        return folder

    def _write_error(self, folder: str, error: OSError | None) -> CheckpointWriteError:
        previous = self.latest()
        kept = (f"the previous checkpoint {previous} is intact" if previous
                else "no earlier checkpoint")
        if error is None:
            return CheckpointWriteError(f"cannot write checkpoint {folder}: another rank failed "
                                        f"(see its error); {kept}")
        reason = error.strerror or str(error)
        where = f" ({error.filename})" if error.filename else ""
        return CheckpointWriteError(f"cannot write checkpoint {folder}: {reason}{where}; {kept}")

    def _remove_file(self, url: str) -> None:
        fs, path = storage.filesystem(url, self.opts)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _remove_folder(self, name: str) -> None:
        fs, path = storage.filesystem(self.path(name), self.opts)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as exc:     # what is left is incomplete: the next save removes it
            log.warning("could not remove %s: %s", self.path(name), exc)

    def prune(self, keep: int, run_id: str | None = None, current: str | None = None) -> None:
        """Keep this run's newest ``keep`` checkpoints (save order) and remove incomplete ones
        other than ``current``. Checkpoints of another run stay."""
        ours = [n for n in self.complete() if self._run_id(n) in (None, run_id)]
        doomed = ours[:-keep] if keep > 0 else list(ours)
        complete = set(self.complete())
        doomed += [n for n in self._names() if n not in complete and n != current]
        for name in doomed:
            self._remove_folder(name)

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

    def info(self, name: str) -> dict[str, Any] | None:
        """A checkpoint's ``complete.json``, or None when it is not complete."""
        return _read_info(storage.join(self.path(name), COMPLETE), self.opts)

    def _seq(self, name: str) -> int | None:
        seq = (self.info(name) or {}).get("seq")
        return int(seq) if isinstance(seq, int) else None

    def _run_id(self, name: str) -> str | None:
        return (self.info(name) or {}).get("run_id")

    def complete(self) -> list[str]:
        """Complete checkpoints, oldest first in save order (those without ``seq`` first)."""
        infos = {n: self.info(n) for n in self._names()}
        done = [n for n, i in infos.items() if i is not None]

        def order(n: str) -> tuple[int, int]:
            seq = infos[n].get("seq")
            return (1, seq) if isinstance(seq, int) else (0, int(_NAME.match(n).group(1)))
        return sorted(done, key=order)

    def run_ids(self) -> set[str | None]:
        """The runs the complete checkpoints belong to (None: written before run ids)."""
        return {self._run_id(n) for n in self.complete()}

    def latest(self) -> str | None:
        """The newest complete checkpoint folder (save order), or None."""
        done = self.complete()
        pointer = storage.join(self.root, LATEST)
        if storage.exists(pointer, self.opts):
            data = _read_info(pointer, self.opts)
            if data is None:
                log.warning("%s is not a checkpoint pointer; using the newest complete "
                            "checkpoint instead", pointer)
            elif done and data.get("checkpoint") == done[-1]:
                return self.path(done[-1])
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

    def fallbacks(self, folder: str) -> list[str]:
        """``folder`` then the complete checkpoints saved before it, newest first."""
        done = [self.path(n) for n in self.complete()]
        if folder not in done:
            return [folder]
        return done[:done.index(folder) + 1][::-1]

    @staticmethod
    def load(folder: str, rank: int, storage_options: Mapping[str, Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
        """(shared state, this rank's state or None if the checkpoint has no such rank, info).
        Raises ``CheckpointError`` naming the file that cannot be read."""
        info = _read_info(storage.join(folder, COMPLETE), storage_options)
        if info is None:
            raise CheckpointError(f"{storage.join(folder, COMPLETE)}: missing or not a JSON "
                                  "object")
        shared = _read_torch(storage.join(folder, STATE), storage_options)
        path = storage.join(folder, rank_file(rank))
        per_rank = (_read_torch(path, storage_options)
                    if storage.exists(path, storage_options) else None)
        return shared, per_rank, info

    @staticmethod
    def load_newest_intact(candidates: list[str], rank: int, agree: Callable[[bool], bool],
                           storage_options: Mapping[str, Any] | None = None
                           ) -> tuple[str, tuple[dict[str, Any], dict[str, Any] | None,
                                                 dict[str, Any]]]:
        """The first of ``candidates`` (newest first) that every rank can read, and its
        contents. A broken one is skipped with a warning naming its file; ``agree`` (a
        collective AND over ranks) keeps every rank on the same checkpoint. None intact:
        ``CheckpointError`` listing what was wrong."""
        problems: list[str] = []
        for folder in candidates:
            try:
                loaded = CheckpointStore.load(folder, rank, storage_options)
                error = None
            except CheckpointError as exc:
                loaded, error = None, str(exc)
            if agree(error is None):
                if problems:
                    log.warning("resuming from %s, the newest intact checkpoint", folder)
                return folder, loaded
            problems.append(error or f"{folder}: unreadable on another rank")
            log.warning("checkpoint %s is broken, skipped: %s", folder,
                        error or "unreadable on another rank")
        raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(problems))
