"""Footprints and points as RFC 7946 GeoJSON.

RFC 7946: positions are ``[longitude, latitude]``; rings are closed (last
position equals the first); exterior rings are counter-clockwise; a geometry
that crosses the antimeridian is split into a MultiPolygon whose parts stay
within [-180, 180].
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import shapely
from shapely.geometry import Polygon, box
from shapely.geometry.polygon import orient

from shard_tools.geometry.footprints import unwrap_footprints

DECIMALS = 6


def _ring(poly: Polygon) -> list[list[float]]:
    coords = [[round(float(x), DECIMALS), round(float(y), DECIMALS)]
              for x, y in orient(poly, 1.0).exterior.coords]
    if coords[0] != coords[-1]:
        coords.append(list(coords[0]))
    return coords


def footprint_geometry(footprint: Sequence[Sequence[float]]) -> dict:
    """A GeoJSON Polygon (or MultiPolygon across the antimeridian) of 4 ``[lat, lon]`` corners."""
    fp = unwrap_footprints(np.asarray(footprint, np.float64).reshape(1, 4, 2))[0]
    poly = Polygon([(lon, lat) for lat, lon in fp])
    if not poly.is_valid:
        poly = shapely.make_valid(poly).convex_hull  # a self-crossing corner order
    lo, hi = poly.bounds[0], poly.bounds[2]
    if lo >= -180.0 and hi <= 180.0:
        return {"type": "Polygon", "coordinates": [_ring(poly)]}
    parts = []
    for shift in (-360.0, 0.0, 360.0):
        window = box(-180.0 + shift, -90.0, 180.0 + shift, 90.0)
        piece = poly.intersection(window)
        for geom in getattr(piece, "geoms", [piece]):
            if isinstance(geom, Polygon) and not geom.is_empty and geom.area > 0:
                parts.append(shapely.affinity.translate(geom, -shift, 0.0))
    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": [_ring(parts[0])]}
    return {"type": "MultiPolygon", "coordinates": [[_ring(p)] for p in parts]}


def point_geometry(lat: float, lon: float) -> dict:
    lon = (float(lon) + 180.0) % 360.0 - 180.0
    return {"type": "Point", "coordinates": [round(lon, DECIMALS), round(float(lat), DECIMALS)]}


def record_geometry(record: Mapping[str, Any]) -> dict | None:
    """The footprint polygon of a record, else its point, else None."""
    fp = record.get("footprint")
    if fp is not None and len(fp) == 4:
        return footprint_geometry(fp)
    if record.get("lat") is not None and record.get("lon") is not None:
        return point_geometry(record["lat"], record["lon"])
    return None


def feature(geometry: dict | None, **properties: Any) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def feature_collection(features: Iterable[dict]) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


# ---------------------------------------------------------------- validation

def _signed_area(ring: Sequence[Sequence[float]]) -> float:
    x = np.asarray([p[0] for p in ring])
    y = np.asarray([p[1] for p in ring])
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def geometry_problems(geometry: Mapping[str, Any]) -> list[str]:
    """RFC 7946 problems of a Point/Polygon/MultiPolygon (empty list: valid)."""
    problems = []

    def position(p, where):
        if len(p) < 2 or not all(isinstance(v, (int, float)) for v in p):
            problems.append(f"{where}: bad position {p}")
        elif not (-180.0 <= p[0] <= 180.0 and -90.0 <= p[1] <= 90.0):
            problems.append(f"{where}: position {p} outside lon [-180, 180] / lat [-90, 90]")

    def polygon(rings, where):
        for j, ring in enumerate(rings):
            if len(ring) < 4:
                problems.append(f"{where} ring {j}: fewer than 4 positions")
                continue
            if list(ring[0]) != list(ring[-1]):
                problems.append(f"{where} ring {j}: not closed")
            for p in ring:
                position(p, f"{where} ring {j}")
            area = _signed_area(ring)
            if j == 0 and area <= 0:
                problems.append(f"{where}: exterior ring is not counter-clockwise")
            if j > 0 and area >= 0:
                problems.append(f"{where}: hole {j} is not clockwise")

    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "Point":
        position(coords, "Point")
    elif kind == "Polygon":
        polygon(coords, "Polygon")
    elif kind == "MultiPolygon":
        for i, rings in enumerate(coords):
            polygon(rings, f"MultiPolygon part {i}")
    else:
        problems.append(f"unsupported geometry type {kind!r}")
    return problems
