"""Embedding image shards: one ``.npy`` + ``.jsonl`` per shard, resumable, split across ranks.

Layout of an embeddings folder ``EMB/``::

    EMB/params.json          what is being embedded (model, encoder, rotations, dtype,
                             shards and their manifest sha256); written first, identical
                             for every rank and array task
    EMB/<shard>.source.json  what the shard was made from: its URL and manifest sha256
                             (written before the rows, so a changed shard is seen)
    EMB/<shard>.jsonl        the metadata record of each row, plus "rotation" and "image"
    EMB/<shard>.npy          L2-normalised rows, one per image and rotation (image-major);
                             written last (atomically): its presence marks the shard done
    EMB/embeddings.json      what readers use (below)

Global row ids are the row order over ``shards``. A killed run re-run with the
same arguments skips complete shards; a shard whose manifest sha256 differs from
the one it was embedded from is embedded again (and logged). Each (array task,
rank) takes every ``parts``-th shard, so ranks never write the same file.

``embeddings.json`` (embeddings brought from elsewhere need only ``shards``, the
``.npy`` files, and the ``.jsonl`` files where records are read)::

    shards        required: names in row order; EMB/<name>.npy is a [rows, dim] float16 or
                  float32 array, EMB/<name>.jsonl one JSON record per row (read by search,
                  evaluate and localize: "key" names the image, default <shard>:<image or
                  row>; "rotation" in degrees, default 0; "footprint" for apl, "utm" for vpr)
    shard_rows    rows of each shard (derived from the .npy files; checked when given)
    rows, dim     total rows, descriptor size (derived; checked when given)
    dtype         storage type (derived from the .npy files)
    rotations     degrees embedded (derived from the records)
    digest        embeddings_digest of the rows (derived: computed when absent)
    files         {"<name>.npy": {"size", "mtime_ns", "sha256"}} of each shard's rows. Opening
                  compares size and mtime (cheap); a file that differs is hashed, and when its
                  sha256 differs too the digest is computed again from the rows, with a
                  warning, so an index built from the old rows refuses them; same bytes
                  under new mtimes (a copy) are accepted and their mtimes recorded. Without
                  it the recorded digest is taken as it is
    encoder       {"path", "weights_sha256"} of the encoder, null when unknown
    shard_sha256  manifest sha256 of each source shard, null where unknown
    model, image_size, sources, format_version   informative
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from shard_tools import storage
from shard_tools.jpeg import CorruptImage
from shard_tools.reader import ReadErrors, iter_samples, list_shards

from .atomic import atomic_path
from .distributed import take_part
from .images import check_rotations, load_views
from .provenance import (describe_encoder, embeddings_digest, file_record, file_sha256,
                         rows_digest, same_encoder)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARAMS = "params.json"
META = "embeddings.json"
SOURCE_SUFFIX = ".source.json"
# params.json keys that say where the inputs came from, checked on their own terms
# (per shard, per encoder) rather than as arguments that must not change
PROVENANCE_KEYS = ("model", "encoder", "shard_sha256")
DTYPES = ("float32", "float16")


def shard_name(url: str) -> str:
    """``.../images-000003.tar`` -> ``images-000003`` (the stem of the embedding files)."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(".tar")] if base.endswith(".tar") else base


