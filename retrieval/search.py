"""Search index shards and merge their top-k (inner product: larger is better).

``merge_topk`` is the one place where results meet: it sorts by score
descending and breaks ties by global id ascending, so any split of the
database into shards, and any number of ranks, gives the same answer.
Missing results are id -1 with score -inf, and sort last.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from shard_tools.cli import error_line

from .distributed import comm_device
from .index import ShardedIndex

log = logging.getLogger(__name__)

# what each search knob needs, for the warning when an index has no use for it
KNOB_NEEDS = {"nprobe": ("--nprobe", "IVF lists"), "ef_search": ("--ef-search", "HNSW graph"),
              "k_factor": ("--k-factor", "',RFlat' refine stage")}
SHOWN_ROWS = 5


@dataclass
class SearchResult:
    """Top-k per query: ``scores`` float32 ``[Q, k]`` (descending) and global row ``ids``."""

    scores: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def merge_topk(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The k best of several ``[Q, k_i]`` result lists per query (larger score first, then
    smaller id). Invalid entries (id < 0) become (-inf, -1) and sort last."""
    s = np.concatenate([np.asarray(x, np.float32) for x in scores], axis=1)
    i = np.concatenate([np.asarray(x, np.int64) for x in ids], axis=1)
    bad = i < 0
    s = np.where(bad, -np.inf, s).astype(np.float32)
    i = np.where(bad, np.iinfo(np.int64).max, i)
    order = np.lexsort((i, -s), axis=-1)[:, :k]
    s = np.take_along_axis(s, order, axis=1)
    i = np.take_along_axis(i, order, axis=1)
    i[~np.isfinite(s)] = -1
    if s.shape[1] < k:  # fewer candidates than k: pad
        pad = k - s.shape[1]
        s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
        i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
    return s, i


def _search_shards(index: ShardedIndex, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ss, ii = [], []
    for shard in index.shards:
        kk = min(k, max(1, int(shard.index.ntotal)))
        try:
            s, i = shard.index.search(x, kk)
        except RuntimeError as exc:
            raise ValueError(f"FAISS search failed: {error_line(exc)}") from None
        if shard.offset is not None:
            i = np.where(i >= 0, i + shard.offset, -1)
        ss.append(s)
        ii.append(i)
    if not ss:
        return (np.full((len(x), k), -np.inf, np.float32), np.full((len(x), k), -1, np.int64))
    return merge_topk(ss, ii, k)


def check_finite(vectors: np.ndarray, what: str = "query") -> None:
    """Refuse rows holding NaN or Inf (FAISS returns no results for them, silently),
    naming the first few rows."""
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1)) if vectors.size else []
    if len(bad):
        shown = ", ".join(str(int(r)) for r in bad[:SHOWN_ROWS])
        more = f", ... ({len(bad)} of {len(vectors)} rows)" if len(bad) > SHOWN_ROWS else \
            f" ({len(bad)} of {len(vectors)})"
        raise ValueError(f"{what} rows {shown}{more} hold NaN or Inf values")


def check_queries(index: ShardedIndex, queries: np.ndarray) -> np.ndarray:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"queries must be [Q, D], got shape {q.shape}")
    if q.shape[1] != index.dim:
        raise ValueError(f"dimension mismatch: the index holds {index.dim}-d vectors, "
                         f"the queries are {q.shape[1]}-d")
    check_finite(q)
    return q


def warn_unused_knobs(index: ShardedIndex, unused: set[str]) -> None:
    """One warning line per search knob the index has no use for (it would do nothing)."""
    for name in sorted(unused):
        flag, needs = KNOB_NEEDS[name]
        log.warning("%s (%s) has no effect on a %s index (no %s): ignored", name, flag,
                    index.factory, needs)


