"""End-to-end evaluation of embeddings: per-region index, search, ground truth, recall.

APL (EarthLoc): a test set is a region; its queries are those whose nadir is
within ``query_km`` of the centre, its database the ``year`` tiles within
``db_km`` (``shard_tools.regions``). Positives are the database tiles whose
footprint intersects the query's. The database is embedded at 4 rotations;
recall is reported over raw rows (as upstream) and with each tile's best
rotation only (dedupe). VPR: one database, positives within 25 m (UTM).
The average row is the mean over regions, as in EarthLoc2's results table.

Database and queries must come from one encoder: embeddings recording different
weights digests are refused unless ``allow_mixed_encoders``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from shard_tools import ground_truth
from shard_tools.geometry.footprints import footprints_from_records
from shard_tools.regions import Region, resolve_regions, select_database, select_queries

from .embed import Embeddings, as_embeddings, check_same_encoder
from .index import build_index
from .metrics import DEFAULT_KS, recall_at_k
from .search import dedupe, search

log = logging.getLogger(__name__)

PROTOCOLS = ("apl", "vpr")
# the record field each protocol's ground truth is computed from
PROTOCOL_FIELDS = {"apl": "footprint", "vpr": "utm"}


@dataclass
class RegionResult:
    """Recall of one region (or of the whole set, named "all")."""

    name: str
    queries: int
    dropped: int
    database: int
    rows: int
    recall: dict[int, float]
    recall_dedupe: dict[int, float] | None = None

    def to_dict(self) -> dict:
        out = {"name": self.name, "queries": self.queries, "dropped": self.dropped,
               "database": self.database, "rows": self.rows,
               "recall": {str(k): v for k, v in self.recall.items()}}
        if self.recall_dedupe is not None:
            out["recall_dedupe"] = {str(k): v for k, v in self.recall_dedupe.items()}
        return out


@dataclass
class EvalReport:
    protocol: str
    ks: list[int]
    regions: list[RegionResult] = field(default_factory=list)
    factory: str = "Flat"

    def _mean(self, attr: str) -> dict[int, float] | None:
        rows = [getattr(r, attr) for r in self.regions]
        if not rows or any(r is None for r in rows):
            return None
        return {k: float(np.mean([r[k] for r in rows])) for k in self.ks}

    @property
    def average(self) -> dict[int, float]:
        return self._mean("recall") or {}

    @property
    def average_dedupe(self) -> dict[int, float] | None:
        return self._mean("recall_dedupe")

    def to_dict(self) -> dict:
        out = {"protocol": self.protocol, "ks": self.ks, "factory": self.factory,
               "regions": [r.to_dict() for r in self.regions],
               "average": {str(k): v for k, v in self.average.items()}}
        if self.average_dedupe is not None:
            out["average_dedupe"] = {str(k): v for k, v in self.average_dedupe.items()}
        return out

    def table(self) -> str:
        """One row per region and the average; recall in percent."""
        heads = [f"R@{k}" for k in self.ks]
        has_dd = self.average_dedupe is not None
        cols = ["region", "queries", "dropped", "database"] + heads
        if has_dd:
            cols += [f"dd R@{k}" for k in self.ks]
        rows = []
        for r in self.regions:
            vals = [r.name, str(r.queries), str(r.dropped), str(r.database)]
            vals += [f"{r.recall[k]:.1f}" for k in self.ks]
            if has_dd:
                vals += [f"{r.recall_dedupe[k]:.1f}" for k in self.ks]
            rows.append(vals)
        if len(self.regions) > 1:
            avg = ["average", str(sum(r.queries for r in self.regions)),
                   str(sum(r.dropped for r in self.regions)), ""]
            avg += [f"{self.average[k]:.1f}" for k in self.ks]
            if has_dd:
                avg += [f"{self.average_dedupe[k]:.1f}" for k in self.ks]
            rows.append(avg)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        fmt = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)  # noqa: E731
                                     for i, (v, w) in enumerate(zip(vals, widths)))
        lines = [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        note = ("\nrecall in %; queries without a positive are dropped"
                + ("; dd = best rotation of each database image only" if has_dd else ""))
        return "\n".join(lines) + note


def _query_rows(q: Embeddings) -> np.ndarray:
    """Queries are evaluated at rotation 0 (or their first rotation)."""
    rot = q.rotation_of_row
    if not len(rot):
        return np.zeros(0, np.int64)
    want = 0 if (rot == 0).any() else int(rot.min())
    return np.flatnonzero(rot == want)


def check_protocol_record(protocol: str, record: Mapping[str, Any] | None, what: str) -> None:
    """Refuse a set whose records lack the protocol's field, before any work is spent on it
    (the first record stands for the set: a shard set holds one kind of record)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    need = PROTOCOL_FIELDS[protocol]
    if record is not None and record.get(need) is None:
        other = next(p for p, f in PROTOCOL_FIELDS.items() if f != need)
        raise ValueError(f"protocol {protocol} needs a {need!r} in each record, and the first "
                         f"record of {what} ({record.get('key')!r}) has none: is it a set for "
                         f"protocol {other}?")


