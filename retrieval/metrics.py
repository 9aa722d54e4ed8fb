"""Recall@K: a query is correct at K when any of its first K results is a positive.

Queries without any positive are dropped from the average and counted
(EarthLoc's and the VPR benchmarks' protocol). Result lists may hold -1 for
"no result" and may repeat a database image (rotations without dedupe); recall
looks only at positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 20, 100)


@dataclass
class RecallResult:
    """``recall[k]`` in percent over ``queries`` evaluated; ``dropped`` had no positive."""

    recall: dict[int, float] = field(default_factory=dict)
    queries: int = 0
    dropped: int = 0

    def to_dict(self) -> dict:
        return {"recall": {str(k): v for k, v in self.recall.items()},
                "queries": self.queries, "dropped": self.dropped}


def first_hit_rank(ids: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """0-based rank of each query's first positive in ``ids`` (``inf`` when none; -1 when
    the query has no positive at all)."""
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 2:
        raise ValueError(f"ids must be [Q, K], got shape {ids.shape}")
    if len(positives) != len(ids):
        raise ValueError(f"{len(ids)} result lists but {len(positives)} positive lists")
    out = np.full(len(ids), np.inf)
    for q, pos in enumerate(positives):
        pos = np.asarray(pos, np.int64)
        if not len(pos):
            out[q] = -1
            continue
        hits = np.flatnonzero(np.isin(ids[q], pos) & (ids[q] >= 0))
        if len(hits):
            out[q] = hits[0]
    return out


def recall_at_k(ids: np.ndarray, positives: Sequence[np.ndarray],
                ks: Sequence[int] = DEFAULT_KS) -> RecallResult:
    """Recall@K in percent for each K (a K beyond the list length uses the whole list)."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"recall Ks must be >= 1, got {ks}")
    rank = first_hit_rank(ids, positives)
    kept = rank >= 0
    n = int(kept.sum())
    res = RecallResult(queries=n, dropped=int((~kept).sum()))
    for k in ks:
        res.recall[k] = float(100.0 * (rank[kept] < k).sum() / n) if n else float("nan")
    return res
