"""Footprints as arrays and as polygons on an equal-area projection.

A footprint is four ``[lat, lon]`` corners (EarthLoc file order). Overlaps are
measured on the cylindrical equal-area projection ``x = lon (radians), y =
sin(lat)``: areas there are true spherical areas (times R^2) for lat/lon
rectangles such as WMTS tiles, and IoU there recovers every published
EarthLoc2 mined pair (planar IoU in degrees does not).

Antimeridian: each footprint's longitudes are unwrapped around its first
corner and shifted so that its mean longitude lies in [-180, 180). A polygon
may then reach past x = +-pi; overlap code compares it with copies of the
other polygons shifted by +-2 pi (see ``overlap.py``). Footprints that
contain a pole are not supported (no EarthLoc footprint does).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import shapely

from .wmts import EARTH_RADIUS_KM

TWO_PI = 2.0 * np.pi


def footprints_from_records(records: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """[N, 4, 2] (lat, lon) corners of records; raises if one has no footprint."""
    out = []
    for r in records:
        fp = r.get("footprint")
        if fp is None or len(fp) != 4:
            raise ValueError(f"record {r.get('source') or r.get('key')!r} has no 4-corner "
                             "footprint")
        out.append(fp)
    return np.asarray(out, np.float64).reshape(-1, 4, 2)


def rectangles_to_footprints(bounds: np.ndarray) -> np.ndarray:
    """[N, 4] (lat_min, lon_min, lat_max, lon_max) -> [N, 4, 2] corners SW, NW, NE, SE."""
    b = np.asarray(bounds, np.float64).reshape(-1, 4)
    s, w, n, e = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return np.stack([np.stack([s, w], 1), np.stack([n, w], 1),
                     np.stack([n, e], 1), np.stack([s, e], 1)], axis=1)


def unwrap_footprints(footprints: np.ndarray) -> np.ndarray:
    """Longitudes made continuous around corner 0, then mean longitude put in [-180, 180).

    The result may hold longitudes beyond +-180 for footprints that cross the
    antimeridian; it is the canonical form the overlap code works on.
    """
    fp = np.array(footprints, np.float64).reshape(-1, 4, 2)
    lon = fp[..., 1]
    lon0 = lon[:, :1]
    lon = lon0 + (lon - lon0 + 180.0) % 360.0 - 180.0
    mean = lon.mean(axis=1, keepdims=True)
    lon -= mean - ((mean + 180.0) % 360.0 - 180.0)
    fp[..., 1] = lon
    return fp


def equal_area_xy(footprints: np.ndarray) -> np.ndarray:
    """[N, 4, 2] corners projected to (x = lon radians, y = sin lat), after unwrapping."""
    fp = unwrap_footprints(footprints)
    return np.stack([np.radians(fp[..., 1]), np.sin(np.radians(fp[..., 0]))], axis=-1)


def polygons_from_xy(xy: np.ndarray) -> np.ndarray:
    """Shapely polygons (vectorised) from [N, 4, 2] projected corners; orientation fixed."""
    xy = np.asarray(xy, np.float64).reshape(-1, 4, 2)
    ring = np.concatenate([xy, xy[:, :1]], axis=1)
    return shapely.polygons(ring)


def footprint_polygons(footprints: np.ndarray) -> np.ndarray:
    """Equal-area shapely polygons of [N, 4, 2] (lat, lon) footprints."""
    return polygons_from_xy(equal_area_xy(footprints))


def crosses_antimeridian(footprints: np.ndarray) -> np.ndarray:
    """Mask of footprints that reach past +-180 once unwrapped."""
    lon = unwrap_footprints(footprints)[..., 1]
    return (lon.max(axis=1) > 180.0) | (lon.min(axis=1) < -180.0)


def xy_area(xy: np.ndarray) -> np.ndarray:
    """Shoelace area of [N, 4, 2] quadrilaterals (absolute: corner order does not matter).

    Valid for simple (non self-intersecting) quadrilaterals, which footprints are.
    """
    x, y = xy[..., 0], xy[..., 1]
    return 0.5 * np.abs(np.sum(x * np.roll(y, -1, axis=-1) - np.roll(x, -1, axis=-1) * y,
                               axis=-1))


def footprint_area_km2(footprints: np.ndarray, radius_km: float = EARTH_RADIUS_KM) -> np.ndarray:
    """Area on the sphere (equal-area projection, edges straight in it), in km^2."""
    return xy_area(equal_area_xy(footprints)) * radius_km ** 2
