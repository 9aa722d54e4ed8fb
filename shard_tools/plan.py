"""The shard plan: which samples exist, their keys, and which shard holds each.

Planning is a pure function of the scanned names and the arguments (sorted
order, index keys), so every array task computes the same plan and converts
its own contiguous range of shards with no coordination.
"""
from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .sources import Item, Reject

KINDS = ("images", "places")
DEFAULT_SHARD_SIZE = {"images": 1000, "places": 250}


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: one image, or one place with its images and mined queries."""

    key: str
    images: tuple[Item, ...]
    queries: tuple[Item, ...] = ()
    place_id: str | None = None

    @property
    def num_images(self) -> int:
        return len(self.images) + len(self.queries)


@dataclass(frozen=True)
class ShardSpec:
    index: int
    name: str
    samples: tuple[Sample, ...]

    @property
    def num_images(self) -> int:
        return sum(s.num_images for s in self.samples)


@dataclass
class Plan:
    kind: str
    shards: list[ShardSpec]
    rejects: list[Reject] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "shards": [{"name": s.name, "samples": len(s.samples), "images": s.num_images}
                       for s in self.shards],
            "rejects": [r.to_json() for r in self.rejects],
        }


def _base(path: str) -> str:
    return posixpath.basename(path.replace("\\", "/"))


def plan_images(items: Sequence[Item]) -> list[Sample]:
    ordered = sorted(items, key=lambda it: it.record["source"])
    return [Sample(key=f"{i:09d}", images=(it,), place_id=it.record.get("place_id"))
            for i, it in enumerate(ordered)]


def plan_places(items: Sequence[Item], query_items: Sequence[Item] = (),
                query_pairs: Mapping[str, Sequence[str]] | None = None
                ) -> tuple[list[Sample], list[Reject]]:
    """Group images by ``place_id``; attach mined queries through ``query_pairs``.

    ``query_pairs`` maps a database source path to query names (the format of
    EarthLoc2's mined pairs); both sides are matched by file name, so the
    folder the user pointed ``--input`` at does not matter.
    """
    rejects: list[Reject] = []
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        pid = it.record.get("place_id")
        if pid is None:
            rejects.append(Reject(it.record["source"], "no place id (a query in a places "
                                  "input? pass queries with --queries/--query-pairs)", "plan"))
            continue
        groups[str(pid)].append(it)

    place_of_base = {_base(it.record["source"]): pid for pid, its in groups.items() for it in its}
    queries_by_place: dict[str, set[str]] = defaultdict(set)
    query_by_base = {_base(q.record["source"]): q for q in query_items}
    for db_path, qnames in (query_pairs or {}).items():
        pid = place_of_base.get(_base(db_path))
        if pid is None:
            continue  # a mined tile outside this input: nothing to attach it to
        for q in qnames:
            if _base(q) in query_by_base:
                queries_by_place[pid].add(_base(q))
    missing = {_base(q) for qs in (query_pairs or {}).values() for q in qs} - set(query_by_base)
    rejects += [Reject(q, "query named in --query-pairs not found in --queries", "plan")
                for q in sorted(missing)]

    samples = []
    for i, pid in enumerate(sorted(groups)):
        images = sorted(groups[pid], key=lambda it: (it.record.get("year") or 0,
                                                     it.record["source"]))
        queries = tuple(query_by_base[b] for b in sorted(queries_by_place.get(pid, ())))
        samples.append(Sample(key=f"{i:09d}", images=tuple(images), queries=queries,
                              place_id=pid))
    return samples, rejects


def split_shards(samples: Sequence[Sample], shard_size: int, prefix: str) -> list[ShardSpec]:
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    return [ShardSpec(index=j, name=f"{prefix}-{j:06d}.tar",
                      samples=tuple(samples[i:i + shard_size]))
            for j, i in enumerate(range(0, len(samples), shard_size))]


def task_range(num_shards: int, task_index: int, num_tasks: int) -> range:
    """Contiguous, balanced range of shard indices for one array task."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index must be in [0, {num_tasks}), got {task_index}")
    return range(num_shards * task_index // num_tasks,
                 num_shards * (task_index + 1) // num_tasks)
