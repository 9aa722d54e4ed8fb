"""Which footprints overlap, and by how much: STRtree candidates, vectorised shapely.

Everything works on [N, 4, 2] (lat, lon) footprint arrays and returns index
arrays, never a Python loop over pairs. Pairs are found with a shapely 2
STRtree over the equal-area polygons of ``footprints.py``; polygons that reach
past the antimeridian are also indexed as copies shifted by +-2 pi, so a
footprint crossing +-180 meets tiles on both sides.
"""
from __future__ import annotations

import logging

import numpy as np
import shapely
from tqdm.auto import tqdm

from .footprints import TWO_PI, equal_area_xy, polygons_from_xy, xy_area

log = logging.getLogger(__name__)

CHUNK = 4096   # queries per STRtree bulk query: bounds memory, drives the progress bar


class FootprintSet:
    """Equal-area polygons of a footprint array, with their wrapped copies and areas."""

    def __init__(self, footprints: np.ndarray):
        xy = equal_area_xy(footprints)
        self.n = len(xy)
        self.polygons = polygons_from_xy(xy)
        self.area = xy_area(xy)
        self.bounds = np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1)  # x0 y0 x1 y1
        x = xy[..., 0]
        east, west = x.max(axis=1) > np.pi, x.min(axis=1) < -np.pi
        self.wraps = east | west
        # all variants: the polygons, then copies shifted into [-pi, pi] from either side
        copies, owners = [self.polygons], [np.arange(self.n)]
        for mask, dx in ((east, -TWO_PI), (west, TWO_PI)):
            idx = np.flatnonzero(mask)
            if len(idx):
                copies.append(shift_x(self.polygons[idx], dx))
                owners.append(idx)
        self.variants = np.concatenate(copies)
        self.owner = np.concatenate(owners)
        self._tree: shapely.STRtree | None = None

    @property
    def tree(self) -> shapely.STRtree:
        if self._tree is None:
            self._tree = shapely.STRtree(self.variants)
        return self._tree


def shift_x(polygons: np.ndarray, dx: float) -> np.ndarray:
    """Polygons translated by ``dx`` in x (a longitude shift of dx radians)."""
    return shapely.transform(polygons, lambda c: c + np.array([dx, 0.0]))


def _as_set(fp) -> FootprintSet:
    return fp if isinstance(fp, FootprintSet) else FootprintSet(fp)


def _unique_pairs(qi: np.ndarray, di: np.ndarray, n_db: int) -> tuple[np.ndarray, np.ndarray]:
    key = np.unique(qi.astype(np.int64) * max(n_db, 1) + di.astype(np.int64))
    return key // max(n_db, 1), key % max(n_db, 1)