def search(index: ShardedIndex, queries: np.ndarray, k: int, nprobe: int | None = None,
           batch_size: int = 4096, progress: bool = False, ef_search: int | None = None,
           k_factor: float | None = None, warn: bool = True) -> SearchResult:
    """Top-k global row ids of every query over all shards of ``index`` (this process).

    ``nprobe`` (IVF), ``ef_search`` (HNSW) and ``k_factor`` (``,RFlat`` re-ranking depth)
    stay set on the index for later searches; None leaves each as it is. A knob the
    index has no use for is a warning (``warn=False``: silent, e.g. on other ranks)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = check_queries(index, queries)
    unused = index.set_params(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)
    if warn:
        warn_unused_knobs(index, unused)
    out_s = np.empty((len(q), k), np.float32)
    out_i = np.empty((len(q), k), np.int64)
    with tqdm(total=len(q), unit="query", desc="search", disable=not progress) as bar:
        for a in range(0, len(q), batch_size):
            s, i = _search_shards(index, q[a:a + batch_size], k)
            out_s[a:a + len(s)], out_i[a:a + len(s)] = s, i
            bar.update(len(s))
    return SearchResult(out_s, out_i)


def dedupe(result: SearchResult, group_of_id: np.ndarray, k: int) -> SearchResult:
    """Keep the best-scoring entry of each group (e.g. a database image over its rotations).

    Search with ``k * rotations`` candidates so that ``k`` distinct groups survive.
    """
    groups = np.asarray(group_of_id, np.int64)
    n, width = result.ids.shape
    out_s = np.full((n, k), -np.inf, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    for q in range(n):
        ids = result.ids[q]
        valid = ids >= 0
        g = np.where(valid, groups[np.where(valid, ids, 0)], -1)
        _, first = np.unique(g, return_index=True)
        keep = np.sort(first)
        keep = keep[valid[keep]][:k]
        out_s[q, :len(keep)] = result.scores[q, keep]
        out_i[q, :len(keep)] = ids[keep]
    return SearchResult(out_s, out_i)


# ---------------------------------------------------------------- distributed

def _broadcast_array(x: np.ndarray | None, src: int = 0) -> np.ndarray:
    rank, dev = dist.get_rank(), comm_device()
    shape = torch.zeros(2, dtype=torch.int64, device=dev)
    if rank == src:
        shape[:] = torch.tensor(x.shape, dtype=torch.int64, device=dev)
    dist.broadcast(shape, src)
    buf = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dev) if rank == src else \
        torch.empty(tuple(shape.tolist()), dtype=torch.float32, device=dev)
    dist.broadcast(buf, src)
    return buf.cpu().numpy()


def search_distributed(index: ShardedIndex, queries: np.ndarray | None, k: int,
                       nprobe: int | None = None, batch_size: int = 4096,
                       progress: bool = False, ef_search: int | None = None,
                       k_factor: float | None = None) -> SearchResult:
    """Each rank holds some index shards; queries (given on rank 0) are broadcast, every
    rank searches its shards, and the per-rank top-k are all-gathered and merged.

    Every rank returns the full merged result, equal to one process searching all
    shards. Without an initialised process group this is ``search``. Collectives
    use CUDA tensors under NCCL and CPU tensors otherwise (gloo).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return search(index, queries, k, nprobe, batch_size, progress, ef_search, k_factor)
    q = _broadcast_array(None if queries is None else np.asarray(queries, np.float32))
    if q.shape[1] != index.dim:
        raise ValueError(f"dimension mismatch: the index holds {index.dim}-d vectors, "
                         f"the queries are {q.shape[1]}-d")
    rank0 = dist.get_rank() == 0
    local = search(index, q, k, nprobe, batch_size, progress and rank0, ef_search, k_factor,
                   warn=rank0)
    world, dev = dist.get_world_size(), comm_device()
    s_all = [torch.empty((len(q), k), dtype=torch.float32, device=dev) for _ in range(world)]
    i_all = [torch.empty((len(q), k), dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(s_all, torch.from_numpy(local.scores).to(dev))
    dist.all_gather(i_all, torch.from_numpy(local.ids).to(dev))
    s, i = merge_topk([t.cpu().numpy() for t in s_all], [t.cpu().numpy() for t in i_all], k)
    return SearchResult(s, i)
