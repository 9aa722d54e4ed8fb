"""Streaming place-grouped training batches from place shards (local or S3).

The flow of one epoch, the same on every rank without communication:

1. the manifest gives every shard's place count, trusted only for files of the size it
   records (a cut or rewritten shard is refused before planning); a shard that still
   yields fewer places than its entry counts is a counted shard error;
2. the shard list is shuffled by (seed, epoch), then stably sorted by size, so
   that equal-size shards land anywhere but every (rank, stream) slot receives
   the same number of places in every epoch;
3. shards are split by rank, then by stream (one stream per DataLoader worker);
4. each stream expands its tars, drops broken samples (counted), keeps places
   with at least ``min_images_per_place`` images, and fills a place buffer
   seeded by (seed, epoch, rank, stream);
5. a batch takes P places from the buffer: at random, or (``spatial``) a random
   seed place and its nearest neighbours by centre;
6. per place K database images at random and, with ``mine_queries``, mined
   queries not yet used in the batch, labelled with the place;
7. JPEGs are decoded in draft mode at the size the augmentation needs, then augmented.

Step ``s`` of an epoch is always made by stream ``s % streams``; its random choices
are seeded by (seed, epoch, rank, s). Restarting at (epoch, step) therefore
replays the buffers without decoding anything and gives the same batches as an
uninterrupted run. Every rank yields exactly ``steps_per_epoch`` batches: by
default the largest number every rank fills without repeating a place; if a
stream runs dry anyway (bad data, small places, a larger ``steps_per_epoch``)
it starts another pass over its shards and counts those places as ``repeated``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import multiprocessing
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shard_tools import reader, storage
from shard_tools.jpeg import CorruptImage, check_jpeg, decode_jpeg

from .augment import Augmentation, apply_grouped, build_augmentation, normalize
from .models.config import CheckedConfig, image_hw

__all__ = ["DataConfig", "Batch", "TrainData", "build_train_data", "EpochPlan", "plan_epoch",
           "COUNTERS"]

log = logging.getLogger(__name__)

GROUPINGS = ("random", "spatial")
# what a stream counts; Batch.counts and TrainData.counters() use these names
COUNTERS = ("places", "images", "queries", "shard_errors", "bad_samples", "missing_members",
            "bad_images", "small_places", "repeated")
SKIP_COUNTERS = ("shard_errors", "bad_samples", "missing_members", "bad_images", "small_places")


class NoUsableDataError(RuntimeError):
    """A stream has no usable place left (every one skipped): the shards are bad or too small
    for the recipe. Raised instead of waiting forever for a batch."""


def error_message(exc: BaseException) -> str:
    """The original one-line message of ``exc``, also after a DataLoader worker re-raised it
    (whose message starts "Caught X in DataLoader worker process N." and ends with the
    original ``module.X: message`` line)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        marker = f"{type(exc).__name__}: "
        for ln in reversed(lines):
            if marker in ln:
                return ln.split(marker, 1)[1].strip()
    return lines[0].strip()


