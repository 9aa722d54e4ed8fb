"""Verify a shard set against its manifest: bytes, sha256, counts, records, images."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from typing import Any, Mapping

from tqdm.auto import tqdm

from . import storage
from .jpeg import CorruptImage, check_jpeg, decode_jpeg
from .manifest import PLAN, BadFile, load_manifest, read_plan
from .reader import iter_tar_samples

log = logging.getLogger(__name__)


class _HashingReader(io.RawIOBase):
    def __init__(self, raw):
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.sha256.update(data)
        self.size += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check_sample(kind: str, key: str, files: dict[str, bytes], quick: bool) -> list[str]:
    problems = []
    if "json" not in files:
        return [f"sample {key}: no .json record"]
    try:
        rec = json.loads(files["json"])
    except json.JSONDecodeError as exc:
        return [f"sample {key}: bad JSON: {exc}"]
    jpgs = {ext: data for ext, data in files.items() if ext.endswith("jpg")}
    if kind == "images" and set(jpgs) != {"jpg"}:
        problems.append(f"sample {key}: expected one .jpg, found {sorted(jpgs)}")
    if kind == "places":
        want = ({f"img{i}.jpg" for i in range(len(rec.get("images", [])))}
                | {f"q{i}.jpg" for i in range(len(rec.get("queries", [])))})
        if set(jpgs) != want:
            problems.append(f"sample {key}: members {sorted(jpgs)} do not match its record")
    for ext, data in jpgs.items():
        try:
            check_jpeg(data) if quick else decode_jpeg(data)
        except CorruptImage as exc:
            problems.append(f"sample {key}.{ext}: {exc}")
    return problems


def verify_shard(url: str, entry: Mapping[str, Any], kind: str, quick: bool = False,
                 storage_options: Mapping[str, Any] | None = None, bar=None,
                 read: dict | None = None) -> list[str]:
    """Problems found in one shard (empty when it is sound); adds what it read to ``read``."""
    problems: list[str] = []
    samples = images = 0
    if not storage.exists(url, storage_options):
        return [f"{entry['name']}: missing"]
    if bar is not None:
        bar.set_postfix_str(entry["name"], refresh=False)
    with storage.open_read(url, storage_options) as raw:
        reader = _HashingReader(raw)
        buffered = io.BufferedReader(reader, 1 << 20)
        try:
            for sample in iter_tar_samples(buffered, url):
                files = {k: v for k, v in sample.items() if not k.startswith("__")}
                n = sum(1 for e in files if e.endswith("jpg"))
                samples += 1
                images += n
                problems.extend(f"{entry['name']}: {p}" for p in
                                _check_sample(kind, sample["__key__"], files, quick))
                if bar is not None:
                    bar.update(n)
        except (tarfile.TarError, EOFError, OSError) as exc:
            problems.append(f"{entry['name']}: unreadable tar ({exc})")
        buffered.read()
        reader.drain()
    if read is not None:
        read["samples"] += samples
        read["images"] += images
    if reader.size != entry["bytes"]:
        problems.append(f"{entry['name']}: {reader.size} bytes, manifest says {entry['bytes']}")
    if reader.sha256.hexdigest() != entry["sha256"]:
        problems.append(f"{entry['name']}: sha256 differs from the manifest")
    if samples != entry["samples"]:
        problems.append(f"{entry['name']}: {samples} samples, manifest says {entry['samples']}")
    if images != entry["images"]:
        problems.append(f"{entry['name']}: {images} images, manifest says {entry['images']}")
    return problems


def check_bookkeeping(dataset: str, manifest: dict,
                      storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Disagreements between ``manifest.json``, its own totals, ``plan.json`` and the
    shards actually present: a manifest that lists fewer shards than were planned
    must not verify as OK."""
    problems: list[str] = []
    shards = manifest["shards"]
    totals = manifest["totals"]
    names = [s["name"] for s in shards]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"manifest.json: shard {dup} listed {names.count(dup)} times")
    sums = {"shards": len(shards), **{k: sum(s[k] for s in shards)
                                      for k in ("samples", "images", "bytes")}}
    for k, v in sums.items():
        if totals[k] != v:
            problems.append(f"manifest.json: totals say {totals[k]} {k}, its shard list "
                            f"adds up to {v}")
    try:
        plan = read_plan(dataset, storage_options)
    except FileNotFoundError:
        problems.append(f"{PLAN} is missing: cannot check the manifest against the plan")
        plan = None
    except BadFile as exc:
        problems.append(str(exc))
        plan = None
    if plan is not None:
        if plan["kind"] != manifest["kind"]:
            problems.append(f"manifest.json: kind {manifest['kind']!r}, {PLAN} says "
                            f"{plan['kind']!r}")
        planned = {s["name"]: s for s in plan["shards"]}
        missing = [n for n in planned if n not in names]
        extra = [n for n in names if n not in planned]
        if missing:
            problems.append(f"manifest.json lists {len(shards)} of the {len(planned)} planned "
                            f"shards; missing: {', '.join(missing[:5])}"
                            + (" ..." if len(missing) > 5 else ""))
        for n in extra:
            problems.append(f"manifest.json: {n} is not in {PLAN}")
        for s in shards:
            p = planned.get(s["name"])
            if p and (s["samples"] > p["samples"] or s["images"] > p["images"]):
                problems.append(f"{s['name']}: {s['samples']} samples / {s['images']} images, "
                                f"more than the {p['samples']} / {p['images']} planned")
    fs, path = storage.filesystem(dataset, storage_options)
    fs.invalidate_cache(path)
    present = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                     if p.endswith(".tar") and not p.rsplit("/", 1)[-1].startswith("."))
    for n in present:
        if n not in names:
            problems.append(f"{n}: a shard in the folder that manifest.json does not list")
    return problems


def verify(dataset: str, quick: bool = False,
           storage_options: Mapping[str, Any] | None = None, progress: bool = True
           ) -> tuple[dict, list[str]]:
    """(manifest, problems) of a shard set: the bookkeeping agrees with itself, with the
    plan and with the folder, and every shard read back agrees with the manifest."""
    dataset = storage.dataset_root(dataset)
    manifest = load_manifest(dataset, storage_options)
    problems = check_bookkeeping(dataset, manifest, storage_options)
    read = {"samples": 0, "images": 0}
    with tqdm(total=manifest["totals"]["images"], unit="img", unit_scale=True,
              desc="verify", disable=not progress, dynamic_ncols=True) as bar:
        for entry in manifest["shards"]:
            problems += verify_shard(storage.join(dataset, entry["name"]), entry,
                                     manifest["kind"], quick, storage_options, bar, read)
    for k in ("samples", "images"):
        if read[k] != manifest["totals"][k]:
            problems.append(f"read {read[k]} {k} in all, manifest.json totals say "
                            f"{manifest['totals'][k]}")
    return manifest, problems
