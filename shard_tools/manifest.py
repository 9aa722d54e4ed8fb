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


BadFile = storage.BadFile


# ---------------------------------------------------------------- shape checks

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _need(ok: bool, url: str, what: str) -> None:
    if not ok:
        raise BadFile(f"{url}: {what}")


def _check_counts(entry: Any, url: str, where: str, fields: tuple[str, ...]) -> None:
    _need(isinstance(entry, dict), url, f"{where} is not an object")
    for k in fields:
        _need(k in entry, url, f"{where} has no {k!r}")
        ok = _is_sha256(entry[k]) if k == "sha256" else (
            isinstance(entry[k], str) and bool(entry[k]) if k == "name" else _is_int(entry[k]))
        _need(ok, url, f"{where}: {k!r} is not a valid value: {entry[k]!r}")


def check_plan(doc: Any, url: str) -> dict:
    """``doc`` if it has the shape of a ``plan.json``; ``BadFile`` naming ``url`` otherwise."""
    _need(isinstance(doc, dict), url, f"expected a JSON object, found {type(doc).__name__}")
    for k, t in (("args", dict), ("kind", str), ("shards", list)):
        _need(isinstance(doc.get(k), t), url, f"no {k!r} {t.__name__}")
    for i, sh in enumerate(doc["shards"]):
        _check_counts(sh, url, f"shard {i}", ("name", "samples", "images"))
    _need(isinstance(doc.get("rejects", []), list), url, "'rejects' is not a list")
    return doc


def check_stats(doc: Any, url: str) -> dict:
    """``doc`` if it has the shape of a ``<shard>.stats.json``; ``BadFile`` otherwise."""
    _need(isinstance(doc, dict), url, f"expected a JSON object, found {type(doc).__name__}")
    _check_counts(doc, url, "stats", ("samples", "images", "bytes", "sha256"))
    _need(isinstance(doc.get("rejects", []), list), url, "'rejects' is not a list")
    return doc


def check_manifest(doc: Any, url: str) -> dict:
    """``doc`` if it has the shape of a ``manifest.json``; ``BadFile`` naming ``url`` otherwise."""
    _need(isinstance(doc, dict), url, f"expected a JSON object, found {type(doc).__name__}")
    for k, t in (("kind", str), ("shards", list), ("totals", dict)):
        _need(isinstance(doc.get(k), t), url, f"no {k!r} {t.__name__}")
    for i, sh in enumerate(doc["shards"]):
        name = sh.get("name") if isinstance(sh, dict) else None
        _check_counts(sh, url, f"shard {name or i}", ("name", "samples", "images", "bytes",
                                                      "sha256"))
    _check_counts(doc["totals"], url, "totals", ("shards", "samples", "images", "bytes"))
    return doc


# ---------------------------------------------------------------- plan.json

