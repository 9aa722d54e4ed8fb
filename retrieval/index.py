"""Sharded FAISS indexes over normalised embeddings (inner product: larger is better).

Layout of an index folder ``IDX/``::

    IDX/index.json           factory, metric, dim, source embeddings, shards with row ranges
    IDX/trained.index        the factory's index trained once on a sample (empty)
    IDX/shard-000.index      shard i holds rows [start, stop) of the embeddings
    IDX/merged.index (+ .ivfdata)   ``--merge``: IVF shards as one on-disk index

Shard ``i`` holds a contiguous range of global rows. IVF shards store global
ids (``add_with_ids``, so ``merge_ondisk`` keeps them); other indexes add the
shard's ``start`` to their local ids at search time. Any shard can be built by
its own process: the first to need ``trained.index`` trains it under a file
lock, the others wait and read it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from shard_tools import storage

from .atomic import atomic_path
from .embed import Embeddings, as_embeddings

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_META = "index.json"
TRAINED = "trained.index"
MERGED = "merged.index"
MERGED_DATA = "merged.ivfdata"
DEFAULT_TRAIN_SIZE = 100_000


def shard_file(i: int) -> str:
    return f"shard-{i:03d}.index"


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU"
        return 0


def new_index(dim: int, factory: str) -> faiss.Index:
    """``faiss.index_factory`` with inner product; a one-line error for a bad string."""
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        why = next((ln for ln in first if "Error" in ln or "could not" in ln.lower()),
                   first[-1] if first else "")
        raise ValueError(f"bad FAISS factory string {factory!r}: {why.strip()}") from None


def ivf_of(index: faiss.Index):
    """The IVF part of an index (or None)."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def takes_global_ids(index: faiss.Index) -> bool:
    """IVF indexes (also behind a pre-transform) store global ids; a refine stage does not."""
    if ivf_of(index) is None:
        return False
    return not isinstance(faiss.downcast_index(index), faiss.IndexRefine)


