"""Write one shard: a deterministic tar, made visible only when complete.

Members are written in plan order with fixed metadata (mtime 0, uid/gid 0,
mode 0444, ustar), so the same plan gives byte-identical shards. The tar goes
to a temporary name, then is renamed (local) or uploaded (object store);
``<shard>.stats.json`` is written last and marks the shard complete.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import queue
import signal
import socket
import tarfile
import threading
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import storage
from .jpeg import DEFAULT_MAX_PIXELS, CorruptImage, TooLarge, check_jpeg, check_pixels, shrink_jpeg
from .plan import Sample, ShardSpec
from .sources import Item, Reject

log = logging.getLogger(__name__)

STATS_SUFFIX = ".stats.json"
TMP_MARK = ".tmp-"


class StrictReject(ValueError):
    """Raised instead of skipping a bad image when ``--strict`` is on."""


@dataclass(frozen=True)
class WriteOptions:
    kind: str
    max_side: int | None = None
    quality: int = 90
    strict: bool = False
    storage_options: Mapping[str, Any] | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS


class _Sha256Thread:
    """sha256 on a second thread: hashlib releases the GIL on large buffers, so
    hashing overlaps reading and writing instead of adding to them."""

    def __init__(self):
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # signals go to the main thread, so that SIGTERM interrupts a blocked read there
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._hash.hexdigest()


class _TarWriter:
    """A minimal deterministic ustar writer that hashes and counts its bytes.

    One ``write`` per member (header + data + padding) instead of tarfile's
    16 KiB copy loop, and hashing off the main thread: copy mode must keep up
    with ``tar``.
    """

    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, _Sha256Thread(), 0

    def _write(self, b: bytes) -> None:
        self.sha256.update(b)
        self.size += len(b)
        self.raw.write(b)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        pad = -len(data) % tarfile.BLOCKSIZE
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self._write(data)
        if pad:
            self._write(bytes(pad))

    def close(self) -> None:
        """End-of-archive blocks, padded to a whole record as tar does."""
        end = self.size + 2 * tarfile.BLOCKSIZE
        self._write(bytes(2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _load_image(item: Item, opts: WriteOptions) -> tuple[bytes, int | None]:
    """(bytes to store, EXIF orientation applied to the pixels or None)."""
    data = storage.read_bytes(item.url, opts.storage_options)
    if opts.max_side:
        out = shrink_jpeg(data, opts.max_side, opts.quality, opts.max_pixels)
        return out.data, out.exif_orientation
    check_pixels(check_jpeg(data), opts.max_pixels)
    return data, None


def _member_record(item: Item, key: str, exif_orientation: int | None = None) -> dict:
    rec = copy.copy(item.record)
    rec["key"] = key
    if exif_orientation is not None:
        # resize mode turned the pixels upright; the stored JPEG has no EXIF tag left
        rec["exif_orientation_applied"] = exif_orientation
    return rec


def temporary_name(shard_name: str) -> str:
    """``.<shard>.tmp-<host>-<pid>``: a re-run can tell its own leftovers from a live run's."""
    return f".{shard_name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}"


def remote_temp_dir(out_url: str) -> str:
    """Local folder for the temporaries of a remote output: one per output URL, so a
    re-run finds (and removes) what a killed run left there."""
    digest = hashlib.sha1(out_url.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"streamloc-convert-{digest}")


def _sample_members(sample: Sample, opts: WriteOptions,
                    reject: Callable[[Item, str], None]) -> list[tuple[str, bytes]] | None:
    """The tar members of one sample, or None when nothing good is left in it."""
    def load(item: Item) -> tuple[bytes, int | None] | None:
        try:
            return _load_image(item, opts)
        except TooLarge as exc:
            reject(item, TooLarge.reason, str(exc))
        except CorruptImage as exc:
            reject(item, str(exc))
        except (OSError, ValueError) as exc:  # ValueError: a path Python cannot open
            reject(item, f"unreadable: {exc}")
        return None

    if opts.kind == "images":
        item = sample.images[0]
        loaded = load(item)
        if loaded is None:
            return None
        data, orientation = loaded
        return [(f"{sample.key}.jpg", data),
                (f"{sample.key}.json",
                 _json_bytes(_member_record(item, sample.key, orientation)))]

    members, images, queries = [], [], []
    for role, items, out, ext in (("img", sample.images, images, "img"),
                                  ("q", sample.queries, queries, "q")):
        for item in items:
            loaded = load(item)
            if loaded is None:
                continue
            data, orientation = loaded
            i = len(out)
            rec = _member_record(item, f"{sample.key}_{role}{i}", orientation)
            if role == "q":
                rec["place_id"] = sample.place_id
            out.append(rec)
            members.append((f"{sample.key}.{ext}{i}.jpg", data))
    if not images:
        for item in sample.queries:  # loaded fine, but there is no place left to hold them
            if any(rec["source"] == item.record["source"] for rec in queries):
                reject(item, "its place has no readable database image")
        return None
    place = {"key": sample.key, "place_id": sample.place_id, "images": images,
             "queries": queries}
    return [(f"{sample.key}.json", _json_bytes(place))] + members


def stats_url(out_url: str, shard_name: str) -> str:
    return storage.join(out_url, shard_name + STATS_SUFFIX)


def write_shard(spec: ShardSpec, out_url: str, opts: WriteOptions,
                on_image: Callable[[int], None] | None = None) -> dict:
    """Write ``spec`` under ``out_url``; returns the stats also saved as ``.stats.json``."""
    rejects: list[Reject] = []

    def reject(item: Item, reason: str, detail: str = "") -> None:
        if opts.strict:
            raise StrictReject(f"{item.record['source']}: {reason}"
                               + (f" ({detail})" if detail else ""))
        log.warning("skipping %s: %s%s", item.record["source"], reason,
                    f" ({detail})" if detail else "")
        rejects.append(Reject(item.record["source"], reason, "write", detail))

    final = storage.join(out_url, spec.name)
    folder = remote_temp_dir(out_url) if storage.is_remote(out_url) else storage.normalize(out_url)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, temporary_name(spec.name))
    samples = images = 0
    try:
        with open(tmp, "wb") as raw:
            tar = _TarWriter(raw)
            for sample in spec.samples:
                members = _sample_members(sample, opts, reject)
                if on_image:
                    on_image(sample.num_images)
                if members is None:
                    continue
                for name, data in members:
                    tar.add(name, data)
                samples += 1
                images += sum(1 for name, _ in members if name.endswith(".jpg"))
            tar.close()
        storage.put_file_atomic(tmp, final, opts.storage_options)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise storage.with_path(exc, final) from None
        raise
    stats = {"shard": spec.name, "samples": samples, "images": images, "bytes": tar.size,
             "sha256": tar.sha256.hexdigest(),
             "rejects": [r.to_json() for r in rejects]}
    storage.write_json_atomic(stats_url(out_url, spec.name), stats, opts.storage_options)
    return stats
