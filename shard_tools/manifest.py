"""``plan.json`` (what a shard set will hold) and ``manifest.json`` (what it holds).

Every array task writes the same ``plan.json``; ``merge_manifest`` may be
called by every task and completes the manifest once all shards have stats.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from . import storage
from .writer import STATS_SUFFIX

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
REJECTS = "rejects.jsonl"


class PlanMismatch(ValueError):
    """The output already holds a conversion made with other inputs or arguments."""


def write_plan(out_url: str, plan: dict, args: Mapping[str, Any],
               storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``plan.json``, or check that an existing one describes the same conversion."""
    doc = {"format_version": FORMAT_VERSION, "args": dict(args), **plan}
    url = storage.join(out_url, PLAN)
    if storage.exists(url, storage_options):
        old = storage.read_json(url, storage_options)
        if old.get("args") != doc["args"] or old.get("shards") != doc["shards"]:
            changed = sorted(k for k in set(old.get("args", {})) | set(doc["args"])
                             if old.get("args", {}).get(k) != doc["args"].get(k))
            what = f"arguments differ ({', '.join(changed)})" if changed else "inputs differ"
            raise PlanMismatch(f"{out_url} holds a conversion with other inputs: {what}; "
                               "use a new --output or delete the old one")
        return
    storage.makedirs(out_url)
    storage.write_json_atomic(url, doc, storage_options)


def read_plan(out_url: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    url = storage.join(out_url, PLAN)
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"no {PLAN} in {out_url}: not a streamloc shard set "
                                "(run convert first)")
    return storage.read_json(url, storage_options)


def completed_shards(out_url: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Names of shards whose ``.stats.json`` exists (one listing, not one call per shard)."""
    fs, path = storage.filesystem(out_url, storage_options)
    fs.invalidate_cache(path)  # other processes/tasks write here: never trust a cached listing
    if not fs.exists(path):
        return set()
    names = (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return {n[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}


@dataclass
class MergeResult:
    complete: bool
    missing: list[str]
    manifest: dict | None = None


def merge_manifest(out_url: str, storage_options: Mapping[str, Any] | None = None
                   ) -> MergeResult:
    """Merge per-shard stats into ``manifest.json`` and ``rejects.jsonl`` once all exist."""
    out_url = storage.dataset_root(out_url)
    plan = read_plan(out_url, storage_options)
    done = completed_shards(out_url, storage_options)
    missing = [s["name"] for s in plan["shards"] if s["name"] not in done]
    if missing:
        return MergeResult(False, missing)
    shards, rejects = [], list(plan.get("rejects", []))
    for s in plan["shards"]:
        st = storage.read_json(storage.join(out_url, s["name"] + STATS_SUFFIX), storage_options)
        shards.append({k: st[k] for k in ("samples", "images", "bytes", "sha256")}
                      | {"name": s["name"]})
        rejects += st.get("rejects", [])
    rejects.sort(key=lambda r: (r["path"], r["stage"], r["reason"]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": plan["kind"],
        "args": plan["args"],
        "shards": shards,
        "totals": {"shards": len(shards), "samples": sum(s["samples"] for s in shards),
                   "images": sum(s["images"] for s in shards),
                   "bytes": sum(s["bytes"] for s in shards), "rejects": len(rejects)},
    }
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects)
    storage.write_bytes_atomic(storage.join(out_url, REJECTS), lines.encode(), storage_options)
    storage.write_json_atomic(storage.join(out_url, MANIFEST), manifest, storage_options)
    return MergeResult(True, [], manifest)


def load_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The manifest of a shard set (``url`` is the set's folder or the manifest itself)."""
    murl = storage.join(storage.dataset_root(url), MANIFEST)
    if not storage.exists(murl, storage_options):
        raise FileNotFoundError(f"no manifest at {murl} (incomplete conversion? run "
                                "`python -m shard_tools manifest DST`)")
    return storage.read_json(murl, storage_options)