def set_search_params(index: faiss.Index, nprobe: int | None = None,
                      ef_search: int | None = None, k_factor: float | None = None) -> None:
    """nprobe for IVF, efSearch for HNSW, k_factor (candidates re-ranked = k * k_factor) for a
    ``,RFlat`` refine stage; each a no-op where it does not apply."""
    if k_factor is not None:
        if k_factor < 1:
            raise ValueError(f"k_factor must be >= 1, got {k_factor}")
        refine = faiss.downcast_index(index)
        if isinstance(refine, faiss.IndexRefine):
            refine.k_factor = float(k_factor)
    if nprobe is not None:
        ivf = ivf_of(index)
        if ivf is not None:
            ivf.nprobe = int(nprobe)
    if ef_search is not None:
        hnsw = getattr(faiss.try_extract_index_hnsw(index), "hnsw", None) \
            if hasattr(faiss, "try_extract_index_hnsw") else getattr(index, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = int(ef_search)


def shard_ranges(rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[start, stop)`` row ranges."""
    if num_shards < 1:
        raise ValueError(f"the number of index shards must be >= 1, got {num_shards}")
    bounds = [rows * i // num_shards for i in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _write_index_atomic(index: faiss.Index, path: str) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, tmp)


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs (sharded across them) when there are GPUs, else itself."""
    if not gpu_count():
        return index
    try:
        co = faiss.GpuMultipleClonerOptions()
        co.shard = True
        co.useFloat16 = False
        return faiss.index_cpu_to_all_gpus(index, co)
    except Exception as exc:  # noqa: BLE001 - e.g. HNSW has no GPU version
        log.info("index stays on the CPU (%s)", str(exc).splitlines()[0] if str(exc) else exc)
        return index


def _from_gpu(index: faiss.Index) -> faiss.Index:
    if gpu_count() and hasattr(faiss, "index_gpu_to_cpu"):
        try:
            return faiss.index_gpu_to_cpu(index)
        except Exception:  # noqa: BLE001 - already a CPU index
            return index
    return index


def sample_rows(n: int, size: int | None, seed: int = 0) -> np.ndarray:
    size = min(n, DEFAULT_TRAIN_SIZE if size is None else int(size))
    if size < 1:
        raise ValueError("no rows to train the index on")
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def train_index(emb: Embeddings, factory: str, train_size: int | None = None,
                seed: int = 0) -> faiss.Index:
    """An empty index of ``factory``, trained on a seeded sample of rows if it needs training."""
    index = new_index(emb.dim, factory)
    if not index.is_trained:
        rows = sample_rows(len(emb), train_size, seed)
        x = emb.take(rows)
        log.info("training %s on %d of %d rows", factory, len(x), len(emb))
        work = _to_gpu(index) if ivf_of(index) is not None else index
        try:
            work.train(x)
        except RuntimeError as exc:   # e.g. fewer rows than IVF lists or PQ centroids
            text = str(exc)
            reason = text.split("Error: ", 1)[-1].splitlines()[0] if text else "failed"
            raise ValueError(f"cannot train {factory} on {len(x)} rows: {reason}") from None
        index = _from_gpu(work) if work is not index else index
    return index


def _add_rows(index: faiss.Index, emb: Embeddings, start: int, stop: int, with_ids: bool,
              progress: bool, desc: str) -> faiss.Index:
    work = _to_gpu(index) if ivf_of(index) is not None and not with_ids else index
    with tqdm(total=stop - start, unit="row", desc=desc, disable=not progress) as bar:
        for first, x in emb.chunks(65536, start, stop):
            if with_ids:
                work.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
            else:
                work.add(x)
            bar.update(len(x))
    return _from_gpu(work) if work is not index else index


@dataclass
class IndexShard:
    """One searchable shard: the FAISS index and the offset added to its ids (None: global)."""

    index: faiss.Index
    offset: int | None
    start: int
    stop: int


def build_shard(emb: Embeddings, trained: faiss.Index, start: int, stop: int,
                progress: bool = False, desc: str = "index") -> IndexShard:
    """Rows ``[start, stop)`` added to a copy of ``trained``."""
    index = faiss.clone_index(trained)
    global_ids = takes_global_ids(index)
    index = _add_rows(index, emb, start, stop, global_ids, progress, desc)
    return IndexShard(index, None if global_ids else start, start, stop)


class ShardedIndex:
    """Index shards searched together; ``search`` merges their top-k (see ``search.py``)."""

    def __init__(self, shards: Sequence[IndexShard], dim: int, factory: str = "Flat",
                 meta: dict | None = None, root: str | None = None) -> None:
        self.shards = list(shards)
        self.dim = int(dim)
        self.factory = factory
        self.meta = dict(meta or {})
        self.root = root

    @property
    def ntotal(self) -> int:
        return sum(int(s.index.ntotal) for s in self.shards)

    def set_params(self, nprobe: int | None = None, ef_search: int | None = None,
                   k_factor: float | None = None) -> None:
        for s in self.shards:
            set_search_params(s.index, nprobe, ef_search, k_factor)

    def to_gpu(self) -> "ShardedIndex":
        """Shards moved to all GPUs when FAISS has GPUs (Flat and IVF; others stay)."""
        for s in self.shards:
            s.index = _to_gpu(s.index)
        return self

    @property
    def embeddings(self) -> str | None:
        return self.meta.get("embeddings")

    @classmethod
    def load(cls, root: str, shards: Sequence[int] | None = None, use_gpu: bool | None = None,
             mmap: bool = False, prefer_merged: bool = True) -> "ShardedIndex":
        """Read an index folder (only the given shard numbers, e.g. this rank's)."""
        root = storage.normalize(root)
        meta_path = os.path.join(root, INDEX_META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"not an index folder (no {INDEX_META}): {root}")
        with open(meta_path) as f:
            meta = json.load(f)
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        loaded: list[IndexShard] = []
        if prefer_merged and meta.get("merged") and shards is None:
            path = os.path.join(root, meta["merged"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"merged index missing: {path}")
            ix = faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)
            loaded.append(IndexShard(ix, None, 0, meta["rows"]))
        else:
            numbers = range(len(meta["shards"])) if shards is None else shards
            for i in numbers:
                s = meta["shards"][i]
                path = os.path.join(root, s["file"])
                if not os.path.exists(path):
                    raise FileNotFoundError(f"index shard missing: {path} (build it with "
                                            f"`python -m retrieval index ... --shard {i}`)")
                ix = faiss.read_index(path, flags)
                loaded.append(IndexShard(ix, s["offset"], s["start"], s["stop"]))
        out = cls(loaded, meta["dim"], meta["factory"], meta, root)
        if use_gpu or (use_gpu is None and gpu_count()):
            out.to_gpu()
        return out


def _index_meta(emb: Embeddings, factory: str, ranges: list[tuple[int, int]],
                global_ids: bool, train_size: int | None, seed: int) -> dict:
    return {"format_version": FORMAT_VERSION, "factory": factory, "metric": "inner_product",
            "dim": emb.dim, "rows": len(emb),
            "embeddings": os.path.abspath(emb.root) if emb.root else None,
            "train_size": train_size, "seed": seed, "trained": TRAINED, "merged": None,
            "shards": [{"file": shard_file(i), "start": a, "stop": b,
                        "offset": None if global_ids else a}
                       for i, (a, b) in enumerate(ranges)]}


def _load_or_train(root: str, emb: Embeddings, factory: str, train_size: int | None,
                   seed: int) -> faiss.Index:
    """``trained.index``: read it, or train it once (a file lock serialises processes)."""
    path = os.path.join(root, TRAINED)
    with open(os.path.join(root, ".train.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(path):
                return faiss.read_index(path)
            index = train_index(emb, factory, train_size, seed)
            _write_index_atomic(index, path)
            return index
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_index(embeddings: "Embeddings | str | np.ndarray", output: str | None = None,
                factory: str = "Flat", num_shards: int = 1,
                shard: "int | Sequence[int] | None" = None,
                train_size: int | None = None, seed: int = 0, progress: bool = True
                ) -> ShardedIndex | None:
    """Build ``num_shards`` index shards over the embeddings (all, or only shard ``shard``).

    With ``output=None`` the index lives in memory (e.g. for validation) and is returned.
    With an ``output`` folder, shards are written there (``shard`` builds one or some,
    so array tasks can split the work; existing shard files are kept) and the full ``ShardedIndex`` is returned when every
    shard exists, else None.
    """
    emb = as_embeddings(embeddings)
    if len(emb) == 0:
        raise ValueError("no embeddings to index")
    ranges = shard_ranges(len(emb), num_shards)
    numbers = list(range(num_shards)) if shard is None else \
        ([shard] if isinstance(shard, int) else list(shard))
    for i in numbers:
        if not 0 <= i < num_shards:
            raise ValueError(f"index shard {i} is not in [0, {num_shards})")
    global_ids = takes_global_ids(new_index(emb.dim, factory))
    meta = _index_meta(emb, factory, ranges, global_ids, train_size, seed)
    if output is None:
        trained = train_index(emb, factory, train_size, seed)
        built = [build_shard(emb, trained, *ranges[i], progress, f"index shard {i}")
                 for i in numbers]
        return ShardedIndex(built, emb.dim, factory, meta)
    root = storage.normalize(output)
    storage.makedirs(root)
    meta_path = os.path.join(root, INDEX_META)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        old_cmp = {k: v for k, v in old.items() if k != "merged"}
        new_cmp = {k: v for k, v in meta.items() if k != "merged"}
        if old_cmp != new_cmp:
            changed = sorted(k for k in set(old_cmp) | set(new_cmp)
                             if old_cmp.get(k) != new_cmp.get(k))
            raise ValueError(f"{root} holds an index built with other arguments "
                             f"({', '.join(changed)} differ); use a new output folder")
        meta["merged"] = old.get("merged")
    else:
        storage.write_json_atomic(meta_path, meta)
    try:
        trained = _load_or_train(root, emb, factory, train_size, seed)
    except ValueError:
        if not any(n.endswith(".index") for n in os.listdir(root)):
            for name in (INDEX_META, ".train.lock"):   # nothing built: leave no folder state
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
        raise
    for i in numbers:
        path = os.path.join(root, shard_file(i))
        if os.path.exists(path):
            log.info("index shard %d exists, skipped", i)
            continue
        built = build_shard(emb, trained, *ranges[i], progress, f"index shard {i}")
        _write_index_atomic(built.index, path)
    if all(os.path.exists(os.path.join(root, shard_file(i))) for i in range(num_shards)):
        return ShardedIndex.load(root, use_gpu=False, prefer_merged=False)
    return None


def merge_ondisk(root: str) -> str:
    """Merge IVF shards into ``merged.index`` + ``merged.ivfdata`` (FAISS on-disk lists)."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    root = storage.normalize(root)
    with open(os.path.join(root, INDEX_META)) as f:
        meta = json.load(f)
    trained = faiss.read_index(os.path.join(root, TRAINED))
    if not takes_global_ids(trained) or any(sh["offset"] is not None for sh in meta["shards"]):
        raise ValueError(f"--merge needs an IVF index, this one is {meta['factory']!r}")
    files = [os.path.join(root, s["file"]) for s in meta["shards"]]
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"index shard missing: {missing[0]} ({len(missing)} of "
                                f"{len(files)} not built yet)")
    data = os.path.join(root, MERGED_DATA)
    if os.path.exists(data):
        os.unlink(data)
    _merge(trained, files, data)
    _write_index_atomic(trained, os.path.join(root, MERGED))
    meta["merged"] = MERGED
    storage.write_json_atomic(os.path.join(root, INDEX_META), meta)
    return os.path.join(root, MERGED)


_FACTORY_RE = re.compile(r"^[A-Za-z0-9_,.\-x]+$")


def check_factory(factory: str) -> str:
    """Reject obviously bad strings early (the real check is ``new_index``)."""
    if not factory or not _FACTORY_RE.match(factory):
        raise ValueError(f"bad FAISS factory string {factory!r}")
    return factory