def resolve_shards(source: str | Sequence[str],
                   storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Shard URLs of an image-shard set (folder/URL with ``manifest.json``) or an explicit list."""
    if isinstance(source, str):
        return [s.url for s in list_shards(source, storage_options, "images", "embedding")]
    urls = [str(u) for u in source]
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("two shards have the same file name; their embeddings would collide")
    return urls


# ---------------------------------------------------------------- encoding

@dataclass
class EmbedStats:
    """What one call did: shards written/skipped/changed since embedded, images embedded, bad
    samples skipped."""

    shards_written: int = 0
    shards_skipped: int = 0
    shards_changed: int = 0
    images: int = 0
    rows: int = 0
    bad_samples: int = 0
    read_errors: int = 0
    complete: bool = False
    written: list[str] = field(default_factory=list)


def _device_of(encoder: nn.Module) -> torch.device:
    for p in encoder.parameters():
        return p.device
    return torch.device("cpu")


@torch.inference_mode()
def encode_batch(encoder: nn.Module, images: torch.Tensor) -> np.ndarray:
    """float32 ``[B, D]`` descriptors, renormalised (bf16 autocast on CUDA)."""
    device = _device_of(encoder)
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = encoder(x)
    else:
        out = encoder(x)
    out = torch.nn.functional.normalize(out.float(), dim=-1)
    return out.cpu().numpy()


def _decode(args: tuple[dict, tuple[int, int], tuple[int, ...]]):
    sample, size_hw, rotations = args
    data = sample.get("jpg") or sample.get("jpeg")
    if data is None:
        return sample, None, "no .jpg member"
    try:
        return sample, load_views(data, size_hw, rotations), None
    except CorruptImage as exc:
        return sample, None, str(exc)


def sample_record(sample: Mapping[str, Any]) -> dict:
    """A sample's JSON record as embeddings store it (its key added)."""
    raw = sample.get("json")
    rec = json.loads(raw) if raw else {}
    if not isinstance(rec, dict):
        rec = {"value": rec}
    rec.setdefault("key", sample["__key__"])
    return rec


def embed_shard(encoder: nn.Module, url: str, image_size: tuple[int, int],
                rotations: Sequence[int] = (0,), batch_size: int = 32, workers: int = 2,
                storage_options: Mapping[str, Any] | None = None,
                errors: ReadErrors | None = None, progress: tqdm | None = None,
                stats: EmbedStats | None = None) -> tuple[np.ndarray, list[dict]]:
    """Embed one image shard: ``([n_images * R, D] float32 rows, records)``, image-major.

    A sample without a decodable JPEG is skipped, logged and counted in ``stats``.
    Each record gets ``rotation`` and ``image`` (the image's index in this shard).
    """
    rotations = check_rotations(rotations)
    size_hw = (int(image_size[0]), int(image_size[1]))
    stats = stats if stats is not None else EmbedStats()
    chunks: list[np.ndarray] = []
    records: list[dict] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        if batch:
            chunks.append(encode_batch(encoder, torch.stack(batch)))
            batch.clear()

    samples = iter_samples(url, storage_options, errors)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        jobs = ((s, size_hw, rotations) for s in samples)
        for sample, views, why in pool.map(_decode, jobs):
            if views is None:
                stats.bad_samples += 1
                log.warning("skipping %s in %s: %s", sample["__key__"], url, why)
                continue
            rec = sample_record(sample)
            n_img = len(records) // len(rotations)
            for r, view in zip(rotations, views):
                records.append({**rec, "rotation": r, "image": n_img})
                batch.append(view)
            if len(batch) >= batch_size:
                flush()
            stats.images += 1
            if progress is not None:
                progress.update(1)
    flush()
    dim = chunks[0].shape[1] if chunks else 0
    rows = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    return rows, records


# ---------------------------------------------------------------- files

def _write_atomic(path: str, write) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_shard_embeddings(output: str, name: str, rows: np.ndarray, records: Sequence[dict],
                           dtype: str = "float32") -> None:
    """``<name>.jsonl`` then ``<name>.npy`` (the marker of completeness), each atomically."""
    if len(rows) != len(records):
        raise ValueError(f"{len(rows)} rows but {len(records)} records")
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    _write_atomic(os.path.join(output, name + ".jsonl"), lambda f: f.write(lines))
    _write_atomic(os.path.join(output, name + ".npy"),
                  lambda f: np.save(f, np.ascontiguousarray(rows, dtype=np.dtype(dtype))))


def _read_json(path: str) -> Any:
    """A JSON file; a ValueError naming the file when it is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def check_same_encoder(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None,
                       what_a: str = "the database", what_b: str = "the queries",
                       allow: bool = False) -> None:
    """Refuse (ValueError) two sets of embeddings whose encoders' weights differ: their
    vectors live in different spaces, so a search over both is meaningless. ``allow``
    (``--allow-mixed-encoders``): a warning instead. Unknown encoders (in-memory models,
    foreign embeddings) are not refused: nothing to compare."""
    if same_encoder(a, b) is not False:
        return
    text = (f"{what_a} and {what_b} come from different encoders: {describe_encoder(a)} "
            f"and {describe_encoder(b)}")
    if allow:
        log.warning("%s; their scores are not comparable (--allow-mixed-encoders)", text)
        return
    raise ValueError(f"{text}; embed both with one encoder (or pass --allow-mixed-encoders)")


def _check_encoder(output: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """The folder's encoder must be the one embedding now: by weights digest when both
    are known (the path may differ), else by the recorded model name as before."""
    same = same_encoder(old.get("encoder"), new.get("encoder"))
    if same is None:
        same = old.get("model") == new.get("model")
    if not same:
        was = describe_encoder(old.get("encoder") or old.get("model"))
        raise ValueError(f"{output} holds embeddings of encoder {was}, not of "
                         f"{describe_encoder(new.get('encoder') or new.get('model'))}; use a "
                         "new output folder or delete it")


def _check_params(output: str, params: dict) -> None:
    """Write ``params.json``, or check that an existing one asks for the same embedding.

    Changed shard digests are not an error (those shards are embedded again); the
    file is updated to the current ones (every rank writes the same content).
    """
    path = os.path.join(output, PARAMS)
    if os.path.exists(path):
        old = _read_json(path)
        if not isinstance(old, dict):
            raise ValueError(f"{path}: expected a JSON object; delete the folder")
        changed = sorted(k for k in set(old) | set(params)
                         if k not in PROVENANCE_KEYS and old.get(k) != params.get(k))
        if changed:
            raise ValueError(f"{output} holds embeddings made with other arguments "
                             f"({', '.join(changed)} differ); use a new output folder or "
                             "delete it")
        _check_encoder(output, old, params)
        if old == params:
            return
    storage.makedirs(output)
    storage.write_json_atomic(path, params)


def _source_path(output: str, name: str) -> str:
    return os.path.join(output, name + SOURCE_SUFFIX)


def embedded_from(output: str, name: str) -> str | None:
    """The manifest sha256 a done shard was embedded from; None when not recorded (folders
    written before it was, shards given as URLs without a manifest)."""
    path = _source_path(output, name)
    if not os.path.exists(path):
        return None
    doc = _read_json(path)
    return doc.get("sha256") if isinstance(doc, dict) else None


def shard_done(output: str, name: str) -> bool:
    return (os.path.exists(os.path.join(output, name + ".npy"))
            and os.path.exists(os.path.join(output, name + ".jsonl")))


def shard_changed(output: str, name: str, sha256: str | None) -> bool:
    """True when a done shard was embedded from other content than the manifest's now."""
    before = embedded_from(output, name)
    return sha256 is not None and before is not None and before != sha256


def _load_rows(root: str, name: str, dim: int | None) -> np.ndarray:
    """``<name>.npy`` memory-mapped as ``[rows, dim]``; a ValueError naming the file."""
    npy = os.path.join(root, name + ".npy")
    if not os.path.exists(npy):
        raise FileNotFoundError(f"embedding shard missing: {npy}")
    try:
        arr = np.load(npy, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{npy}: not a readable .npy array ({exc})") from None
    if arr.ndim != 2:
        if arr.size:
            raise ValueError(f"{npy}: expected [rows, dim] rows, found shape {arr.shape}")
        arr = arr.reshape(0, int(dim or 0))
    if arr.dtype.kind != "f":
        raise ValueError(f"{npy}: expected float16 or float32 rows, found {arr.dtype}")
    return arr


def finalize_embeddings(output: str) -> bool:
    """Write ``embeddings.json`` when every shard in ``params.json`` is done; True if complete.

    Any rank or array task may call it; the content does not depend on who writes it.
    """
    params = _read_json(os.path.join(output, PARAMS))
    names = params["shards"]
    if not all(shard_done(output, n) for n in names):
        return False
    arrays = [_load_rows(output, n, params.get("dim")) for n in names]
    emb = Embeddings(arrays, None, {"dim": params.get("dim")}, output, names)
    rows = [int(a.shape[0]) for a in arrays]
    meta = {"format_version": FORMAT_VERSION, "model": params["model"],
            "encoder": params.get("encoder"), "dim": emb.dim or None, "dtype": params["dtype"],
            "rotations": params["rotations"], "image_size": params["image_size"],
            "shards": names, "sources": params["sources"],
            "shard_sha256": [embedded_from(output, n) for n in names],
            "shard_rows": rows, "rows": sum(rows), "digest": rows_digest(emb),
            "files": {n + ".npy": file_record(os.path.join(output, n + ".npy")) for n in names}}
    storage.write_json_atomic(os.path.join(output, META), meta)
    return True


def _shard_sources(shards: str | Sequence[str],
                   storage_options: Mapping[str, Any] | None) -> tuple[list[str], dict, dict]:
    """(URLs, expected samples by URL, manifest sha256 by URL); the last two are empty for
    an explicit list of URLs (no manifest to read them from)."""
    if isinstance(shards, str):   # a shard set: its manifest says what each shard holds
        infos = list_shards(shards, storage_options, "images", "embedding")
        return ([s.url for s in infos], {s.url: s.samples for s in infos},
                {s.url: s.sha256 for s in infos})
    return resolve_shards(shards), {}, {}


def _todo(output: str, mine: Sequence[tuple[str, str]], digests: Mapping[str, str],
          resume: bool, stats: "EmbedStats") -> list[tuple[str, str]]:
    """This worker's shards to embed: not done, not resumed, or changed since embedded."""
    todo = []
    for url, name in mine:
        if resume and shard_done(output, name):
            if not shard_changed(output, name, digests.get(url)):
                stats.shards_skipped += 1
                continue
            log.warning("shard %s changed since it was embedded (manifest sha256 %s, "
                        "embedded from %s): embedding it again", name, digests[url][:12],
                        (embedded_from(output, name) or "")[:12])
            stats.shards_changed += 1
        todo.append((url, name))
    return todo


def _write_source(output: str, name: str, url: str, sha256: str | None) -> None:
    """Record what ``name`` is being made from, after removing a stale ``.npy``: the marker
    never stands beside another content's record."""
    stale = os.path.join(output, name + ".npy")
    if os.path.exists(stale):
        os.unlink(stale)
    doc = json.dumps({"source": url, "sha256": sha256}, sort_keys=True).encode()
    _write_atomic(_source_path(output, name), lambda f: f.write(doc))


def embed_shards(encoder: nn.Module, shards: str | Sequence[str], output: str,
                 image_size: tuple[int, int] | int, rotations: Sequence[int] = (0,),
                 batch_size: int = 32, dtype: str = "float32", rank: int = 0,
                 world_size: int = 1, model_name: str = "", resume: bool = True,
                 workers: int = 2, storage_options: Mapping[str, Any] | None = None,
                 progress: bool = True, encoder_id: Mapping[str, Any] | None = None
                 ) -> EmbedStats:
    """Embed this worker's share of ``shards`` into ``output``; see the module docstring.

    ``rank``/``world_size`` select the share (every ``world_size``-th shard from
    ``rank``; for SLURM arrays pass ``distributed.worker_part(...)``). With
    ``resume`` complete shards are skipped unless their manifest sha256 changed;
    without it this share is recomputed. ``encoder_id``
    (``provenance.encoder_identity``) is recorded, and a folder made by other
    weights is refused. The last worker to finish writes ``embeddings.json``
    (``stats.complete``); under torch.distributed call ``finalize_embeddings``
    after a barrier to be sure.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    rotations = check_rotations(rotations)
    urls, expected, digests = _shard_sources(shards, storage_options)
    if not urls:
        raise ValueError("no shards to embed")
    names = [shard_name(u) for u in urls]
    params = {"format_version": FORMAT_VERSION, "model": model_name,
              "encoder": dict(encoder_id) if encoder_id else None, "dtype": dtype,
              "rotations": list(rotations), "image_size": list(image_size),
              "shards": names, "sources": urls, "shard_sha256": [digests.get(u) for u in urls]}
    output = storage.normalize(output)
    _check_params(output, params)
    mine = take_part(list(zip(urls, names)), rank, world_size)
    stats = EmbedStats()
    todo = _todo(output, mine, digests, resume, stats)
    for url, _ in todo:
        if not storage.exists(url, storage_options):
            raise FileNotFoundError(f"shard missing: {url}")
    if stats.shards_skipped:
        log.info("%d shards already embedded, skipped", stats.shards_skipped)
    errors = ReadErrors()
    was_training = encoder.training
    encoder.eval()
    try:
        with tqdm(total=None, unit="img", desc=f"embed (rank {rank})", disable=not progress,
                  position=rank if world_size > 1 else None) as bar:
            for url, name in todo:
                before = (errors.count, stats.images + stats.bad_samples)
                rows, records = embed_shard(encoder, url, image_size, rotations, batch_size,
                                            workers, storage_options, errors, bar, stats)
                seen = stats.images + stats.bad_samples - before[1]
                want = expected.get(url, seen)
                if errors.count > before[0] or seen != want:
                    # a broken tail would be a silent hole in the database: write nothing
                    # for this shard, so a re-run after the shard is restored embeds it
                    raise ValueError(f"shard {name} read incompletely ({seen} of {want} samples"
                                     f"{'; ' + errors.last if errors.count > before[0] else ''}); "
                                     "nothing written for it, shards already embedded are kept")
                _write_source(output, name, url, digests.get(url))
                write_shard_embeddings(output, name, rows, records, dtype)
                stats.shards_written += 1
                stats.rows += len(rows)
                stats.written.append(name)
    finally:
        encoder.train(was_training)
    stats.read_errors = errors.count
    stats.complete = finalize_embeddings(output)
    return stats


# ---------------------------------------------------------------- reading

class Embeddings:
    """An embeddings folder (or in-memory arrays) read lazily: memory-mapped rows per shard.

    ``vectors_chunks()`` streams float32 chunks; ``take(rows)`` gathers rows;
    ``records`` (read on first use) holds one metadata dict per row; ``image_of_row``
    maps each row to its database image (rows of the same image at other rotations
    share it).
    """

    def __init__(self, arrays: Sequence[np.ndarray], records: Sequence[Mapping] | None = None,
                 meta: Mapping[str, Any] | None = None, root: str | None = None,
                 names: Sequence[str] | None = None) -> None:
        self.arrays = list(arrays)
        self.meta = dict(meta or {})
        self.root = root
        self.names = list(names) if names is not None else [f"part{i}" for i in
                                                            range(len(self.arrays))]
        self._records = list(records) if records is not None else None
        sizes = [int(a.shape[0]) for a in self.arrays]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        dims = {int(a.shape[1]): name for name, a in zip(self.names, self.arrays)
                if a.ndim == 2 and a.shape[0]}
        if len(dims) > 1:
            (d0, n0), (d1, n1) = list(dims.items())[:2]
            raise ValueError(f"embedding parts have different dimensions: {n0} is {d0}-d, "
                             f"{n1} is {d1}-d")
        self.dim = next(iter(dims)) if dims else int(self.meta.get("dim") or 0)

    @classmethod
    def from_arrays(cls, vectors: np.ndarray, records: Sequence[Mapping] | None = None
                    ) -> "Embeddings":
        """In-memory embeddings (one part); records default to ``{"key": str(i)}``."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be [N, D], got shape {vectors.shape}")
        if records is None:
            records = [{"key": str(i), "rotation": 0, "image": i} for i in range(len(vectors))]
        if len(records) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(records)} records")
        return cls([vectors], records, {"dim": int(vectors.shape[1]),
                                         "rotations": sorted({int(r.get("rotation", 0))
                                                              for r in records}) or [0]})

    @classmethod
    def open(cls, root: str) -> "Embeddings":
        """A complete embeddings folder (``embeddings.json`` present). Only ``shards`` is
        required; what the ``.npy`` files tell is derived, and checked where recorded."""
        root = storage.normalize(root)
        path = os.path.join(root, META)
        if not os.path.exists(path):
            if os.path.exists(os.path.join(root, PARAMS)):
                names = _read_json(os.path.join(root, PARAMS))["shards"]
                missing = [n for n in names if not shard_done(root, n)]
                raise FileNotFoundError(f"embeddings in {root} are incomplete: {len(missing)} "
                                        f"of {len(names)} shards missing (first: "
                                        f"{missing[0]}); run embed again")
            raise FileNotFoundError(f"not an embeddings folder (no {META}): {root}")
        meta = _read_json(path)
        names = _meta_shards(meta, path)
        arrays = [_load_rows(root, n, meta.get("dim")) for n in names]
        emb = cls(arrays, None, meta, root, names)
        _derive_meta(emb, path)
        _check_files(emb, path)
        return emb

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def rotations(self) -> list[int]:
        """Degrees embedded: recorded, else those of the records."""
        if not self.meta.get("rotations"):
            self.meta["rotations"] = sorted({int(r) for r in self.rotation_of_row}) or [0]
        return list(self.meta["rotations"])

    @property
    def encoder(self) -> dict | None:
        """``{"path", "weights_sha256"}`` of the encoder that made the rows, None if unknown."""
        enc = self.meta.get("encoder")
        return dict(enc) if isinstance(enc, Mapping) else None

    @property
    def digest(self) -> str:
        """``provenance.embeddings_digest``: recorded, else computed over the rows once."""
        if not self.meta.get("digest"):
            self.meta["digest"] = embeddings_digest(self)
        return str(self.meta["digest"])

    @property
    def records(self) -> list[dict]:
        if self._records is None:
            recs: list[dict] = []
            for name, arr in zip(self.names, self.arrays):
                recs.extend(_read_records(self.root, name, int(arr.shape[0])))
            self._records = recs
        return self._records

    @cached_property
    def keys(self) -> np.ndarray:
        return np.asarray([str(r.get("key")) for r in self.records], dtype=object)

    @cached_property
    def rotation_of_row(self) -> np.ndarray:
        return np.asarray([int(r.get("rotation", 0)) for r in self.records], np.int64)

    @cached_property
    def image_of_row(self) -> np.ndarray:
        """Row -> image number (first-appearance order of keys)."""
        _, first, inverse = np.unique(self.keys, return_index=True, return_inverse=True)
        # renumber so that images are numbered in order of first appearance
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return rank[inverse].astype(np.int64)

    @cached_property
    def image_rows(self) -> np.ndarray:
        """Image number -> its first row (the record that describes the image)."""
        img = self.image_of_row
        first = np.full(int(img.max()) + 1 if len(img) else 0, -1, np.int64)
        rows = np.arange(len(img))[::-1]
        first[img[::-1]] = rows
        return first

    def image_records(self) -> list[dict]:
        return [self.records[i] for i in self.image_rows]

    def chunks(self, rows_per_chunk: int = 65536, start: int = 0, stop: int | None = None
               ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first global row, float32 [n, D])`` over rows ``[start, stop)``, shard by shard."""
        stop = len(self) if stop is None else stop
        for part, arr in enumerate(self.arrays):
            lo, hi = int(self.offsets[part]), int(self.offsets[part + 1])
            a, b = max(lo, start), min(hi, stop)
            for s in range(a, b, rows_per_chunk):
                e = min(b, s + rows_per_chunk)
                yield s, np.ascontiguousarray(arr[s - lo:e - lo], dtype=np.float32)

    def take(self, rows: Iterable[int]) -> np.ndarray:
        """float32 rows by global id (any order)."""
        rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row ids out of range [0, {len(self)})")
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(part):
            sel = np.flatnonzero(part == p)
            local = rows[sel] - self.offsets[p]
            order = np.argsort(local, kind="stable")
            out[sel[order]] = self.arrays[p][local[order]]
        return out

    def all(self) -> np.ndarray:
        """All rows as one float32 array (small sets only)."""
        return np.concatenate([c for _, c in self.chunks()]) if len(self) else \
            np.zeros((0, self.dim), np.float32)


def _meta_shards(meta: Any, path: str) -> list[str]:
    """``shards`` of an ``embeddings.json``: the one field that cannot be derived."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    names = meta.get("shards")
    if names is None:
        raise ValueError(f"{path}: no 'shards' (the embedding shard names in row order, "
                         "each a <name>.npy beside it)")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}: 'shards' must be a list of shard names, got {names!r}")
    return names