def _nothing_written(out_url: str, storage_options: Mapping[str, Any] | None) -> bool:
    """No shard, stats or temporary in the output yet: a plan may still be replaced."""
    from .writer import TMP_MARK

    fs, path = storage.filesystem(out_url, storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return True
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return not any(n.endswith((".tar", STATS_SUFFIX)) or TMP_MARK in n for n in names)


def write_plan(out_url: str, plan: dict, args: Mapping[str, Any],
               storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``plan.json``, or check that an existing one describes the same conversion.

    The plan records a digest of every planned input (name, URL, size, mtime) per
    shard. A re-run with other arguments is refused. A re-run whose input differs
    is refused when a shard already written would hold other images, or the shard
    layout moved; when only shards not yet written are affected (or nothing was
    written), the plan is updated and those shards are built from the new input.
    """
    doc = {"format_version": FORMAT_VERSION, "args": dict(args), **plan}
    url = storage.join(out_url, PLAN)
    if storage.exists(url, storage_options):
        old = check_plan(storage.read_json(url, storage_options), url)
        if old["args"] != doc["args"]:
            changed = sorted(k for k in set(old["args"]) | set(doc["args"])
                             if old["args"].get(k) != doc["args"].get(k))
            raise PlanMismatch(f"{out_url} holds a conversion with other arguments "
                               f"({', '.join(changed)}); use a new --output or delete the old one")
        if old["shards"] == doc["shards"] and old.get("input_digest") == doc.get("input_digest"):
            return
        if not _nothing_written(out_url, storage_options):
            problem = _unsafe_change(old, doc, completed_shards(out_url, storage_options))
            if problem:
                raise PlanMismatch(f"{out_url}: the input changed since {PLAN} was written "
                                   f"({problem}); resuming would mix two inputs: use a new "
                                   "--output or delete the old one")
        log.info("the input changed where nothing was written yet: updating %s", url)
    storage.makedirs(out_url)
    storage.write_json_atomic(url, doc, storage_options)


def _unsafe_change(old: dict, new: dict, written: set[str]) -> str | None:
    """Why resuming ``old`` with ``new``'s input would be wrong, or None when it is safe."""
    layout = [(s["name"], s["samples"], s["images"]) for s in old["shards"]]
    if layout != [(s["name"], s["samples"], s["images"]) for s in new["shards"]]:
        return (f"{len(old['shards'])} shards of {sum(s['samples'] for s in old['shards'])} "
                f"samples planned before, {len(new['shards'])} of "
                f"{sum(s['samples'] for s in new['shards'])} now")
    if "input_sha256" not in (old["shards"] or [{}])[0]:
        return None if old["shards"] == new["shards"] else "the plan differs"
    changed = [b["name"] for a, b in zip(old["shards"], new["shards"])
               if a.get("input_sha256") != b.get("input_sha256") and b["name"] in written]
    if changed:
        shown = ", ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
        return f"the images of {len(changed)} written shard(s) differ: {shown}"
    return None


def read_plan(out_url: str, storage_options: Mapping[str, Any] | None = None) -> dict:
    url = storage.join(out_url, PLAN)
    if not storage.exists(url, storage_options):
        raise FileNotFoundError(f"no {PLAN} in {out_url}: not a streamloc shard set "
                                "(run convert first)")
    return check_plan(storage.read_json(url, storage_options), url)


def completed_shards(out_url: str, storage_options: Mapping[str, Any] | None = None,
                     check: bool = False, names: set[str] | None = None) -> set[str]:
    """Names of shards whose ``.stats.json`` exists (one listing, not one call per shard).

    With ``check``, a shard counts only when its stats file is sound and its tar
    exists with the recorded size (the stats of ``names`` only, when given):
    a resume rebuilds what was deleted or cut short since.
    """
    fs, path = storage.filesystem(out_url, storage_options)
    fs.invalidate_cache(path)  # other processes/tasks write here: never trust a cached listing
    if not fs.exists(path):
        return set()
    listing = {p["name"].rsplit("/", 1)[-1]: p for p in fs.ls(path, detail=True)}
    done = {n[: -len(STATS_SUFFIX)] for n in listing if n.endswith(STATS_SUFFIX)}
    if not check:
        return done
    sound = set()
    for name in sorted(done):
        if names is not None and name not in names:
            sound.add(name)
            continue
        surl = storage.join(out_url, name + STATS_SUFFIX)
        try:
            stats = check_stats(storage.read_json(surl, storage_options), surl)
        except BadFile as exc:
            log.warning("rebuilding %s: %s", name, exc)
            continue
        size = listing.get(name, {}).get("size")
        if size is None:
            log.warning("rebuilding %s: the shard is missing (its stats file is there)", name)
        elif int(size) != stats["bytes"]:
            log.warning("rebuilding %s: %d bytes, its stats file says %d", name, int(size),
                        stats["bytes"])
        else:
            sound.add(name)
    return sound


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
    fs, path = storage.filesystem(out_url, storage_options)
    done = completed_shards(out_url, storage_options)
    missing = [s["name"] for s in plan["shards"] if s["name"] not in done]
    if missing:
        return MergeResult(False, missing)
    sizes = {p["name"].rsplit("/", 1)[-1]: p.get("size") for p in fs.ls(path, detail=True)}
    shards, rejects = [], list(plan.get("rejects", []))
    for s in plan["shards"]:
        surl = storage.join(out_url, s["name"] + STATS_SUFFIX)
        st = check_stats(storage.read_json(surl, storage_options), surl)
        if sizes.get(s["name"]) is None:
            missing.append(s["name"])
            continue
        if int(sizes[s["name"]]) != st["bytes"]:
            raise BadFile(f"{storage.join(out_url, s['name'])}: {sizes[s['name']]} bytes, its "
                          f"stats file says {st['bytes']} (re-run convert to rebuild it)")
        shards.append({k: st[k] for k in ("samples", "images", "bytes", "sha256")}
                      | {"name": s["name"]})
        rejects += st.get("rejects", [])
    if missing:
        return MergeResult(False, missing)
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
    return check_manifest(storage.read_json(murl, storage_options), murl)
