"""A lock on the part of an output that one conversion writes.

Two runs that write the same shards would delete each other's live temporaries.
Each run holds ``DST/.convert-lock-<first>-<end>.json`` (owner PID, host, SLURM
job, its shard range) while it works; array tasks have disjoint ranges and so
never conflict. A lock whose owner is gone (same host, dead PID; or the same
SLURM job, requeued) is taken over; any other is refused with a one-line error.

``FolderLock`` is the same rule for a whole folder that one process at a time may
write (the trainer's run folder): one lock file, no ranges.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Mapping

from . import storage

log = logging.getLogger(__name__)

PREFIX = ".convert-lock-"


class LockHeld(RuntimeError):
    """Another live conversion writes the same shards of this output."""


def owner_record() -> dict[str, Any]:
    """Who holds a lock: PID, host, SLURM job (``job_task``) and start time."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm": slurm_job(),
            "started": time.time()}


def owner_gone(other: Mapping[str, Any], me: Mapping[str, Any]) -> bool:
    """True when the lock's owner cannot be running any more: this very process, a dead
    PID on this host, or an earlier start of this same SLURM job (requeued)."""
    if other.get("host") == me["host"]:
        if other.get("pid") == me["pid"]:
            return True
        try:
            return not pid_alive(int(other.get("pid", 0)))
        except (TypeError, ValueError):
            return False
    return bool(me["slurm"]) and other.get("slurm") == me["slurm"]


def describe_owner(other: Mapping[str, Any] | None) -> str:
    if not other:
        return "another process"
    job = f", SLURM job {other['slurm']}" if other.get("slurm") else ""
    return f"PID {other.get('pid')} on {other.get('host')}{job}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_file(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete one file, local or remote; one that is already gone is no error."""
    fs, path = storage.filesystem(url, storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def slurm_job() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
    return f"{job}_{task}" if job else None


class _HeldWhileInside:
    """``with lock:`` acquires on entry and releases on exit, for both kinds of lock."""

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class OutputLock(_HeldWhileInside):
    """Context manager: hold the lock on shards ``[first, end)`` of ``out_url``."""

    out_url: str
    first: int
    end: int
    storage_options: Mapping[str, Any] | None = None

    @property
    def url(self) -> str:
        return storage.join(self.out_url, f"{PREFIX}{self.first:06d}-{self.end:06d}.json")

    def _owner(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "slurm": slurm_job(),
                "first": self.first, "end": self.end, "started": time.time()}

    def _others(self) -> list[tuple[str, dict | None]]:
        fs, path = storage.filesystem(self.out_url, self.storage_options)
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        out = []
        for p in fs.ls(path, detail=False):
            name = p.rsplit("/", 1)[-1]
            if not name.startswith(PREFIX):
                continue
            url = storage.join(self.out_url, name)
            try:
                out.append((url, json.loads(storage.read_bytes(url, self.storage_options))))
            except (OSError, ValueError):
                out.append((url, None))  # vanished or half-written: judged by its name alone
        return out

    def _overlaps(self, other: dict | None, url: str) -> bool:
        if other is None:
            try:
                first, end = (int(x) for x in
                              url.rsplit("/", 1)[-1][len(PREFIX):-len(".json")].split("-"))
            except ValueError:
                return False
        else:
            first, end = int(other.get("first", 0)), int(other.get("end", 0))
        return first < self.end and self.first < end

    def _stale(self, other: dict | None) -> bool:
        return other is not None and owner_gone(other, self._owner())

    def _refuse(self, url: str, other: dict | None) -> LockHeld:
        who = (f"PID {other.get('pid')} on {other.get('host')}" if other else "another run")
        return LockHeld(f"{url}: {who} is converting the same shards into this output; wait "
                        "for it to finish, or delete the lock file if that run is gone")

    def _delete(self, url: str) -> None:
        remove_file(url, self.storage_options)

    def acquire(self) -> None:
        storage.check_output_dir(self.out_url, self.storage_options)
        storage.makedirs(self.out_url, self.storage_options)
        for url, other in self._others():
            if self._overlaps(other, url):
                if not self._stale(other):
                    raise self._refuse(url, other)
                log.info("taking over the lock %s left by %s", url,
                         f"PID {other.get('pid')} on {other.get('host')}" if other else "a run")
                self._delete(url)
        owner = self._owner()
        data = json.dumps(owner).encode()
        if storage.is_remote(self.out_url):
            storage.write_bytes_atomic(self.url, data, self.storage_options)
        else:
            try:
                fd = os.open(storage.normalize(self.url), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644)
            except FileExistsError:
                raise self._refuse(self.url, None) from None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        # two runs that started together both get here: the later one (by start time,
        # host, pid) backs off, so exactly one keeps going
        key = (owner["started"], owner["host"], owner["pid"])
        for url, other in self._others():
            if url == self.url or other is None or not self._overlaps(other, url):
                continue
            if (other.get("started", 0), other.get("host", ""), other.get("pid", 0)) < key \
                    and not self._stale(other):
                self._delete(self.url)
                raise self._refuse(url, other)

    def release(self) -> None:
        try:
            self._delete(self.url)
        except OSError as exc:  # the run is over either way; the next one takes it over
            log.warning("could not remove the lock %s: %s", self.url, exc)



@dataclass
class FolderLock(_HeldWhileInside):
    """Context manager: hold ``FOLDER/<name>`` while this process writes the folder.

    Local folders: the lock file is created with ``O_EXCL``, so of two processes that
    start together exactly one gets it. Object stores have no exclusive create: the
    lock is written, read back after ``settle_s`` and kept only if it is still ours
    (last writer wins), which catches runs that start seconds apart, not at the same
    instant."""

    folder: str
    name: str
    what: str = "writing this folder"
    storage_options: Mapping[str, Any] | None = None
    settle_s: float = 1.0

    def __post_init__(self) -> None:
        self._owner = owner_record()
        self._held = False

    @property
    def url(self) -> str:
        return storage.join(self.folder, self.name)

    def _read(self) -> dict | None:
        try:
            data = json.loads(storage.read_bytes(self.url, self.storage_options))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}          # half-written or unreadable: held by an unknown process
        return data if isinstance(data, dict) else {}

    def _refuse(self, other: Mapping[str, Any] | None) -> LockHeld:
        return LockHeld(f"{self.url}: {describe_owner(other)} is {self.what}; wait for it "
                        "to finish, or delete the lock file if that process is gone")

    def _create_local(self, data: bytes) -> bool:
        try:
            fd = os.open(storage.normalize(self.url), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def acquire(self) -> None:
        storage.makedirs(self.folder, self.storage_options)
        data = json.dumps(self._owner).encode()
        for _ in range(3):                      # a stale lock removed, then a race
            other = self._read()
            if other is not None:
                if not other or not owner_gone(other, self._owner):
                    raise self._refuse(other or None)
                log.info("taking over the lock %s left by %s", self.url, describe_owner(other))
                self._delete()
            if not storage.is_remote(self.folder):
                if self._create_local(data):
                    self._held = True
                    return
                continue
            storage.write_bytes_atomic(self.url, data, self.storage_options)
            time.sleep(self.settle_s)
            if self._read() == self._owner:
                self._held = True
                return
            raise self._refuse(self._read())
        raise self._refuse(self._read())

    def _delete(self) -> None:
        remove_file(self.url, self.storage_options)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            if self._read() == self._owner:
                self._delete()
        except OSError as exc:  # the work is over either way; the next one takes it over
            log.warning("could not remove the lock %s: %s", self.url, exc)