def _derive_meta(emb: "Embeddings", path: str) -> None:
    """Fill ``shard_rows``, ``rows``, ``dim`` and ``dtype`` from the rows; recorded values
    that disagree with the files are an error naming the field."""
    rows = [int(a.shape[0]) for a in emb.arrays]
    recorded = emb.meta.get("shard_rows")
    if recorded is not None:
        if not isinstance(recorded, list) or len(recorded) != len(rows):
            raise ValueError(f"{path}: 'shard_rows' must list the rows of each of the "
                             f"{len(rows)} shards, got {recorded!r}")
        for name, want, have in zip(emb.names, recorded, rows):
            if want != have:
                raise ValueError(f"{os.path.join(emb.root, name + '.npy')} has {have} rows, "
                                 f"{META} says {want}")
    derived = {"shard_rows": rows, "rows": sum(rows), "dim": emb.dim or None}
    for key in ("rows", "dim"):
        given = emb.meta.get(key)
        if given is not None and derived[key] is not None and given != derived[key]:
            raise ValueError(f"{path}: '{key}' is {given!r}, the .npy files hold "
                             f"{derived[key]!r}")
    dtypes = sorted({a.dtype.name for a in emb.arrays})
    if dtypes:
        derived["dtype"] = dtypes[0] if len(dtypes) == 1 else dtypes
    for key, value in derived.items():
        if emb.meta.get(key) is None:
            emb.meta[key] = value