@dataclass
class DataConfig(CheckedConfig):
    """The ``data:`` section of a recipe.

    - ``train_shards``: a place-shard set (folder, ``manifest.json`` or ``s3://...``);
    - ``places_per_batch`` (P), ``images_per_place`` (K), ``min_images_per_place``
      (null: K); places with fewer images are skipped and counted;
    - ``mine_queries``: add up to ``queries_per_place`` mined queries per place (EarthLoc2);
    - ``augment`` / ``query_augment``: preset names (``trainer.augment``);
      ``augment_options``: keyword args of the ``augment`` preset (EarthLoc2: brightness 0.4);
    - ``batch_grouping``: ``random`` or ``spatial`` (a neighbourhood per batch);
    - ``steps_per_epoch``: null derives it from the manifest;
    - ``shuffle_buffer``: places held per stream; ``workers``: DataLoader processes
      (also the number of streams, which fixes the order: keep it when resuming);
    - ``resample``: draw shards with replacement (places may repeat within an epoch).
    """

    CONFIG_NAME = "data config"

    train_shards: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    places_per_batch: int = 32
    images_per_place: int = 4
    min_images_per_place: int | None = None
    mine_queries: bool = False
    queries_per_place: int = 1
    augment: str = "none"
    augment_options: dict[str, Any] = field(default_factory=dict)
    query_augment: str = "earthloc-query"
    batch_grouping: str = "random"
    steps_per_epoch: int | None = None
    shuffle_buffer: int = 1000
    workers: int = 4
    prefetch_factor: int = 2
    persistent_workers: bool = True
    pin_memory: bool | None = None
    seed: int = 0
    resample: bool = False
    read_retries: int = 3
    loader_timeout: float = 600.0

    def __post_init__(self) -> None:
        self.storage_options = dict(self.storage_options or {})
        self.augment_options = dict(self.augment_options or {})
        if self.min_images_per_place is None:
            self.min_images_per_place = self.images_per_place
        for name in ("places_per_batch", "images_per_place", "min_images_per_place",
                     "queries_per_place", "shuffle_buffer", "prefetch_factor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.read_retries < 0 or not self.loader_timeout >= 0:
            raise ValueError("data.read_retries and data.loader_timeout must be >= 0, got "
                             f"{self.read_retries} and {self.loader_timeout}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"data.steps_per_epoch must be >= 1 or null, got {self.steps_per_epoch}")
        if self.batch_grouping not in GROUPINGS:
            raise ValueError(f"data.batch_grouping must be one of {', '.join(GROUPINGS)}, "
                             f"got {self.batch_grouping!r}")
        build_augmentation(self.query_augment, 8)   # unknown names raise with a suggestion
        try:
            build_augmentation(self.augment, 8, **self.augment_options)
        except TypeError as exc:
            raise ValueError(f"data.augment_options do not fit '{self.augment}': {exc}") from None

    @property
    def streams(self) -> int:
        return max(1, int(self.workers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- the batch

@dataclass
class Batch:
    """One training step's data on one rank.

    Rows are the database images place by place, then the mined queries.
    ``images`` ``[N, 3, H, W]`` are ``uint8`` (0..255, not normalised) while the batch is
    on the CPU: workers send a quarter of the bytes of float32. ``to(device)`` returns
    them as float32 with ImageNet normalisation (``trainer.augment.normalize``), computed
    on ``device`` after the copy; call it before giving images to a model.
    ``labels`` number the places of the batch; a query carries its place's label.
    ``footprints`` ``[N, 4, 2]`` (lat, lon; NaN where a row has none) is None when no
    row has one; ``positions`` ``[N, 2]`` are the rows' (lat, lon) centres.
    ``skipped`` counts bad or unusable data met while making this batch; ``counts``
    splits it by kind (``COUNTERS``).
    """

    images: Tensor
    labels: Tensor
    is_query: Tensor
    footprints: Tensor | None
    positions: Tensor | None
    keys: list[str]
    epoch: int
    step: int
    skipped: int = 0
    rank: int = 0
    place_keys: list[str] = field(default_factory=list)
    query_keys: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device, non_blocking: bool = True) -> "Batch":
        """On ``device``, images as normalised float32 (uint8 crosses the bus, then converts)."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, images=normalize(move(self.images)), labels=move(self.labels),
                                   is_query=move(self.is_query), footprints=move(self.footprints),
                                   positions=move(self.positions))

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread."""
        def pin(t):
            return None if t is None else t.pin_memory()
        return dataclasses.replace(self, images=pin(self.images), labels=pin(self.labels),
                                   is_query=pin(self.is_query), footprints=pin(self.footprints),
                                   positions=pin(self.positions))

    def summary(self) -> dict[str, Any]:
        """The JSON line of ``python -m trainer inspect-data``."""
        return {"epoch": self.epoch, "step": self.step, "rank": self.rank,
                "keys": list(self.place_keys), "queries": list(self.query_keys),
                "skipped": self.skipped}


# ---------------------------------------------------------------- the epoch plan

def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def _seed_int(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each (rank, stream) reads in one epoch, and the step count."""

    epoch: int
    slots: list[list[list[reader.ShardInfo]]]   # [rank][stream] -> shards in reading order
    steps_per_epoch: int
    resample: bool


def stream_shards(shards: Sequence[reader.ShardInfo], seed: int, epoch: int, world_size: int,
                  streams: int) -> list[list[list[reader.ShardInfo]]]:
    """The epoch's shard order split by rank, then by stream.

    Shuffled by (seed, epoch) identically on every rank, then stably sorted by
    size (descending): slot (r, w) always receives the shards at sorted positions
    ``r + R*w + R*W*j``, so its place count is the same in every epoch while the
    equal-size shards it gets change. Within a slot, the reading order is shuffled
    by (seed, epoch, rank, stream).
    """
    order = _rng(seed, epoch).permutation(len(shards))
    ordered = sorted((shards[i] for i in order), key=lambda s: -s.samples)
    slots = []
    for r in range(world_size):
        per_rank = ordered[r::world_size]
        row = []
        for w in range(streams):
            mine = per_rank[w::streams]
            perm = _rng(seed, epoch, r, w, 17).permutation(len(mine))
            row.append([mine[i] for i in perm])
        slots.append(row)
    return slots


def steps_per_stream(steps: int, streams: int, stream: int, start_step: int = 0) -> int:
    """How many of steps ``start_step .. steps-1`` stream ``stream`` makes (step s -> s % streams)."""
    first = start_step + ((stream - start_step) % streams)
    return 0 if first >= steps else (steps - 1 - first) // streams + 1


def fillable_steps(slots: list[list[list[reader.ShardInfo]]], places_per_batch: int) -> int:
    """The most steps every rank fills without repeating a place (step s from stream s % W)."""
    best = None
    for row in slots:
        streams = len(row)
        for w, mine in enumerate(row):
            capacity = sum(s.samples for s in mine) // places_per_batch
            limit = streams * capacity + w
            best = limit if best is None else min(best, limit)
    return int(best or 0)


def plan_epoch(shards: Sequence[reader.ShardInfo], cfg: DataConfig, world_size: int,
               epoch: int = 0) -> EpochPlan:
    """The shard split and step count of ``epoch`` (the step count is the same every epoch)."""
    streams = cfg.streams
    resample = cfg.resample
    if not shards:
        raise ValueError("the shard set is empty")
    if not resample and len(shards) < world_size * streams:
        resample = True
    slots = stream_shards(shards, cfg.seed, epoch, world_size, streams)
    if resample:
        total = sum(s.samples for s in shards)
        default = max(1, total // (world_size * cfg.places_per_batch))
    else:
        default = fillable_steps(slots, cfg.places_per_batch)
        if default < 1:
            raise ValueError(f"too few places for one batch of {cfg.places_per_batch} places on "
                             f"every rank and stream ({sum(s.samples for s in shards)} places, "
                             f"{world_size} ranks x {streams} streams); lower "
                             "data.places_per_batch or data.workers, or set data.resample")
    steps = cfg.steps_per_epoch or default
    return EpochPlan(epoch, slots, int(steps), resample)


# ---------------------------------------------------------------- one stream

class _Counts:
    """A stream's counters; batches carry the increments since the previous batch."""

    def __init__(self) -> None:
        self.total = dict.fromkeys(COUNTERS, 0)
        self.pending = dict.fromkeys(COUNTERS, 0)
        self._last_log = 0.0
        self._suppressed = 0

    def add(self, name: str, n: int = 1, why: str | None = None) -> None:
        self.total[name] += n
        self.pending[name] += n
        if why is not None:
            now = time.monotonic()
            if now - self._last_log >= 10.0:   # at most one warning per 10 s per stream
                more = f" (+{self._suppressed} more not shown)" if self._suppressed else ""
                log.warning("skipped (%s): %s%s", name, why, more)
                self._last_log, self._suppressed = now, 0
            else:
                self._suppressed += 1

    def take(self) -> dict[str, int]:
        out, self.pending = self.pending, dict.fromkeys(COUNTERS, 0)
        return out


@dataclass
class _Place:
    key: str
    place_id: Any
    images: list[tuple[dict, bytes]]
    queries: list[tuple[dict, bytes]]
    center: tuple[float, float]
    repeated: bool


def _center(records: Iterable[dict]) -> tuple[float, float]:
    pts = [(r.get("lat"), r.get("lon")) for r in records]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    if not pts:
        return (math.nan, math.nan)
    lat = sum(p[0] for p in pts) / len(pts)
    # circular mean of longitudes, so a place across the antimeridian stays in place
    s = sum(math.sin(math.radians(p[1])) for p in pts)
    c = sum(math.cos(math.radians(p[1])) for p in pts)
    return (lat, math.degrees(math.atan2(s, c)))


class _Stream:
    """One (epoch, rank, stream) sequence of batches, made on demand."""

    def __init__(self, owner: "_StreamSpec", epoch: int, stream: int) -> None:
        self.o = owner
        self.cfg = owner.cfg
        self.epoch, self.stream = epoch, stream
        self.plan = owner.plan(epoch)
        self.counts = _Counts()
        self._usable = 0

    # -- shards -> samples
    def _shard_urls(self) -> Iterator[tuple[reader.ShardInfo | None, bool]]:
        """(shard, repeated) forever: the slot's shards pass after pass (or resampled);
        ``(None, ...)`` marks the end of a pass."""
        cfg, r, w = self.cfg, self.o.rank, self.stream
        if self.plan.resample:
            rng = _rng(cfg.seed, self.epoch, r, w, 29)
            shards = self.o.shards
            while True:
                before = self._usable
                for _ in range(len(shards)):
                    yield shards[int(rng.integers(len(shards)))], False
                if self._usable == before:
                    return          # a whole round gave nothing usable: stop, do not spin
        mine = self.plan.slots[r][w]
        yield from ((s, False) for s in mine)
        yield None, False
        for again in itertools.count(1):
            if self._usable == 0:
                return
            perm = _rng(cfg.seed, self.epoch, r, w, 31, again).permutation(len(mine))
            yield from ((mine[i], True) for i in perm)
            yield None, True

    def _samples(self, shards: Iterator[tuple[reader.ShardInfo | None, bool]]
                 ) -> Iterator[tuple[dict | None, bool]]:
        """Tar expansion with retries for remote shards; a broken shard ends early, counted,
        and so does one that ends cleanly with fewer samples than its manifest entry."""
        opts = self.cfg.storage_options
        for shard, repeated in shards:
            if shard is None:
                yield None, repeated
                continue
            url = shard.url
            attempts = 1 + (self.cfg.read_retries if storage.is_remote(url) else 0)
            done = 0
            for attempt in range(attempts):
                try:
                    with reader.open_shard(url, opts) as f:
                        for i, sample in enumerate(reader.iter_tar_samples(f, url)):
                            if i >= done:
                                done += 1
                                yield sample, repeated
                    if done < shard.samples:
                        raise tarfile.ReadError(reader.shortfall_message(done, shard.samples))
                    break
                except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
                    if attempt + 1 < attempts:
                        time.sleep(min(0.5 * 2 ** attempt, 8.0))
                        continue
                    if not repeated:    # a refill pass meets the same problems: count once
                        self.counts.add("shard_errors", 1, f"{url}: {type(exc).__name__}: {exc}")

    def _places(self, samples: Iterator[tuple[dict | None, bool]]) -> Iterator[_Place | None]:
        cfg = self.cfg
        for sample, repeated in samples:
            if sample is None:
                yield None          # end of a pass
                continue
            key = sample.get("__key__", "?")

            def skip(name: str, why: str | None) -> None:
                if not repeated:    # a refill pass meets the same problems: count once
                    self.counts.add(name, 1, why)

            try:
                place = json.loads(sample["json"])
                recs, qrecs = list(place["images"]), list(place.get("queries") or [])
            except (KeyError, TypeError, ValueError) as exc:
                skip("bad_samples", f"{key}: no readable place record ({exc})")
                continue
            imgs, qs = reader.member_images(sample)
            images, queries = [], []
            for role, records, members, out in (("img", recs, imgs, images),
                                                ("q", qrecs, qs, queries)):
                for i, rec in enumerate(records):
                    data = sample.get(f"{role}{i}.jpg")
                    if data is None:
                        skip("missing_members", f"{key}.{role}{i}.jpg is missing")
                        continue
                    try:
                        check_jpeg(data)
                    except CorruptImage as exc:
                        skip("bad_images", f"{key}.{role}{i}.jpg: {exc}")
                        continue
                    out.append((rec, data))
            if len(images) < cfg.min_images_per_place:
                skip("small_places", None)
                continue
            self._usable += 1
            yield _Place(key, place.get("place_id"), images, queries,
                         _center(r for r, _ in images), repeated)

    def _groups(self, places: Iterator[_Place | None]) -> Iterator[list[_Place]]:
        """Batches of P distinct places from a seeded buffer (random or spatial).

        The buffer stops filling at the end of a pass and drains first, so a
        place is repeated only when its pass cannot fill another batch."""
        cfg = self.cfg
        P = cfg.places_per_batch
        size = max(cfg.shuffle_buffer, P)
        rng = _rng(cfg.seed, self.epoch, self.o.rank, self.stream, 41)
        buf: list[_Place] = []
        pick = self._spatial_pick if cfg.batch_grouping == "spatial" else self._random_pick
        exhausted = paused = False
        while True:
            if paused and len({p.key for p in buf}) < P:
                paused = False
            while not (exhausted or paused) and len(buf) < size:
                nxt = next(places, StopIteration)
                if nxt is StopIteration:
                    exhausted = True
                elif nxt is None:
                    paused = len(buf) >= P
                else:
                    buf.append(nxt)
            if not buf:
                raise NoUsableDataError(
                    f"no usable place in the shards of rank {self.o.rank}, stream "
                    f"{self.stream} (all skipped: {self.counts.total})")
            chosen = pick(buf, P, rng)
            picked = [buf[i] for i in chosen]
            for i in sorted(chosen, reverse=True):
                buf[i] = buf[-1]
                buf.pop()
            again = sum(p.repeated for p in picked)
            if again:
                self.counts.add("repeated", again, f"{again} places used a second time this "
                                "epoch (the stream ran out of places)")
            yield picked

    @staticmethod
    def _first_distinct(buf: list[_Place], order: Iterable[int], P: int) -> list[int]:
        """The first ``P`` buffer slots in ``order`` that hold distinct places."""
        chosen, seen = [], set()
        for i in order:
            if buf[i].key in seen:
                continue
            chosen.append(int(i))
            seen.add(buf[i].key)
            if len(chosen) == P:
                break
        return chosen

    @classmethod
    def _random_pick(cls, buf: list[_Place], P: int, rng: np.random.Generator) -> list[int]:
        return cls._first_distinct(buf, rng.permutation(len(buf)), P)

    @classmethod
    def _spatial_pick(cls, buf: list[_Place], P: int, rng: np.random.Generator) -> list[int]:
        centers = np.array([p.center for p in buf], dtype=np.float64)
        lat, lon = np.radians(centers[:, 0]), np.radians(centers[:, 1])
        xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)
        seed = int(rng.integers(len(buf)))
        if np.isnan(xyz[seed]).any():
            dist = rng.random(len(buf)) + 2.0           # no position: a random batch
        else:
            dist = 1.0 - xyz @ xyz[seed]
            dist = np.where(np.isnan(dist), 3.0 + rng.random(len(buf)), dist)
        dist[seed] = -1.0
        return cls._first_distinct(buf, np.argsort(dist, kind="stable"), P)

    def batches(self, start_step: int = 0, decode: bool = True) -> Iterator[Batch]:
        """This stream's batches from ``start_step`` on (earlier ones are replayed undecoded)."""
        steps, W = self.plan.steps_per_epoch, self.o.cfg.streams
        pipeline = wds.DataPipeline(self._shard_urls, self._samples, self._places, self._groups)
        groups = iter(pipeline)
        for step in range(self.stream, steps, W):
            picked = next(groups, None)
            if picked is None:
                raise RuntimeError(f"stream {self.stream} of rank {self.o.rank} ran out of places")
            if step < start_step:
                self.counts.take()      # reported by the run that made this step
                continue
            yield self.o.assemble(picked, self.epoch, step, self.counts.take(), decode)


# ---------------------------------------------------------------- assembling a batch

def _stack(tensors: list[Tensor], shape: tuple[int, int, int]) -> Tensor:
    """``torch.stack`` of uint8 images; in a DataLoader worker straight into shared memory,
    as ``default_collate`` does, so sending the batch costs no further copy."""
    if not tensors:
        return torch.empty(0, *shape, dtype=torch.uint8)
    out = None
    if get_worker_info() is not None:
        first = tensors[0]
        storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


class _StreamSpec:
    """Everything a worker needs to make batches (picklable: no open files, no loader)."""

    def __init__(self, cfg: DataConfig, shards: list[reader.ShardInfo], image_size: tuple[int, int],
                 rank: int, world_size: int, steps_per_epoch: int) -> None:
        self.cfg, self.shards, self.image_size = cfg, shards, image_size
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = steps_per_epoch
        self._augs: tuple[Augmentation, Augmentation] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_augs"] = None
        return state

    def plan(self, epoch: int) -> EpochPlan:
        cfg = self.cfg.replace(steps_per_epoch=self.steps_per_epoch)
        return plan_epoch(self.shards, cfg, self.world_size, epoch)

    @property
    def augs(self) -> tuple[Augmentation, Augmentation]:
        if self._augs is None:
            self._augs = (build_augmentation(self.cfg.augment, self.image_size,
                                             **self.cfg.augment_options),
                          build_augmentation(self.cfg.query_augment, self.image_size))
        return self._augs

    def _decode(self, data: bytes, aug: Augmentation, counts: dict, what: str):
        try:
            return decode_jpeg(data, aug.decode_side)
        except CorruptImage as exc:
            counts["bad_images"] = counts.get("bad_images", 0) + 1
            log.warning("skipped (bad_images): %s: %s", what, exc)
            return None

    def assemble(self, places: list[_Place], epoch: int, step: int, counts: dict[str, int],
                 decode: bool = True) -> Batch:
        cfg = self.cfg
        rng = _rng(cfg.seed, epoch, self.rank, step, 53)
        rows: list[tuple[dict, bytes, int, bool]] = []       # record, bytes, label, is_query
        for label, place in enumerate(places):
            n = len(place.images)
            k = min(cfg.images_per_place, n)
            pick = sorted(rng.choice(n, size=k, replace=False).tolist())
            rows += [(place.images[i][0], place.images[i][1], label, False) for i in pick]
        if cfg.mine_queries:
            used: set[str] = set()
            for label, place in enumerate(places):
                free = [q for q in place.queries
                        if (q[0].get("source") or q[0].get("key")) not in used]
                if not free:
                    continue
                take = min(cfg.queries_per_place, len(free))
                for i in sorted(rng.choice(len(free), size=take, replace=False).tolist()):
                    rec, data = free[i]
                    used.add(rec.get("source") or rec.get("key"))
                    rows.append((rec, data, label, True))
        aug_seed = _seed_int(cfg.seed, epoch, self.rank, step, 59)
        H, W = self.image_size
        counts = dict(counts)
        if decode:
            db_aug, q_aug = self.augs
            keep, tensors = [], []
            for is_q in (False, True):
                part = [r for r in rows if r[3] == is_q]
                aug = q_aug if is_q else db_aug
                ims = [self._decode(d, aug, counts, rec.get("key", "?")) for rec, d, _, _ in part]
                good = [(r, im) for r, im in zip(part, ims) if im is not None]
                groups = [r[0].get("year") for r, _ in good]
                tensors += apply_grouped(aug, [im for _, im in good], groups,
                                         aug_seed + (1 if is_q else 0))
                keep += [r for r, _ in good]
            rows = keep
            images = _stack(tensors, (3, H, W))
        else:
            images = torch.empty(len(rows), 0, H, W, dtype=torch.uint8)
        recs = [r[0] for r in rows]
        fps = [r.get("footprint") for r in recs]
        footprints = None
        if any(fp for fp in fps):
            footprints = torch.full((len(recs), 4, 2), float("nan"))
            for i, fp in enumerate(fps):
                if fp and len(fp) == 4:
                    footprints[i] = torch.tensor(fp, dtype=torch.float32)
        pos = [(r.get("lat"), r.get("lon")) for r in recs]
        positions = None
        if any(a is not None and b is not None for a, b in pos):
            positions = torch.tensor([[math.nan if a is None else a, math.nan if b is None else b]
                                      for a, b in pos], dtype=torch.float64)
        is_query = torch.tensor([r[3] for r in rows], dtype=torch.bool)
        skipped = sum(counts.get(k, 0) for k in SKIP_COUNTERS)
        used_places = sorted({r[2] for r in rows})
        counts["places"] = counts.get("places", 0) + len(used_places)
        counts["images"] = counts.get("images", 0) + int((~is_query).sum())
        counts["queries"] = counts.get("queries", 0) + int(is_query.sum())
        return Batch(images=images, labels=torch.tensor([r[2] for r in rows], dtype=torch.long),
                     is_query=is_query, footprints=footprints, positions=positions,
                     keys=[r.get("key", "") for r in recs], epoch=epoch, step=step,
                     skipped=skipped, rank=self.rank,
                     place_keys=[p.key for p in places],
                     query_keys=[r[0].get("key", "") for r in rows if r[3]], counts=counts)


# ---------------------------------------------------------------- workers and the loader

class _EpochDataset(IterableDataset):
    """The DataLoader's dataset: worker d makes steps start+d, start+d+W, ...

    The epoch and start step live in shared memory so that persistent workers
    see them when the main process starts the next iteration.
    """

    def __init__(self, spec: _StreamSpec, decode: bool = True) -> None:
        super().__init__()
        self.spec = spec
        self.decode = decode
        ctx = multiprocessing.get_context()
        self._epoch = ctx.Value("q", 0, lock=False)
        self._start = ctx.Value("q", 0, lock=False)

    def set_position(self, epoch: int, start_step: int) -> None:
        self._epoch.value, self._start.value = int(epoch), int(start_step)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            raise RuntimeError("_EpochDataset runs in DataLoader workers only")
        W = self.spec.cfg.streams
        if info.num_workers != W:
            raise RuntimeError(f"{info.num_workers} workers for {W} streams")
        epoch, start = int(self._epoch.value), int(self._start.value)
        stream = (start + info.id) % W
        storage.register_webdataset_schemes(self.spec.cfg.storage_options or None)
        yield from _Stream(self.spec, epoch, stream).batches(start, self.decode)


def _interleave(spec: _StreamSpec, epoch: int, start_step: int, decode: bool) -> Iterator[Batch]:
    """All streams in this process, step by step (workers = 0, inspect-data)."""
    W = spec.cfg.streams
    its = [_Stream(spec, epoch, w).batches(start_step, decode) for w in range(W)]
    for step in range(start_step, spec.steps_per_epoch):
        yield next(its[step % W])


class TrainData:
    """Exactly ``steps_per_epoch`` batches per epoch on this rank; see the module docstring."""

    def __init__(self, cfg: DataConfig, image_size: tuple[int, int], rank: int, world_size: int,
                 num_workers: int | None = None, decode: bool = True) -> None:
        if not cfg.train_shards:
            raise ValueError("data.train_shards is not set")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.image_size = image_hw(image_size)
        storage.register_webdataset_schemes(cfg.storage_options or None)
        self.shards = reader.list_shards(cfg.train_shards, cfg.storage_options or None, "places",
                                         "training")
        # steps are planned from the manifest's counts: only files of the recorded size
        reader.check_shard_sizes(self.shards, cfg.storage_options or None)
        plan = plan_epoch(self.shards, cfg, world_size, 0)
        if plan.resample and not cfg.resample:
            log.warning("%d shards for %d ranks x %d streams: resampling shards (places may "
                        "repeat within an epoch); write more shards to avoid it",
                        len(self.shards), world_size, cfg.streams)
        elif not plan.resample and cfg.steps_per_epoch:
            fill = fillable_steps(plan.slots, cfg.places_per_batch)
            if cfg.steps_per_epoch > fill:
                log.warning("data.steps_per_epoch=%d is more than the %d steps the shards fill "
                            "without repeating a place; repeated places are counted",
                            cfg.steps_per_epoch, fill)
        self.resampling = plan.resample
        self.steps_per_epoch = plan.steps_per_epoch
        self.num_places = sum(s.samples for s in self.shards)
        self.decode = decode
        self.num_workers = cfg.workers if num_workers is None else num_workers
        if self.num_workers not in (0, cfg.streams):
            raise ValueError(f"num_workers must be 0 or data.workers ({cfg.streams})")
        self._spec = _StreamSpec(cfg, self.shards, self.image_size, rank, world_size,
                                 self.steps_per_epoch)
        self._dataset: _EpochDataset | None = None
        self._loader: DataLoader | None = None
        self._totals = dict.fromkeys(COUNTERS, 0)

    def _get_loader(self) -> DataLoader:
        if self._loader is None:
            cfg = self.cfg
            pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
            self._dataset = _EpochDataset(self._spec, self.decode)
            self._loader = DataLoader(self._dataset, batch_size=None, num_workers=self.num_workers,
                                      persistent_workers=cfg.persistent_workers,
                                      prefetch_factor=cfg.prefetch_factor, pin_memory=pin,
                                      timeout=cfg.loader_timeout)
        return self._loader

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Batches ``start_step .. steps_per_epoch-1`` of ``epoch``, identical to an
        uninterrupted run's (same world size and ``data.workers``)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        if start_step == self.steps_per_epoch:
            return
        if self.num_workers == 0:
            source: Iterable[Batch] = _interleave(self._spec, epoch, start_step, self.decode)
        else:
            loader = self._get_loader()
            self._dataset.set_position(epoch, start_step)
            source = loader
        expected = start_step
        for batch in source:
            if (batch.epoch, batch.step) != (epoch, expected):
                raise RuntimeError(f"data out of order: got epoch {batch.epoch} step {batch.step}, "
                                   f"expected epoch {epoch} step {expected}")
            for k, v in batch.counts.items():
                self._totals[k] = self._totals.get(k, 0) + v
            expected += 1
            yield batch
        if expected != self.steps_per_epoch:
            raise RuntimeError(f"rank {self.rank} made {expected} of {self.steps_per_epoch} steps")

    def counters(self) -> dict[str, int]:
        """Totals over the batches this object has yielded (for the trainer's logs)."""
        return dict(self._totals)

    def close(self) -> None:
        """Stop persistent workers."""
        if self._loader is not None:
            it = getattr(self._loader, "_iterator", None)
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            self._loader = None


def build_train_data(cfg: DataConfig | Mapping[str, Any], image_size: int | tuple[int, int],
                     rank: int = 0, world_size: int = 1, **kwargs: Any) -> TrainData:
    """The training data of one rank. ``image_size`` comes from the model section."""
    return TrainData(DataConfig.coerce(cfg), image_hw(image_size), rank, world_size, **kwargs)
