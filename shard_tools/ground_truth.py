"""Ground truth for recall@K, and mined query pairs for training.

Small functions over arrays (FAISS-contrib style), with records-level wrappers:

- APL: a database tile is a positive for a query when their footprints
  intersect (EarthLoc's protocol).
- VPR: a database image is a positive when it lies within 25 m in UTM
  (inclusive), the protocol of the VPR benchmarks.
- Mining (EarthLoc2): query-tile pairs with footprint IoU strictly above a
  threshold, on the equal-area projection.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.spatial import cKDTree

from .geometry.footprints import footprints_from_records
from .geometry.overlap import FootprintSet, candidate_pairs, group_by_query, iou_pairs

log = logging.getLogger(__name__)

VPR_RADIUS_M = 25.0


def apl_positives(db_footprints: np.ndarray, q_footprints: np.ndarray,
                  progress: bool = False) -> list[np.ndarray]:
    """For each query, the sorted indices of database footprints that intersect it.

    Footprints are [N, 4, 2] (lat, lon) arrays (or prebuilt ``FootprintSet``s,
    to reuse one database index across calls).
    """
    q = q_footprints if isinstance(q_footprints, FootprintSet) else FootprintSet(q_footprints)
    qi, di = candidate_pairs(q, db_footprints, "intersects", progress=progress,
                             desc="apl positives")
    return group_by_query(qi, di, q.n)


def _utm_columns(utm: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """([N, 2] east/north in metres, [N] zones or None) of UTM rows."""
    rows = np.asarray(utm, dtype=object)
    if rows.size == 0:
        return np.zeros((0, 2)), None
    rows = rows.reshape(len(rows), -1)
    zones = rows[:, 2].astype(np.int64) if rows.shape[1] > 2 else None
    return rows[:, :2].astype(np.float64), zones


def vpr_positives(db_utm: Any, q_utm: Any, radius_m: float = VPR_RADIUS_M) -> list[np.ndarray]:
    """For each query, the sorted indices of database points within ``radius_m`` (inclusive).

    ``*_utm`` are rows ``[east, north]`` or ``[east, north, zone, band]``; with
    zones on both sides only points of the same zone are compared (UTM is
    planar per zone). One KD-tree per zone, queried in bulk.
    """
    db_xy, db_zone = _utm_columns(db_utm)
    q_xy, q_zone = _utm_columns(q_utm)
    if db_zone is None or q_zone is None:
        db_zone, q_zone = np.zeros(len(db_xy), np.int64), np.zeros(len(q_xy), np.int64)
    out: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(len(q_xy))]
    for zone in np.unique(q_zone):
        d_idx = np.flatnonzero(db_zone == zone)
        if not len(d_idx):
            continue
        q_idx = np.flatnonzero(q_zone == zone)
        hits = cKDTree(db_xy[d_idx]).query_ball_point(q_xy[q_idx], r=radius_m)
        for i, h in zip(q_idx, hits):
            out[i] = np.sort(d_idx[np.asarray(h, np.int64)])
    return out


def iou_mining(db_footprints: np.ndarray, q_footprints: np.ndarray, min_iou: float = 0.5,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(database index, query index, IoU) of pairs with IoU > ``min_iou``, sorted by database."""
    qi, di, iou = iou_pairs(q_footprints, db_footprints, min_iou, progress=progress)
    order = np.lexsort((qi, di))
    return di[order], qi[order], iou[order]


def mine_pairs(db_records: Sequence[Mapping[str, Any]], q_records: Sequence[Mapping[str, Any]],
               min_iou: float = 0.5, progress: bool = False) -> dict[str, list[str]]:
    """``{database source: sorted query sources}`` with footprint IoU > ``min_iou``.

    Only database images with at least one query appear, as in EarthLoc2's files.
    """
    di, qi, _ = iou_mining(footprints_from_records(db_records),
                           footprints_from_records(q_records), min_iou, progress)
    pairs: dict[str, list[str]] = {}
    for d, q in zip(di.tolist(), qi.tolist()):
        pairs.setdefault(db_records[d]["source"], []).append(q_records[q]["source"])
    return {k: sorted(v) for k, v in sorted(pairs.items())}


def apl_positives_from_records(db_records: Iterable[Mapping[str, Any]],
                               q_records: Iterable[Mapping[str, Any]],
                               progress: bool = False) -> list[np.ndarray]:
    """``apl_positives`` on records' footprints."""
    return apl_positives(footprints_from_records(db_records), footprints_from_records(q_records),
                         progress=progress)


def vpr_positives_from_records(db_records: Iterable[Mapping[str, Any]],
                               q_records: Iterable[Mapping[str, Any]],
                               radius_m: float = VPR_RADIUS_M) -> list[np.ndarray]:
    """``vpr_positives`` on records' ``utm`` fields."""
    def utm(records):
        rows = []
        for r in records:
            u = r.get("utm")
            if u is None:
                raise ValueError(f"record {r.get('source') or r.get('key')!r} has no utm")
            if not isinstance(u, (list, tuple)) or len(u) < 3:
                raise ValueError(f"record {r.get('source') or r.get('key')!r} has utm {u!r}: "
                                 "it needs [easting, northing, zone number, ...]")
            rows.append(list(u[:3]))
        return np.asarray(rows, np.float64).reshape(-1, 3)
    return vpr_positives(utm(db_records), utm(q_records), radius_m)


def positives_to_lists(positives: Sequence[np.ndarray]) -> list[list[int]]:
    """JSON-ready lists of ints."""
    return [np.asarray(p, np.int64).tolist() for p in positives]
