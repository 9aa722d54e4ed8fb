"""Named regions: EarthLoc's test and validation sets, and users' own.

A region is a centre with two radii: queries are kept when their nadir lies
within ``query_km`` of the centre, database tiles when their centre lies within
``db_km`` (haversine, R = 6371 km). The same regions exclude queries from
training-pair mining, so that no test query leaks into training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .geometry.distances import haversine_km

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """A circle on the Earth: queries within ``query_km``, database within ``db_km``."""

    name: str
    lat: float
    lon: float
    query_km: float
    db_km: float

    def spec(self) -> str:
        """The ``name:lat,lon,query_km,db_km`` text that ``parse_region`` reads back."""
        return f"{self.name}:{self.lat:g},{self.lon:g},{self.query_km:g},{self.db_km:g}"


def _test(name: str, lat: float, lon: float) -> Region:
    return Region(name, lat, lon, 2500.0, 5000.0)


REGIONS: dict[str, Region] = {
    r.name: r for r in (
        _test("alps", 45.0, 10.0),
        _test("texas", 30.0, -95.0),
        _test("toshka", 23.0, 30.0),
        _test("amazon", -3.0, -60.0),
        _test("napa", 38.0, -122.0),
        _test("gobi", 40.0, 105.0),
        Region("earthloc-val", 30.0, -95.0, 500.0, 1200.0),
        Region("earthloc2-val", 30.0, -95.0, 1000.0, 2200.0),
    )
}
REGION_GROUPS: dict[str, tuple[str, ...]] = {
    "earthloc-test": ("alps", "texas", "toshka", "amazon", "napa", "gobi"),
}


def parse_region(spec: str) -> Region:
    """A known region name, or ``name:lat,lon,query_km,db_km``."""
    spec = spec.strip()
    if spec in REGIONS:
        return REGIONS[spec]
    name, sep, rest = spec.partition(":")
    if not sep:
        known = ", ".join(list(REGIONS) + list(REGION_GROUPS))
        raise ValueError(f"unknown region {spec!r}: use one of {known}, "
                         "or name:lat,lon,query_km,db_km")
    if not name:
        raise ValueError(f"bad region {spec!r}: a region spec needs a new name before ':'")
    if name in REGIONS or name in REGION_GROUPS:
        raise ValueError(f"bad region {spec!r}: {name!r} is a built-in region and cannot be "
                         f"redefined; give your region another name")
    parts = rest.split(",")
    if len(parts) != 4:
        raise ValueError(f"bad region {spec!r}: expected name:lat,lon,query_km,db_km")
    try:
        lat, lon, qkm, dkm = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"bad region {spec!r}: lat, lon, query_km and db_km must be "
                         "numbers") from None
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 360.0):
        raise ValueError(f"bad region {spec!r}: lat must be in [-90, 90], lon in [-180, 360]")
    if not (np.isfinite(qkm) and np.isfinite(dkm)) or qkm < 0 or dkm < 0:
        raise ValueError(f"bad region {spec!r}: radii must be finite and >= 0")
    return Region(name, lat, lon, qkm, dkm)


def resolve_regions(names: Iterable[str | Region]) -> list[Region]:
    """Regions for names, groups (``earthloc-test``) and specs; duplicates kept once."""
    out: dict[str, Region] = {}
    for item in names:
        if isinstance(item, Region):
            regions = [item]
        elif item.strip() in REGION_GROUPS:
            regions = [REGIONS[n] for n in REGION_GROUPS[item.strip()]]
        else:
            regions = [parse_region(item)]
        for r in regions:
            if r.name in out and out[r.name] != r:
                raise ValueError(f"region {r.name!r} given twice with different parameters")
            out[r.name] = r
    return list(out.values())


# ---------------------------------------------------------------- points

def _points(items: Any, field: str) -> np.ndarray:
    """[N, 2] (lat, lon) from records (``field``: "nadir" or "centroid") or from an array."""
    if isinstance(items, np.ndarray):
        return items.astype(np.float64).reshape(-1, 2)
    items = list(items)
    if not items:
        return np.zeros((0, 2))
    if isinstance(items[0], Mapping):
        if field == "nadir":
            pts = [r.get("nadir") or (r["lat"], r["lon"]) for r in items]
        elif field == "centroid":
            pts = [(r["lat"], r["lon"]) for r in items]
        else:
            raise ValueError(f"by must be 'nadir' or 'centroid', got {field!r}")
        return np.asarray(pts, np.float64).reshape(-1, 2)
    return np.asarray(items, np.float64).reshape(-1, 2)


def within_km(points: np.ndarray, region: Region, km: float) -> np.ndarray:
    """Boolean mask of the (lat, lon) rows within ``km`` of the region's centre."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    return haversine_km(pts[:, 0], pts[:, 1], region.lat, region.lon) <= km


