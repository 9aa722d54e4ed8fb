"""Sharded FAISS indexes over normalised embeddings (inner product: larger is better).

Layout of an index folder ``IDX/``::

    IDX/index.json           factory, metric, dim, source embeddings (path, digest, encoder),
                             shards with row ranges, size and sha256 of every file below
    IDX/trained.index        the factory's index trained once on a sample (empty)
    IDX/shard-000.index      shard i holds rows [start, stop) of the embeddings
    IDX/merged.index (+ .ivfdata)   ``--merge``: IVF shards as one on-disk index

Shard ``i`` holds a contiguous range of global rows. IVF shards store global
ids (``add_with_ids``, so ``merge_ondisk`` keeps them); other indexes add the
shard's ``start`` to their local ids at search time. Any shard can be built by
its own process: the first to need ``trained.index`` trains it under a file
lock, the others wait and read it.

A folder is trusted by what made it, not by its name: ``index.json`` records the
digest of the embeddings (``retrieval.provenance``) and the size and sha256 of each
file. Loading checks both (a replaced or truncated file is an error); building again
rebuilds what does not match (other embeddings: everything; a damaged shard: that shard).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from shard_tools import storage
from shard_tools.cli import error_line

from .atomic import atomic_path
from .embed import Embeddings, as_embeddings
from .provenance import embeddings_digest, file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
INDEX_META = "index.json"
TRAINED = "trained.index"
MERGED = "merged.index"
MERGED_DATA = "merged.ivfdata"
LOCK = ".train.lock"
DEFAULT_TRAIN_SIZE = 100_000
REQUIRED_KEYS = ("factory", "dim", "rows", "shards")
RECIPE_KEYS = ("factory", "metric", "train_size", "seed")
REBUILD_HINT = "re-run `python -m retrieval index` with the same arguments to rebuild it"


def shard_file(i: int) -> str:
    return f"shard-{i:03d}.index"


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no GPU"
        return 0


def new_index(dim: int, factory: str) -> faiss.Index:
    """``faiss.index_factory`` with inner product; a one-line error for a bad string, and
    for ``IVF0`` (FAISS accepts it, then search divides by zero lists)."""
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"bad FAISS factory string {factory!r}: {error_line(exc)}") from None
    ivf = ivf_of(index)
    if ivf is not None and ivf.nlist < 1:
        raise ValueError(f"bad FAISS factory string {factory!r}: an IVF index needs at "
                         "least 1 list")
    return index


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
                      ef_search: int | None = None, k_factor: float | None = None) -> set[str]:
    """nprobe for IVF, efSearch for HNSW, k_factor (candidates re-ranked = k * k_factor) for a
    ``,RFlat`` refine stage; each a no-op where it does not apply. Returns the names of the
    given knobs this index has no use for (so that callers can say so)."""
    unused: set[str] = set()
    if k_factor is not None:
        if k_factor < 1:
            raise ValueError(f"k_factor must be >= 1, got {k_factor}")
        refine = faiss.downcast_index(index)
        if isinstance(refine, faiss.IndexRefine):
            refine.k_factor = float(k_factor)
        else:
            unused.add("k_factor")
    if nprobe is not None:
        ivf = ivf_of(index)
        if ivf is not None:
            ivf.nprobe = int(nprobe)
        else:
            unused.add("nprobe")
    if ef_search is not None:
        hnsw = getattr(faiss.try_extract_index_hnsw(index), "hnsw", None) \
            if hasattr(faiss, "try_extract_index_hnsw") else getattr(index, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = int(ef_search)
        else:
            unused.add("ef_search")
    return unused


def shard_ranges(rows: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[start, stop)`` row ranges."""
    if num_shards < 1:
        raise ValueError(f"the number of index shards must be >= 1, got {num_shards}")
    bounds = [rows * i // num_shards for i in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _write_index_atomic(index: faiss.Index, path: str) -> dict:
    """Write ``index`` whole or not at all; its ``{"size", "sha256"}``. FAISS writes the
    temporary file itself and the hash streams it back, so no copy of the index is held
    in memory (a serialised index is as large as the index)."""
    with atomic_path(path) as tmp:
        try:
            faiss.write_index(index, tmp)
        except RuntimeError as exc:   # e.g. the disk is full: one line naming the file
            raise OSError(f"cannot write index {path}: {error_line(exc)}") from None
        return {"size": os.path.getsize(tmp), "sha256": file_sha256(tmp)}


def _faiss_read(path: str, flags: int = 0) -> faiss.Index:
    """``faiss.read_index`` with FAISS's reason as one line naming the file."""
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as exc:
        raise ValueError(f"cannot read index {path}: {error_line(exc)}") from None


def file_problem(path: str, record: dict | None, hash_it: bool = True) -> str | None:
    """Why the file at ``path`` is not the one ``record`` (``{"size", "sha256"}``) describes,
    or None when it is. The hash streams the file (4 MiB at a time); ``hash_it=False``: the
    size only (large on-disk lists)."""
    if not os.path.exists(path):
        return "missing"
    if not record or "size" not in record or (hash_it and not record.get("sha256")):
        return "not recorded in index.json (its build did not finish)"
    size = os.path.getsize(path)
    if size != record["size"]:
        return f"{size} bytes where index.json records {record['size']} (truncated or replaced)"
    if not hash_it:
        return None
    if file_sha256(path) != record["sha256"]:
        return "its sha256 differs from the one index.json records (replaced or damaged)"
    return None


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
            raise ValueError(f"cannot train {factory} on {len(x)} rows: "
                             f"{error_line(exc)}") from None
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


def read_meta(root: str) -> dict:
    """``IDX/index.json``, checked enough that a damaged file is a one-line error naming it."""
    path = os.path.join(root, INDEX_META)
    if not os.path.exists(path):
        raise FileNotFoundError(f"not an index folder (no {INDEX_META}): {root}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        why = f"{exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) \
            else "not UTF-8 text"
        raise ValueError(f"{path} is not valid JSON ({why}); build the index again in a new "
                         "folder") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not an index description (a JSON object)")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(map(repr, missing))}")
    shards = meta["shards"]
    if not isinstance(shards, list) or not all(
            isinstance(sh, dict) and {"file", "start", "stop", "offset"} <= set(sh)
            for sh in shards):
        raise ValueError(f"{path}: 'shards' must be a list of {{file, start, stop, offset}}")
    return meta


def recorded_embeddings_path(embeddings: str, root: str) -> str:
    """The path ``index.json`` records for the embeddings: relative to the index folder when
    both lie under a common folder (the pair can be moved or copied together), else absolute."""
    if storage.is_remote(embeddings):
        return embeddings
    emb, idx = os.path.abspath(embeddings), os.path.abspath(root)
    if os.path.commonpath([emb, idx]) != os.path.abspath(os.sep):
        return os.path.relpath(emb, idx)
    return emb


def resolve_embeddings_path(recorded: str | None, root: str | None) -> str | None:
    """The embeddings folder a recorded path names: relative paths are relative to the index
    folder; absolute ones (older index.json) stay as they are."""
    if not recorded or root is None or storage.is_remote(recorded):
        return recorded
    return os.path.normpath(os.path.join(root, recorded))


class ShardedIndex:
    """Index shards searched together; ``search`` merges their top-k (see ``search.py``)."""

    def __init__(self, shards: Sequence[IndexShard], dim: int, factory: str = "Flat",
                 meta: dict | None = None, root: str | None = None) -> None:
        self.shards = list(shards)
        self.dim = int(dim)
        self.factory = factory
        self.meta = dict(meta or {})
        self.root = root
        self._database: Embeddings | None = None

    @property
    def ntotal(self) -> int:
        return sum(int(s.index.ntotal) for s in self.shards)

    @property
    def meta_path(self) -> str:
        return os.path.join(self.root, INDEX_META) if self.root else "the in-memory index"

    def set_params(self, nprobe: int | None = None, ef_search: int | None = None,
                   k_factor: float | None = None) -> set[str]:
        """Set the search knobs on every shard; the names of given knobs no shard has."""
        unused = [set_search_params(s.index, nprobe, ef_search, k_factor) for s in self.shards]
        return set.intersection(*unused) if unused else set()

    def to_gpu(self) -> "ShardedIndex":
        """Shards moved to all GPUs when FAISS has GPUs (Flat and IVF; others stay)."""
        for s in self.shards:
            s.index = _to_gpu(s.index)
        return self

    @property
    def embeddings(self) -> str | None:
        """The source embeddings folder (a relative record resolved against the index folder)."""
        return resolve_embeddings_path(self.meta.get("embeddings"), self.root)

    def check_embeddings(self, emb: Embeddings) -> None:
        """Refuse embeddings other than those the index was built from (digest compared);
        an index.json from before digests were recorded is taken as it is."""
        want = self.meta.get("embeddings_digest")
        if not want:
            return
        got = embeddings_digest(emb)
        if got != want:
            raise ValueError(
                f"{self.meta_path}: the embeddings in {emb.root or 'memory'} are not those the "
                f"index was built from (digest {got[:12]}, {len(emb)} rows; the index holds "
                f"{want[:12]}, {self.meta.get('rows')} rows); build the index again")

    def open_embeddings(self) -> Embeddings:
        """The source embeddings, checked against the digest the index records."""
        if self._database is not None:
            return self._database
        path = self.embeddings
        if not path:
            raise ValueError(f"{self.meta_path} names no source embeddings")
        if not os.path.exists(path):
            raise FileNotFoundError(f"embeddings folder not found: {path} (the path "
                                    f"{self.meta.get('embeddings')!r} comes from "
                                    f"{self.meta_path})")
        emb = Embeddings.open(path)
        self.check_embeddings(emb)
        self._database = emb
        return emb

    @classmethod
    def load(cls, root: str, shards: Sequence[int] | None = None, use_gpu: bool | None = None,
             mmap: bool = False, prefer_merged: bool = True,
             check_embeddings: bool = True) -> "ShardedIndex":
        """Read an index folder (only the given shard numbers, e.g. this rank's).

        Each file is checked against the size and sha256 ``index.json`` records (the hash
        streams the file, then FAISS reads it: one copy in memory, none with ``mmap``),
        and, with ``check_embeddings``, the source embeddings (when present) against the
        recorded digest: a mismatch is a ValueError naming the file."""
        root = storage.normalize(root)
        meta = read_meta(root)
        loaded: list[IndexShard] = []
        if prefer_merged and meta.get("merged") and shards is None:
            ix = _read_merged(root, meta)
            loaded.append(IndexShard(ix, None, 0, meta["rows"]))
        else:
            numbers = range(len(meta["shards"])) if shards is None else shards
            for i in numbers:
                if not 0 <= i < len(meta["shards"]):
                    raise ValueError(f"index shard {i} is not in [0, {len(meta['shards'])}) "
                                     f"({os.path.join(root, INDEX_META)})")
                s = meta["shards"][i]
                path = os.path.join(root, s["file"])
                if not os.path.exists(path):
                    raise FileNotFoundError(f"index shard missing: {path} (build it with "
                                            f"`python -m retrieval index ... --shard {i}`)")
                ix = _read_checked(root, meta, s["file"], faiss.IO_FLAG_MMAP if mmap else 0)
                loaded.append(IndexShard(ix, s["offset"], s["start"], s["stop"]))
        out = cls(loaded, meta["dim"], meta["factory"], meta, root)
        if check_embeddings and out.embeddings and os.path.exists(out.embeddings):
            out.open_embeddings()
        if use_gpu or (use_gpu is None and gpu_count()):
            out.to_gpu()
        return out


def _read_checked(root: str, meta: dict, name: str, flags: int = 0) -> faiss.Index:
    """One index file, verified against ``meta["files"]`` (absent in older index.json)."""
    path = os.path.join(root, name)
    records = meta.get("files")
    if records is not None:
        problem = file_problem(path, records.get(name))
        if problem:
            raise ValueError(f"{path}: {problem}; {REBUILD_HINT}")
    return _faiss_read(path, flags)


def _read_merged(root: str, meta: dict) -> faiss.Index:
    """``merged.index`` (sha256 checked) and its ``.ivfdata`` (size checked: it is large)."""
    path = os.path.join(root, meta["merged"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"merged index missing: {path}")
    records = meta.get("files")
    if records is not None:
        for name, hash_it in ((meta["merged"], True), (MERGED_DATA, False)):
            file = os.path.join(root, name)
            problem = file_problem(file, records.get(name), hash_it=hash_it)
            if problem:
                raise ValueError(f"{file}: {problem}; re-run `python -m retrieval index ... "
                                 "--merge` to merge again")
    return _faiss_read(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


def _index_meta(emb: Embeddings, factory: str, ranges: list[tuple[int, int]],
                global_ids: bool, train_size: int | None, seed: int,
                root: str | None = None) -> dict:
    """What ``index.json`` records; provenance (digest, encoder) only for a folder on disk."""
    on_disk = root is not None
    return {"format_version": FORMAT_VERSION, "factory": factory, "metric": "inner_product",
            "dim": emb.dim, "rows": len(emb),
            "embeddings": (recorded_embeddings_path(emb.root, root) if on_disk
                           else os.path.abspath(emb.root)) if emb.root else None,
            "embeddings_digest": embeddings_digest(emb) if on_disk else None,
            "encoder": emb.meta.get("encoder"),
            "train_size": train_size, "seed": seed, "trained": TRAINED, "merged": None,
            "shards": [{"file": shard_file(i), "start": a, "stop": b,
                        "offset": None if global_ids else a}
                       for i, (a, b) in enumerate(ranges)],
            "files": {}}


@contextlib.contextmanager
def _folder_lock(root: str) -> Iterator[None]:
    """Serialises training and every read-modify-write of ``index.json`` across processes."""
    with open(os.path.join(root, LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_built_files(root: str, meta: dict) -> None:
    names = {TRAINED, MERGED, MERGED_DATA, *(s["file"] for s in meta["shards"])}
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, name))


def _recipe_changes(old: dict, new: dict) -> list[str]:
    """Arguments (not embeddings) in which two index descriptions differ."""
    changed = [k for k in RECIPE_KEYS if old.get(k) != new.get(k)]
    if len(old.get("shards", [])) != len(new["shards"]):
        changed.append("num_shards")
    return changed


def _rebuild_reason(root: str, old: dict, new: dict) -> str | None:
    """Why nothing already in the folder can be kept, or None."""
    if not old.get("embeddings_digest"):
        return "it records no embeddings digest (built by an older version)"
    if old["embeddings_digest"] != new["embeddings_digest"]:
        return (f"it was built from other embeddings (digest {old['embeddings_digest'][:12]}, "
                f"{old.get('rows')} rows; now {new['embeddings_digest'][:12]}, "
                f"{new['rows']} rows)")
    trained = os.path.join(root, TRAINED)
    if os.path.exists(trained):
        problem = file_problem(trained, old.get("files", {}).get(TRAINED))
        if problem:
            return f"{TRAINED}: {problem}"
    return None


def _prepare_folder(root: str, meta: dict) -> tuple[dict, str | None]:
    """Under the folder lock: the description to build under (the folder's own when it holds
    this index), and why everything is rebuilt (None: what is there is kept)."""
    meta_path = os.path.join(root, INDEX_META)
    if not os.path.exists(meta_path):
        storage.write_json_atomic(meta_path, meta)
        return meta, None
    old = read_meta(root)
    changed = _recipe_changes(old, meta)
    if changed:
        raise ValueError(f"{root} holds an index built with other arguments "
                         f"({', '.join(changed)} differ); use a new output folder")
    reason = _rebuild_reason(root, old, meta)
    if reason:
        log.warning("%s: %s; rebuilding every shard", root, reason)
        _remove_built_files(root, old)
        storage.write_json_atomic(meta_path, meta)
        return meta, reason
    kept = {**old, "embeddings": meta["embeddings"], "encoder": meta["encoder"],
            "format_version": FORMAT_VERSION}
    if kept != old:
        storage.write_json_atomic(meta_path, kept)
    return kept, None


def _drop_merged(root: str, meta: dict, warn: bool = True) -> None:
    """A merged index no longer matches its shards: forget it and remove its files."""
    if warn and meta.get("merged"):
        log.warning("%s: the shards changed, so the merged index is removed (merge again)", root)
    meta["merged"] = None
    for stale in (MERGED, MERGED_DATA):
        meta.get("files", {}).pop(stale, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, stale))


def _record_file_locked(root: str, name: str, record: dict, digest: str | None,
                        shard: bool = False) -> dict:
    """Add a written file's size and sha256 to ``index.json`` (the caller holds the folder
    lock). A new shard makes a merged index stale."""
    meta = read_meta(root)
    if meta.get("embeddings_digest") != digest:
        raise ValueError(f"{os.path.join(root, INDEX_META)} changed while {name} was built "
                         "(another run rebuilt the index from other embeddings); "
                         f"{name} is not recorded")
    meta.setdefault("files", {})[name] = record
    if shard:
        _drop_merged(root, meta)
    storage.write_json_atomic(os.path.join(root, INDEX_META), meta)
    return meta


def _record_file(root: str, name: str, record: dict, digest: str | None,
                 shard: bool = False) -> dict:
    with _folder_lock(root):
        return _record_file_locked(root, name, record, digest, shard)


def _load_or_train(root: str, meta: dict, emb: Embeddings, train_size: int | None,
                   seed: int) -> faiss.Index:
    """``trained.index``: read it (checked), or train it once (the lock serialises processes)."""
    path = os.path.join(root, TRAINED)
    with _folder_lock(root):
        current = read_meta(root)
        if os.path.exists(path) and TRAINED in current.get("files", {}):
            return _read_checked(root, current, TRAINED)
        index = train_index(emb, meta["factory"], train_size, seed)
        _record_file_locked(root, TRAINED, _write_index_atomic(index, path),
                            meta["embeddings_digest"])
        return index


@dataclass
class BuildReport:
    """What one ``build_index_folder`` call did: shards built (new or repaired), shards kept,
    why everything was rebuilt (None: nothing was), and the index when it is complete."""

    built: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    repaired: dict[int, str] = field(default_factory=dict)
    rebuilt_all: str | None = None
    missing: list[int] = field(default_factory=list)
    index: ShardedIndex | None = None


def _shard_numbers(num_shards: int, shard: "int | Sequence[int] | None") -> list[int]:
    numbers = list(range(num_shards)) if shard is None else \
        ([shard] if isinstance(shard, int) else list(shard))
    for i in numbers:
        if not 0 <= i < num_shards:
            raise ValueError(f"index shard {i} is not in [0, {num_shards})")
    return numbers


@dataclass
class BuildPlan:
    """What a build works on: the embeddings, every shard's row range, the shard numbers
    to build now, and whether the factory's index stores global ids."""

    emb: Embeddings
    ranges: list[tuple[int, int]]
    numbers: list[int]
    global_ids: bool


def plan_build(embeddings: "Embeddings | str | np.ndarray", factory: str, num_shards: int,
               shard: "int | Sequence[int] | None") -> BuildPlan:
    """Check the arguments of a build (before any work) and say what it covers."""
    emb = as_embeddings(embeddings)
    if len(emb) == 0:
        raise ValueError("no embeddings to index")
    return BuildPlan(emb, shard_ranges(len(emb), num_shards), _shard_numbers(num_shards, shard),
                     takes_global_ids(new_index(emb.dim, factory)))


def build_index(embeddings: "Embeddings | str | np.ndarray", output: str | None = None,
                factory: str = "Flat", num_shards: int = 1,
                shard: "int | Sequence[int] | None" = None,
                train_size: int | None = None, seed: int = 0, progress: bool = True
                ) -> ShardedIndex | None:
    """Build ``num_shards`` index shards over the embeddings (all, or only shard ``shard``).

    With ``output=None`` the index lives in memory (e.g. for validation) and is returned.
    With an ``output`` folder, shards are written there (``shard`` builds one or some,
    so array tasks can split the work; existing shard files that match ``index.json`` are
    kept) and the full ``ShardedIndex`` is returned when every shard exists, else None.
    ``build_index_folder`` says what was built and kept.
    """
    if output is not None:
        return build_index_folder(embeddings, output, factory, num_shards, shard, train_size,
                                  seed, progress).index
    plan = plan_build(embeddings, factory, num_shards, shard)
    emb = plan.emb
    meta = _index_meta(emb, factory, plan.ranges, plan.global_ids, train_size, seed)
    trained = train_index(emb, factory, train_size, seed)
    built = [build_shard(emb, trained, *plan.ranges[i], progress, f"index shard {i}")
             for i in plan.numbers]
    return ShardedIndex(built, emb.dim, factory, meta)


def _write_shard(emb: Embeddings, trained: faiss.Index, rows: tuple[int, int], path: str,
                 progress: bool, number: int) -> dict:
    """Build index shard ``number`` and write it; its file record. The index is freed on
    return, before the next shard is built or the finished folder is loaded."""
    built = build_shard(emb, trained, *rows, progress, f"index shard {number}")
    return _write_index_atomic(built.index, path)


def build_index_folder(embeddings: "Embeddings | str | np.ndarray", output: str,
                       factory: str = "Flat", num_shards: int = 1,
                       shard: "int | Sequence[int] | None" = None,
                       train_size: int | None = None, seed: int = 0, progress: bool = True
                       ) -> BuildReport:
    """``build_index`` into a folder, reporting which shards were built, repaired and kept.

    A folder built from other embeddings (digest) is rebuilt from scratch; a shard whose
    file does not match its recorded size and sha256 (truncated, replaced) is rebuilt."""
    plan = plan_build(embeddings, factory, num_shards, shard)
    emb = plan.emb
    root = storage.normalize(output)
    storage.makedirs(root)
    report = BuildReport()
    with _folder_lock(root):
        meta, report.rebuilt_all = _prepare_folder(
            root, _index_meta(emb, factory, plan.ranges, plan.global_ids, train_size, seed, root))
    try:
        trained = _load_or_train(root, meta, emb, train_size, seed)
    except ValueError:
        if not any(n.endswith(".index") for n in os.listdir(root)):
            for name in (INDEX_META, LOCK):   # nothing built: leave no folder state
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(root, name))
        raise
    for i in plan.numbers:
        path = os.path.join(root, shard_file(i))
        problem = file_problem(path, meta.get("files", {}).get(shard_file(i)))
        if problem is None:
            log.info("index shard %d exists and matches %s, kept", i, INDEX_META)
            report.kept.append(i)
            continue
        if problem != "missing":
            log.warning("index shard %d (%s): %s; rebuilding it", i, path, problem)
            report.repaired[i] = problem
        record = _write_shard(emb, trained, plan.ranges[i], path, progress, i)
        meta = _record_file(root, shard_file(i), record, meta["embeddings_digest"], shard=True)
        report.built.append(i)
    with _folder_lock(root):
        meta = read_meta(root)
    report.missing = [i for i, s in enumerate(meta["shards"])
                      if s["file"] not in meta.get("files", {})
                      or not os.path.exists(os.path.join(root, s["file"]))]
    if not report.missing:
        report.index = ShardedIndex.load(root, use_gpu=False, prefer_merged=False,
                                         check_embeddings=False)
    return report


def merge_ondisk(root: str) -> str:
    """Merge IVF shards into ``merged.index`` + ``merged.ivfdata`` (FAISS on-disk lists)."""
    from faiss.contrib.ondisk import merge_ondisk as _merge

    root = storage.normalize(root)
    with _folder_lock(root):
        meta = read_meta(root)
        trained = _read_checked(root, meta, TRAINED)
        if not takes_global_ids(trained) or any(sh["offset"] is not None
                                                for sh in meta["shards"]):
            raise ValueError(f"--merge needs an IVF index, this one is {meta['factory']!r}")
        files = [os.path.join(root, s["file"]) for s in meta["shards"]]
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"index shard missing: {missing[0]} ({len(missing)} of "
                                    f"{len(files)} not built yet)")
        if meta.get("files") is not None:
            for s, path in zip(meta["shards"], files):
                problem = file_problem(path, meta["files"].get(s["file"]))
                if problem:
                    raise ValueError(f"{path}: {problem}; {REBUILD_HINT}")
        _drop_merged(root, meta, warn=False)
        storage.write_json_atomic(os.path.join(root, INDEX_META), meta)
        data = os.path.join(root, MERGED_DATA)
        try:
            _merge(trained, files, data)
        except RuntimeError as exc:
            raise ValueError(f"cannot merge the shards of {root}: {error_line(exc)}") from None
        record = _write_index_atomic(trained, os.path.join(root, MERGED))
        meta["merged"] = MERGED
        if meta.get("files") is not None:
            meta["files"][MERGED] = record
            meta["files"][MERGED_DATA] = {"size": os.path.getsize(data), "sha256": None}
        storage.write_json_atomic(os.path.join(root, INDEX_META), meta)
    return os.path.join(root, MERGED)