def positives_for(protocol: str, db_records: Sequence[Mapping[str, Any]],
                  q_records: Sequence[Mapping[str, Any]], radius_m: float = 25.0
                  ) -> list[np.ndarray]:
    """Ground truth per protocol (indices into ``db_records``)."""
    if protocol == "apl":
        return ground_truth.apl_positives(footprints_from_records(db_records),
                                          footprints_from_records(q_records))
    if protocol == "vpr":
        return ground_truth.vpr_positives_from_records(db_records, q_records, radius_m)
    raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def evaluate_subset(db: Embeddings, db_images: np.ndarray, q_vectors: np.ndarray,
                    positives: Sequence[np.ndarray], ks: Sequence[int], factory: str = "Flat",
                    nprobe: int | None = None, with_dedupe: bool = True,
                    ef_search: int | None = None, k_factor: float | None = None,
                    warn: bool = True
                    ) -> tuple[dict[int, float], dict[int, float] | None, int, int]:
    """Recall of queries against the rows of the given database images.

    ``positives`` index into ``db_images``. Returns (recall, recall with dedupe or
    None, queries kept, queries dropped). ``warn=False`` keeps quiet about search knobs
    the index has no use for (said once per evaluation, not once per region).
    """
    img_of_row = db.image_of_row
    rows = np.flatnonzero(np.isin(img_of_row, db_images))
    lut = np.full(int(img_of_row.max()) + 1, -1, np.int64)
    lut[db_images] = np.arange(len(db_images))
    local_image = lut[img_of_row[rows]]
    index = build_index(Embeddings.from_arrays(db.take(rows)), None, factory, progress=False)
    kmax = max(ks)
    params = dict(nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)
    res = search(index, q_vectors, min(kmax, len(rows)), warn=warn, **params)
    ids = np.where(res.ids >= 0, local_image[np.maximum(res.ids, 0)], -1)
    plain = recall_at_k(ids, positives, ks)
    dd = None
    n_rot = int(np.bincount(local_image).max()) if len(local_image) else 1
    if with_dedupe and n_rot > 1:
        wide = search(index, q_vectors, min(kmax * n_rot, len(rows)), warn=False, **params)
        best = dedupe(wide, local_image, kmax)
        dd_ids = np.where(best.ids >= 0, local_image[np.maximum(best.ids, 0)], -1)
        dd = recall_at_k(dd_ids, positives, ks).recall
    return plain.recall, dd, plain.queries, plain.dropped


def evaluate(database: "Embeddings | str", queries: "Embeddings | str", protocol: str = "apl",
             regions: Sequence[str | Region] | None = None, ks: Sequence[int] = DEFAULT_KS,
             factory: str = "Flat", nprobe: int | None = None, year: int | None = 2021,
             radius_m: float = 25.0, ef_search: int | None = None,
             k_factor: float | None = None, allow_mixed_encoders: bool = False) -> EvalReport:
    """Recall@K of query embeddings against database embeddings, per region.

    ``regions`` (names, groups such as ``earthloc-test``, or ``name:lat,lon,q_km,db_km``)
    apply to APL; each gets its own index over its ``year`` database. Without
    regions the whole database is one set ("all", every year). An empty region
    (no query or no database image) is a ValueError, and so are records without the
    protocol's field and, unless ``allow_mixed_encoders``, embeddings of two encoders.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    ks = sorted({int(k) for k in ks})
    db, q = as_embeddings(database), as_embeddings(queries)
    check_same_encoder(db.encoder, q.encoder, "the database", "the query embeddings",
                       allow=allow_mixed_encoders)
    if len(db) == 0:
        raise ValueError("the database embeddings are empty")
    if db.dim != q.dim:
        raise ValueError(f"dimension mismatch: database {db.dim}-d, queries {q.dim}-d")
    q_rows = _query_rows(q)
    if not len(q_rows):
        raise ValueError("the query embeddings are empty")
    q_records = [q.records[i] for i in q_rows]
    db_records = db.image_records()
    check_protocol_record(protocol, db_records[0], "the database")
    check_protocol_record(protocol, q_records[0], "the queries")
    q_vectors = q.take(q_rows)
    report = EvalReport(protocol, ks, factory=factory)
    if regions:
        sets = []
        for region in resolve_regions(regions):
            d_mask = select_database(db_records, region, year)
            q_mask = select_queries(q_records, region)
            if not d_mask.any() or not q_mask.any():
                yr = f" of year {year}" if year is not None else ""
                raise ValueError(f"region {region.name!r} is empty: {int(q_mask.sum())} queries, "
                                 f"{int(d_mask.sum())} database images{yr}")
            sets.append((region.name, np.flatnonzero(d_mask), np.flatnonzero(q_mask)))
    else:
        sets = [("all", np.arange(len(db_records)), np.arange(len(q_records)))]
    for n_set, (name, d_idx, q_idx) in enumerate(sets):
        pos = positives_for(protocol, [db_records[i] for i in d_idx],
                            [q_records[i] for i in q_idx], radius_m)
        rec, rec_dd, kept, dropped = evaluate_subset(db, d_idx, q_vectors[q_idx], pos, ks,
                                                     factory, nprobe, ef_search=ef_search,
                                                     k_factor=k_factor, warn=n_set == 0)
        if kept == 0:
            log.warning("region %s: none of its %d queries has a positive", name, len(q_idx))
        n_rows = int(np.isin(db.image_of_row, d_idx).sum())
        report.regions.append(RegionResult(name, kept, dropped, len(d_idx), n_rows, rec, rec_dd))
        log.info("%s: %d queries (%d dropped), %d database images, R@1 %.1f", name, kept,
                 dropped, len(d_idx), rec[ks[0]] if not math.isnan(rec[ks[0]]) else float("nan"))
    return report
