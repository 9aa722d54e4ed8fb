"""Synthetic astronaut photographs: where they look, their EarthLoc names, their split.

A query looks at a land point that lies inside a kept database mosaic at every
zoom, so it always has positives. Its footprint area follows the real EarthLoc
queries' distribution (5,000-100,000 km^2, median ~10,800), its nadir lies
tens to hundreds of km away like the real oblique photographs', and its
orientation is anything in 0..360. The split is by named regions, with
EarthLoc's rules: a query is a test query when its nadir lies within a test
region's ``query_km``; a training query has its nadir and its footprint centre
outside every test region, so evaluation regions are unseen in training.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..formats import empty_record, footprint_centroid, format_earthloc_name
from ..geometry.distances import haversine_km
from ..geometry.footprints import footprint_area_km2
from ..regions import Region, select_queries
from .camera import Camera, oblique_camera
from .database import Tile, covering_ids

log = logging.getLogger(__name__)

QUERY_DECIMALS = 6    # real query names: 6-decimal corners ...
NADIR_DECIMALS = 1    # ... and a 1-decimal nadir
# (quantile, km^2) of the 17,752 real EarthLoc query footprint areas (queries.txt)
AREA_QUANTILES = ((0.0, 5001.0), (0.05, 5271.0), (0.10, 5563.0), (0.25, 6754.0),
                  (0.50, 10832.0), (0.75, 23370.0), (0.90, 56995.0), (0.95, 71692.0),
                  (0.99, 92493.0), (1.0, 99994.0))
NADIR_KM = (30.0, 700.0, 320.0)   # range and median of the nadir-to-footprint distance
YEARS = (2001, 2023)              # the real photographs' years
MAX_TRIES = 200                   # draws per query before giving up on its region


@dataclass(frozen=True)
class QuerySpec:
    """Everything needed to name and render one query: its truth and its camera."""

    index: int
    split: str               # "train" or "test"
    region: str | None       # test queries: the region drawn for (its query_km holds the nadir)
    image_id: str
    timestamp: str
    footprint: tuple[tuple[float, float], ...]   # TL, BL, BR, TR, rounded as in the name
    nadir: tuple[float, float]
    area_km2: float
    orientation_deg: float
    camera: Camera


def sample_area_km2(rng: np.random.Generator, scale: float = 1.0) -> float:
    """An area from the real queries' distribution (log-linear between quantiles)."""
    q, a = np.array(AREA_QUANTILES).T
    return float(np.exp(np.interp(rng.random(), q, np.log(a)))) * scale


def sample_nadir_km(rng: np.random.Generator) -> float:
    lo, hi, median = NADIR_KM
    return float(np.clip(median * math.exp(rng.normal(0.0, 0.6)), lo, hi))


def iss_id(rng: np.random.Generator, year: int, month: int, taken: set[str]) -> str:
    """``ISS0NN-E-NNNNN``: the expedition follows the date (about 3 a year since late 2000)."""
    expedition = int(np.clip(round(1 + (year + (month - 1) / 12 - 2000.9) * 2.9), 1, 99))
    while True:
        image_id = f"ISS{expedition:03d}-E-{int(rng.integers(10000, 100000)):05d}"
        if image_id not in taken:
            taken.add(image_id)
            return image_id


def fixed(value: float, decimals: int) -> float:
    """``value`` exactly as a name with ``decimals`` decimals parses back."""
    return float(f"{value:.{decimals}f}")


