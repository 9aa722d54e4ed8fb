"""Atomic, resumable checkpoints in a run folder (local or ``s3://``).

Layout::

    RUN/checkpoints/step-000001000/state.pt        model, optimizer, scheduler, scaler, counters
    RUN/checkpoints/step-000001000/rank-00000.pt   per rank: every RNG and the data position
    RUN/checkpoints/step-000001000/complete.json   written last, after every rank wrote:
                                                   {"step", "world_size", "run_id", "seq",
                                                    "parent"}
    RUN/checkpoints/latest.json                    {"checkpoint": "step-000001000", "step": 1000}

Every file is written atomically (a temporary file then a rename locally, one PUT
on S3). A checkpoint counts only once its ``complete.json`` exists, so a run
killed while saving leaves ``latest`` on the previous one; a save that fails on any
rank (a full disk) fails on every rank, the previous checkpoint untouched.

Each checkpoint knows its run (``run_id``, see ``trainer.runfolder``), its place in
that run's save order (``seq``) and the checkpoint it continues (``parent``: the ``seq``
saved or resumed from just before it; null for a run's first). "Newest" follows the save
order, not the step number: a run resumed from an older checkpoint writes lower step
numbers than the ones it abandoned. The parents make a checkpoint's *line*: resumed from
step 5 after saving 4, 5 and 6, the next save 8 continues 5 and 4, and step 6 is an
abandoned branch, never a fallback and the first to be pruned. Checkpoints written
before ``seq`` existed count as older than any with one, among themselves by step; one
without ``parent`` continues the one saved before it. This run's abandoned checkpoints,
its line beyond ``keep`` and the leftovers of a killed save are removed by the main
process; another run's checkpoints never are.

Reading falls back: ``CheckpointStore.load_newest_intact`` takes the newest checkpoint
of the line whose files every rank can read, warning about each broken one it skips. A
checkpoint that lacks the file of a rank it was saved with is broken too (that rank
would resume with fresh random streams and data position).
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
from shard_tools.lock import remove_file

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
        # what the next save continues: {"parent": seq}, None for a run's first checkpoint;
        # {} when unknown (resumed from a checkpoint without seq: the one saved before it)
        self._parent: dict[str, int | None] = {"parent": None}

    def continue_from(self, info: Mapping[str, Any]) -> None:
        """The next save continues the checkpoint whose ``complete.json`` is ``info`` (the
        one this run resumed from); checkpoints saved after it become an abandoned branch."""
        seq = info.get("seq")
        self._parent = {"parent": seq} if isinstance(seq, int) else {}

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
                remove_file(storage.join(folder, COMPLETE), self.opts)
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
        seq: int | None = None
        if rank == 0:
            try:
                seq = 1 + max((i["seq"] for i in self._complete_infos().values()
                               if isinstance(i.get("seq"), int)), default=0)
                storage.write_json_atomic(storage.join(folder, COMPLETE),
                                          {"step": int(step), "world_size": int(world_size),
                                           "run_id": run_id, "seq": seq, **self._parent},
                                          self.opts)
                storage.write_json_atomic(storage.join(self.root, LATEST),
                                          {"checkpoint": self.name(step), "step": int(step),
                                           "run_id": run_id, "seq": seq}, self.opts)
            except OSError as exc:
                error = exc
        if not agree(error is None):
            raise self._write_error(folder, error)
        self._parent = {"parent": seq}         # the main process's; it alone writes complete.json
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

    def _remove_folder(self, name: str) -> None:
        fs, path = storage.filesystem(self.path(name), self.opts)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        except OSError as exc:     # what is left is incomplete: the next save removes it
            log.warning("could not remove %s: %s", self.path(name), exc)

    def prune(self, keep: int, run_id: str | None = None, current: str | None = None) -> None:
        """Keep the newest ``keep`` checkpoints of ``current``'s line (of the newest complete
        checkpoint without ``current``); remove this run's checkpoints off that line (an
        abandoned branch) and incomplete ones other than ``current``. Checkpoints of another
        run stay."""
        infos = self._complete_infos()
        ours = [n for n in infos if infos[n].get("run_id") in (None, run_id)]
        head = current if current in infos else (list(infos)[-1] if infos else None)
        line = [n for n in self._line(head, infos) if n in ours] if head else []
        doomed = [n for n in ours if n not in line] + line[:-keep]
        doomed += [n for n in self._names() if n not in infos and n != current]
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

    def _complete_infos(self) -> dict[str, dict[str, Any]]:
        """name -> ``complete.json`` of every complete checkpoint, oldest first in save order
        (those without ``seq`` first, by step). One read per checkpoint."""
        infos = {n: self.info(n) for n in self._names()}
        done = {n: i for n, i in infos.items() if i is not None}

        def order(n: str) -> tuple[int, int]:
            seq = done[n].get("seq")
            return (1, seq) if isinstance(seq, int) else (0, int(_NAME.match(n).group(1)))
        return {n: done[n] for n in sorted(done, key=order)}

    @staticmethod
    def _line(name: str, infos: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """``name`` and the checkpoints it continues (``parent`` after ``parent``), oldest
        first. Without a ``parent`` key a checkpoint continues the one saved before it."""
        order = list(infos)
        by_seq = {i.get("seq"): n for n, i in infos.items() if isinstance(i.get("seq"), int)}
        line, seen = [name], {name}
        while True:
            info = infos[line[-1]]
            if "parent" in info:
                before = by_seq.get(info["parent"]) if isinstance(info["parent"], int) else None
            else:
                at = order.index(line[-1])
                before = order[at - 1] if at > 0 else None
            if before is None or before in seen:
                return line[::-1]
            line.append(before)
            seen.add(before)

    def complete(self) -> list[str]:
        """Complete checkpoints, oldest first in save order (those without ``seq`` first)."""
        return list(self._complete_infos())

    def run_ids(self) -> set[str | None]:
        """The runs the complete checkpoints belong to (None: written before run ids)."""
        return {i.get("run_id") for i in self._complete_infos().values()}

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
        """``folder`` then the checkpoints of its line (those it continues), newest first:
        never one of an abandoned branch."""
        infos = self._complete_infos()
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        if self.path(name) != folder.rstrip("/") or name not in infos:
            return [folder]
        return [self.path(n) for n in self._line(name, infos)[::-1]]

    @staticmethod
    def load(folder: str, rank: int, storage_options: Mapping[str, Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
        """(shared state, this rank's state or None if the checkpoint was saved with fewer
        ranks, info). Raises ``CheckpointError`` naming the file that cannot be read, or that
        is missing for a rank the checkpoint was saved with."""
        info = _read_info(storage.join(folder, COMPLETE), storage_options)
        if info is None:
            raise CheckpointError(f"{storage.join(folder, COMPLETE)}: missing or not a JSON "
                                  "object")
        shared = _read_torch(storage.join(folder, STATE), storage_options)
        path = storage.join(folder, rank_file(rank))
        saved_world = info.get("world_size")
        if isinstance(saved_world, int) and rank >= saved_world:
            return shared, None, info           # a rank the checkpoint did not have
        return shared, _read_torch(path, storage_options), info

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