def select_queries(records_or_nadirs: Any, region: Region) -> np.ndarray:
    """Queries of a test set: nadir within ``region.query_km`` (EarthLoc's rule)."""
    return within_km(_points(records_or_nadirs, "nadir"), region, region.query_km)


def select_database(records_or_centres: Any, region: Region,
                    year: int | None = 2021) -> np.ndarray:
    """Database of a test set: centre within ``region.db_km``, and of ``year`` when given.

    For tiles the record centre (footprint centroid) is the centre of the tile's
    lat/lon rectangle. ``year`` applies to records only (arrays carry no year).
    """
    items = records_or_centres
    if not isinstance(items, np.ndarray):
        items = list(items)
    mask = within_km(_points(items, "centroid"), region, region.db_km)
    if year is not None and len(items) and isinstance(items[0], Mapping):
        mask &= np.fromiter((r.get("year") == year for r in items), bool, len(items))
    return mask


def outside_regions(records: Any, regions: Sequence[Region], by: str = "centroid",
                    km: float | None = None) -> np.ndarray:
    """Mask of records farther than ``km`` (default each region's ``query_km``) from every
    region centre: the queries that training-pair mining may use.

    ``by="centroid"`` measures from the footprint centre (EarthLoc2's mining rule),
    ``by="nadir"`` from the nadir.
    """
    pts = _points(records, by)
    keep = np.ones(len(pts), bool)
    for r in regions:
        keep &= ~within_km(pts, r, r.query_km if km is None else km)
    return keep


def region_masks(items: Any, names: Iterable[str | Region], kind: str = "queries",
                 year: int | None = 2021) -> dict[str, np.ndarray]:
    """``{name: mask}`` per region name, spec or group (a group is the union of its members).

    ``kind`` is "queries" (nadir within ``query_km``) or "database" (centre within
    ``db_km``, of ``year``).
    """
    if kind not in ("queries", "database"):
        raise ValueError(f"kind must be 'queries' or 'database', got {kind!r}")
    items = items if isinstance(items, np.ndarray) else list(items)

    def one(r: Region) -> np.ndarray:
        return select_queries(items, r) if kind == "queries" else select_database(items, r, year)

    out: dict[str, np.ndarray] = {}
    for name in names:
        if isinstance(name, str) and name.strip() in REGION_GROUPS:
            mask = np.zeros(len(items), bool)
            for r in resolve_regions([name]):
                mask |= one(r)
            out[name.strip()] = mask
        else:
            r = name if isinstance(name, Region) else parse_region(name)
            out[r.name] = one(r)
    return out


def region_counts(queries: Any, names: Iterable[str | Region], database: Any = None,
                  year: int | None = 2021) -> dict[str, dict[str, int | None]]:
    """``{region: {"queries": n, "database": m or None}}``; groups count their union."""
    names = list(names)
    q = region_masks(queries, names, "queries")
    d = None if database is None else region_masks(database, names, "database", year)
    return {k: {"queries": int(m.sum()), "database": None if d is None else int(d[k].sum())}
            for k, m in q.items()}