class LandSampler:
    """Land points, uniform in area, that lie in a kept mosaic at every zoom.

    Land pixels are pooled on a grid of at most ~2,700 columns (so a pool's
    distance test stays cheap for large sources); a drawn point is jittered
    inside its grid cell.
    """

    def __init__(self, land: np.ndarray, tiles: Sequence[Tile], lat_limit: float = 58.0):
        h, w = land.shape
        stride = max(1, w // 2700)
        coarse = land[::stride, ::stride]
        ys, xs = np.nonzero(coarse)
        self.cell = 360.0 / w * stride
        lat = 90.0 - (ys * stride + 0.5 * stride) * 180.0 / h
        ok = np.abs(lat) <= lat_limit
        self.lat = lat[ok]
        self.lon = (xs[ok] * stride + 0.5 * stride) * 360.0 / w - 180.0
        self.kept = set(tiles)
        self.zooms = sorted({t.zoom for t in tiles})
        if not len(self.lat) or not self.zooms:
            raise ValueError("no land inside the database: nothing for queries to look at")

    def covered(self, lat: float, lon: float) -> bool:
        """Whether every zoom has a kept mosaic that contains the point."""
        return all(any(t in self.kept for t in covering_ids(lat, lon, z)) for z in self.zooms)

    def pool(self, region: Region | None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, cumulative area weights) of the land cells, within ``region.query_km``
        of its centre when a region is given."""
        if region is None:
            idx = np.arange(len(self.lat))
        else:
            d = haversine_km(self.lat, self.lon, region.lat, region.lon)
            idx = np.flatnonzero(d <= region.query_km)
        return idx, np.cumsum(np.cos(np.radians(self.lat[idx])))

    def draw(self, rng: np.random.Generator, pool: tuple[np.ndarray, np.ndarray]
             ) -> tuple[float, float] | None:
        """A random point of one pooled cell, or None when no kept mosaic covers it."""
        idx, cdf = pool
        j = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(idx) - 1)
        k = idx[j]
        lat = float(self.lat[k] + (rng.random() - 0.5) * self.cell)
        lon = float(self.lon[k] + (rng.random() - 0.5) * self.cell)
        return (lat, lon) if self.covered(lat, lon) else None


def _draw_spec(rng: np.random.Generator, sampler: LandSampler,
               pool: tuple[np.ndarray, np.ndarray],
               area_scale: float) -> tuple[Camera, np.ndarray, tuple[float, float], float,
                                              float] | None:
    """One random view of a land point in ``idx``: (camera, footprint, nadir, area, orient)."""
    look = sampler.draw(rng, pool)
    if look is None:
        return None
    area = sample_area_km2(rng, area_scale)
    nadir_km = sample_nadir_km(rng)
    azimuth = float(rng.uniform(0.0, 360.0))
    up = float(rng.uniform(0.0, 360.0))
    cam = None
    while cam is None and nadir_km > 1.0:
        cam = oblique_camera(look[0], look[1], area, nadir_km, azimuth, up)
        nadir_km *= 0.7                                           # too oblique: look steeper
    if cam is None:
        return None
    fp = np.array([[fixed(v, QUERY_DECIMALS) for v in c] for c in cam.footprint()])
    lon = fp[:, 1]
    if lon.max() - lon.min() > 180.0 or np.abs(fp[:, 0]).max() > 85.0:
        return None                                               # crosses +-180 or a pole
    nadir = tuple(fixed(v, NADIR_DECIMALS) for v in cam.nadir())
    area_true = float(round(float(footprint_area_km2(fp[None])[0])))
    orient = fixed(cam.orientation_deg(), 1) % 360.0
    return cam, fp, nadir, area_true, orient


def sample_queries(seed: int, count: int, test_fraction: float, regions: Sequence[Region],
                   sampler: LandSampler, area_scale: float = 1.0) -> list[QuerySpec]:
    """``count`` query specs: ``round(count * test_fraction)`` around the test regions.

    Test queries are spread evenly over the regions (each draws centres within
    its ``query_km``; a draw whose rounded nadir falls outside is redrawn).
    Training queries are drawn over all land and redrawn when their nadir or
    footprint centre falls inside any test region.
    """
    if count < 0:
        raise ValueError(f"--queries must be >= 0, got {count}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"the test fraction must be in [0, 1], got {test_fraction}")
    regions = list(regions)
    n_test = int(round(count * test_fraction)) if regions else 0
    rng = np.random.default_rng([seed, 2])
    pools = {r.name: sampler.pool(r) for r in regions} if n_test else {}
    for name, (idx, _) in pools.items():
        if not len(idx):
            raise ValueError(f"test region {name!r} holds no land of the database")
    everywhere = sampler.pool(None)
    taken: set[str] = set()
    specs: list[QuerySpec] = []
    for i in range(count):
        test = i < n_test
        region = regions[i % len(regions)] if test else None
        pool = pools[region.name] if test else everywhere
        for _ in range(MAX_TRIES):
            drawn = _draw_spec(rng, sampler, pool, area_scale)
            if drawn is None:
                continue
            cam, fp, nadir, area, orient = drawn
            if test:
                if select_queries(np.array([nadir]), region)[0]:
                    break
                continue
            points = np.array([nadir, footprint_centroid(fp.tolist())])
            if not any(select_queries(points, r).any() for r in regions):
                break
        else:
            raise ValueError(f"could not place a {'test' if test else 'training'} query "
                             f"{'in ' + region.name if test else 'outside the test regions'} "
                             f"after {MAX_TRIES} draws")
        year = int(rng.integers(YEARS[0], YEARS[1] + 1))
        month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        specs.append(QuerySpec(
            index=i, split="test" if test else "train", region=region.name if test else None,
            image_id=iss_id(rng, year, month, taken), timestamp=f"{year:04d}{month:02d}{day:02d}",
            footprint=tuple((float(a), float(b)) for a, b in fp), nadir=nadir, area_km2=area,
            orientation_deg=orient, camera=cam,
        ))
    return specs


def query_record(spec: QuerySpec) -> dict:
    """The metadata record of a query: what its EarthLoc name parses to."""
    footprint = [list(c) for c in spec.footprint]
    lat, lon = footprint_centroid(footprint)
    record = empty_record(
        kind="query", lat=lat, lon=lon, footprint=footprint, image_id=spec.image_id,
        year=int(spec.timestamp[:4]), month=int(spec.timestamp[4:6]), timestamp=spec.timestamp,
        nadir=list(spec.nadir), area_km2=spec.area_km2, orientation_deg=spec.orientation_deg,
    )
    record["source"] = query_relpath(spec, record)
    return record


def query_relpath(spec: QuerySpec, record: dict | None = None) -> str:
    """``queries/<train|test>/<EarthLoc name>``."""
    if record is None:
        return query_record(spec)["source"]
    name = format_earthloc_name(record, decimals=QUERY_DECIMALS, nadir_decimals=NADIR_DECIMALS)
    return f"queries/{spec.split}/{name}"