def candidate_pairs(queries, database, predicate: str | None = "intersects",
                    progress: bool = False, desc: str = "overlaps"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(query index, database index) of footprints whose polygons satisfy ``predicate``.

    ``predicate=None`` gives bounding-box candidates (cheapest superset).
    Pairs are unique and sorted by query, then database index.
    """
    q, db = _as_set(queries), _as_set(database)
    tree = db.tree
    out_q, out_d = [], []
    q_var, q_owner = q.variants, q.owner
    order = np.argsort(q_owner, kind="stable")  # chunks follow query order
    bar = tqdm(total=len(order), desc=desc, unit="q", disable=not progress, leave=False)
    for start in range(0, len(order), CHUNK):
        sel = order[start:start + CHUNK]
        hits = tree.query(q_var[sel], predicate=predicate)
        out_q.append(q_owner[sel][hits[0]])
        out_d.append(db.owner[hits[1]])
        bar.update(len(sel))
    bar.close()
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return _unique_pairs(np.concatenate(out_q), np.concatenate(out_d), db.n)


def intersection_area(queries, database, qi: np.ndarray, di: np.ndarray) -> np.ndarray:
    """Equal-area intersection of the given pairs (units of the projection: rad x 1).

    Across the antimeridian the true overlap is the sum over relative shifts of
    -2 pi, 0 and +2 pi; those are computed only for pairs where one side wraps.
    """
    q, db = _as_set(queries), _as_set(database)
    qi, di = np.asarray(qi, np.int64), np.asarray(di, np.int64)
    inter = shapely.area(shapely.intersection(q.polygons[qi], db.polygons[di]))
    wrap = np.flatnonzero(q.wraps[qi] | db.wraps[di])
    if len(wrap):
        for dx in (-TWO_PI, TWO_PI):
            shifted = shift_x(db.polygons[di[wrap]], dx)
            inter[wrap] += shapely.area(shapely.intersection(q.polygons[qi[wrap]], shifted))
    return inter


def pair_iou(queries, database, qi: np.ndarray, di: np.ndarray) -> np.ndarray:
    """IoU (equal-area) of the given (query, database) index pairs."""
    q, db = _as_set(queries), _as_set(database)
    inter = intersection_area(q, db, qi, di)
    union = q.area[qi] + db.area[di] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _prune_by_iou_bound(q: FootprintSet, db: FootprintSet, qi: np.ndarray, di: np.ndarray,
                        min_iou: float) -> tuple[np.ndarray, np.ndarray]:
    a, b = q.area[qi], db.area[di]
    bq, bd = q.bounds[qi], db.bounds[di]
    ix = np.minimum(bq[:, 2], bd[:, 2]) - np.maximum(bq[:, 0], bd[:, 0])
    iy = np.minimum(bq[:, 3], bd[:, 3]) - np.maximum(bq[:, 1], bd[:, 1])
    inter = np.minimum(np.clip(ix, 0, None) * np.clip(iy, 0, None), np.minimum(a, b))
    # pairs that wrap may overlap through a shifted copy: their boxes do not bound them
    inter = np.where(q.wraps[qi] | db.wraps[di], np.minimum(a, b), inter)
    bound = inter / np.maximum(a + b - inter, 1e-300)
    keep = bound > min_iou - 1e-12
    return qi[keep], di[keep]


def iou_pairs(queries, database, min_iou: float = 0.0, progress: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, database index, IoU) of every pair with IoU strictly above ``min_iou``.

    Bounding-box candidates are pruned before any polygon is clipped, by an upper
    bound of their IoU: the intersection is at most min(bbox overlap, area a,
    area b), and IoU = I / (a + b - I) grows with I.
    """
    q, db = _as_set(queries), _as_set(database)
    qi, di = candidate_pairs(q, db, predicate=None, progress=progress, desc="iou")
    if min_iou > 0 and len(qi):
        qi, di = _prune_by_iou_bound(q, db, qi, di, min_iou)
    iou = pair_iou(q, db, qi, di)
    keep = iou > min_iou
    return qi[keep], di[keep], iou[keep]


def iou_matrix(a_footprints: np.ndarray, b_footprints: np.ndarray | None = None) -> np.ndarray:
    """Dense [len(a), len(b)] IoU (b defaults to a): for small sets such as one batch."""
    a = _as_set(a_footprints)
    b = a if b_footprints is None else _as_set(b_footprints)
    out = np.zeros((a.n, b.n))
    qi, di, iou = iou_pairs(a, b, 0.0)
    out[qi, di] = iou
    return out


def intersects_matrix(a_footprints: np.ndarray, b_footprints: np.ndarray | None = None
                      ) -> np.ndarray:
    """Dense [len(a), len(b)] boolean "footprints intersect" (b defaults to a)."""
    a = _as_set(a_footprints)
    b = a if b_footprints is None else _as_set(b_footprints)
    out = np.zeros((a.n, b.n), bool)
    qi, di = candidate_pairs(a, b, "intersects")
    out[qi, di] = True
    return out


def group_by_query(qi: np.ndarray, di: np.ndarray, n_queries: int) -> list[np.ndarray]:
    """Split pairs sorted by query into one database-index array per query."""
    bounds = np.searchsorted(qi, np.arange(n_queries + 1))
    return [di[bounds[i]:bounds[i + 1]] for i in range(n_queries)]
