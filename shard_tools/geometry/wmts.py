"""WMTS (EPSG:3857) tile ids of EarthLoc mosaics: ``ZZ_RRRR_CCCC`` <-> bounds.

An EarthLoc database image is a 4x4 mosaic of 256 px tiles whose top-left
tile is (zoom, row, col); neighbouring images step by 2 tiles.
"""
from __future__ import annotations

import math

import numpy as np

from ..formats import TILE_ID_RE

MOSAIC = 4          # tiles per side of one database image
STEP = 2            # tiles between neighbouring image ids
EARTH_RADIUS_KM = 6378.137   # WGS84 equatorial radius: reproduces EarthLoc's tile areas


def parse_tile_id(image_id: str) -> tuple[int, int, int]:
    """``"10_0510_0614"`` -> (10, 510, 614)."""
    m = TILE_ID_RE.match(image_id)
    if not m:
        raise ValueError(f"not an EarthLoc tile id (ZZ_RRRR_CCCC): {image_id!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def format_tile_id(zoom: int, row: int, col: int) -> str:
    return f"{zoom:02d}_{row:04d}_{col:04d}"


def row_to_lat(row, zoom: int):
    """Latitude (degrees) of the top edge of tile row ``row`` (array-friendly)."""
    n = 2.0 ** zoom
    return np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * np.asarray(row, dtype=np.float64) / n))))


def col_to_lon(col, zoom: int):
    """Longitude (degrees) of the left edge of tile column ``col`` (array-friendly)."""
    return np.asarray(col, dtype=np.float64) / (2.0 ** zoom) * 360.0 - 180.0


def lat_to_row(lat, zoom: int):
    """Fractional tile row of a latitude (inverse of ``row_to_lat``)."""
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    return (1.0 - np.arcsinh(np.tan(phi)) / np.pi) / 2.0 * (2.0 ** zoom)


def lon_to_col(lon, zoom: int):
    """Fractional tile column of a longitude (inverse of ``col_to_lon``)."""
    return (np.asarray(lon, dtype=np.float64) + 180.0) / 360.0 * (2.0 ** zoom)


def tile_bounds(image_id: str, size: int = MOSAIC) -> tuple[float, float, float, float]:
    """(lat_min, lon_min, lat_max, lon_max) of the mosaic whose top-left tile is ``image_id``."""
    zoom, row, col = parse_tile_id(image_id)
    return (float(row_to_lat(row + size, zoom)), float(col_to_lon(col, zoom)),
            float(row_to_lat(row, zoom)), float(col_to_lon(col + size, zoom)))


def tile_footprint(image_id: str, size: int = MOSAIC) -> list[list[float]]:
    """Corners in EarthLoc file order: SW, NW, NE, SE (as ``[lat, lon]``)."""
    s, w, n, e = tile_bounds(image_id, size)
    return [[s, w], [n, w], [n, e], [s, e]]


def tile_center(image_id: str, size: int = MOSAIC) -> tuple[float, float]:
    """Mean of the bounds: what EarthLoc tile names carry in their nadir fields."""
    s, w, n, e = tile_bounds(image_id, size)
    return (s + n) / 2.0, (w + e) / 2.0


def tile_area_km2(image_id: str, size: int = MOSAIC) -> float:
    """Spherical area of the lat/lon rectangle, R = WGS84 equatorial radius."""
    s, w, n, e = tile_bounds(image_id, size)
    return (EARTH_RADIUS_KM ** 2 * math.radians(e - w)
            * (math.sin(math.radians(n)) - math.sin(math.radians(s))))


def tile_id_at(lat: float, lon: float, zoom: int, step: int = STEP) -> str:
    """The id on the ``step`` grid whose mosaic's top-left quadrant holds (lat, lon).

    With step 2 and a 4x4 mosaic every point lies in four mosaics; this returns
    the one whose top-left tile is the nearest grid point at or above-left.
    """
    row = int(math.floor(float(lat_to_row(lat, zoom)) / step) * step)
    col = int(math.floor(float(lon_to_col(lon, zoom)) / step) * step)
    return format_tile_id(zoom, row, col)