@dataclass
class FileCheck:
    """What opening found about the ``.npy`` files against ``embeddings.json``: files whose
    bytes differ (``changed``), and files with the same bytes under a new mtime (``moved``:
    a copied folder), by name, with their new mtime."""

    changed: list[str] = field(default_factory=list)
    moved: dict[str, int] = field(default_factory=dict)


def _check_rows_files(root: str, names: Sequence[str], records: Mapping[str, Any]) -> FileCheck:
    """Compare each ``<name>.npy`` with its record: equal size and mtime are taken as the
    recorded bytes (no read); a new mtime is settled by the sha256."""
    check = FileCheck()
    for name in names:
        file, rec = os.path.join(root, name + ".npy"), records.get(name + ".npy")
        if not isinstance(rec, Mapping):
            check.changed.append(file)
            continue
        st = os.stat(file)
        if st.st_size != rec.get("size"):
            check.changed.append(file)
        elif st.st_mtime_ns != rec.get("mtime_ns"):
            if file_sha256(file) == rec.get("sha256"):
                check.moved[name + ".npy"] = st.st_mtime_ns
            else:
                check.changed.append(file)
    return check


def _refresh_mtimes(path: str, meta: Mapping[str, Any], moved: Mapping[str, int]) -> None:
    """Record the new mtimes of files with unchanged bytes, so the next open reads nothing;
    best effort (a read-only folder is hashed again next time, nothing more)."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or doc.get("files") != meta.get("files"):
        return                                  # rewritten meanwhile: leave it
    files = {n: dict(r, mtime_ns=moved[n]) if n in moved else r for n, r in doc["files"].items()}
    try:
        storage.write_json_atomic(path, {**doc, "files": files})
    except OSError as exc:
        log.debug("%s: new mtimes not recorded (%s)", path, exc)


def _check_files(emb: "Embeddings", path: str) -> None:
    """Make the digest stand for the rows. When a ``.npy`` file changed since
    ``embeddings.json`` was written, compute it from the rows (and say which file), so that
    an index built from the old rows refuses these and ``index`` rebuilds. Folders without
    ``files`` (older, foreign) keep the digest they record."""
    records = emb.meta.get("files")
    if not isinstance(records, Mapping):
        return
    check = _check_rows_files(emb.root, emb.names, records)
    if check.changed:
        more = f" (and {len(check.changed) - 1} more)" if len(check.changed) > 1 else ""
        log.warning("%s%s is not the file %s records (replaced or modified since it was "
                    "written): the embeddings' digest is computed from the rows again",
                    check.changed[0], more, path)
        emb.meta["digest"] = rows_digest(emb)
    elif check.moved:
        log.debug("%s: %d files have new mtimes and the recorded sha256", path,
                  len(check.moved))
        _refresh_mtimes(path, emb.meta, check.moved)


def _read_records(root: str, name: str, n_rows: int) -> list[dict]:
    """``<name>.jsonl``: one record per row; a missing ``key`` becomes ``<name>:<image>``
    (rotations of one image share it), else ``<name>:<row>``."""
    path = os.path.join(root, name + ".jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"records missing: {path} (one JSON record per row of "
                                f"{name}.npy)")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if len(lines) != n_rows:
        raise ValueError(f"{path} has {len(lines)} records for {n_rows} rows")
    out = []
    for row, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {row + 1} is not JSON ({exc})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: line {row + 1} is not a JSON object")
        if "key" not in rec:
            rec["key"] = f"{name}:{rec['image']}" if "image" in rec else f"{name}:{row}"
        out.append(rec)
    return out


def as_embeddings(value: "Embeddings | str | np.ndarray") -> Embeddings:
    if isinstance(value, Embeddings):
        return value
    if isinstance(value, np.ndarray):
        return Embeddings.from_arrays(value)
    return Embeddings.open(str(value))
