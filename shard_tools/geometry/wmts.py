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


# ---------------------------------------------------------------- vectorised and inverse

def parse_tile_ids(image_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zoom, row, col) int arrays of many ``ZZ_RRRR_CCCC`` ids."""
    ids = [str(i) for i in image_ids]
    bad = [i for i in ids if not TILE_ID_RE.match(i)]
    if bad:
        raise ValueError(f"not an EarthLoc tile id (ZZ_RRRR_CCCC): {bad[0]!r}")
    if not ids:
        z = np.zeros(0, np.int64)
        return z, z.copy(), z.copy()
    arr = np.array([(int(i[0:2]), int(i[3:7]), int(i[8:12])) for i in ids], np.int64)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def tiles_bounds(zoom, row, col, size: int = MOSAIC) -> np.ndarray:
    """[N, 4] (lat_min, lon_min, lat_max, lon_max) of mosaics given as int arrays."""
    zoom, row, col = np.broadcast_arrays(*(np.asarray(a, np.int64) for a in (zoom, row, col)))
    return np.stack([row_to_lat(row + size, zoom), col_to_lon(col, zoom),
                     row_to_lat(row, zoom), col_to_lon(col + size, zoom)], axis=-1).reshape(-1, 4)


def tile_grid(zooms=(9, 10, 11), lat_min: float = -60.0, lat_max: float = 60.0,
              step: int = STEP, size: int = MOSAIC) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(zoom, row, col) of every id on the ``step`` grid whose mosaic centre is in the band.

    This is the id set of a full EarthLoc-style database (before any land filter).
    """
    out = []
    for z in zooms:
        n = 2 ** z
        rows = np.arange(0, n - size + 1, step)
        b = tiles_bounds(z, rows, np.zeros_like(rows), size)
        centre = (b[:, 0] + b[:, 2]) / 2.0
        rows = rows[(centre >= lat_min) & (centre <= lat_max)]
        cols = np.arange(0, n, step)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        out.append(np.stack([np.full(rr.size, z), rr.ravel(), cc.ravel()], axis=1))
    arr = np.concatenate(out) if out else np.zeros((0, 3), np.int64)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def tile_id_from_bounds(lat_min: float, lon_min: float, lat_max: float, lon_max: float,
                        size: int = MOSAIC, tol_deg: float = 1e-4) -> str:
    """The id of the mosaic with these bounds (inverse of ``tile_bounds``).

    The zoom follows from the longitude span; the row and column are rounded and
    the round trip is checked to ``tol_deg`` (EarthLoc names carry 5 decimals).
    """
    span = lon_max - lon_min
    if not span > 0:
        raise ValueError(f"bad bounds: lon_max {lon_max} must exceed lon_min {lon_min}")
    zoom = int(round(math.log2(size * 360.0 / span)))
    row = int(round(float(lat_to_row(lat_max, zoom))))
    col = int(round(float(lon_to_col(lon_min, zoom)))) % (2 ** zoom)
    image_id = format_tile_id(zoom, row, col)
    s, w, n, e = tile_bounds(image_id, size)
    got = np.array([s, w, n, e])
    want = np.array([lat_min, (lon_min + 180.0) % 360.0 - 180.0, lat_max, 0.0])
    want[3] = want[1] + span
    if not 0 <= row <= 2 ** zoom - size or np.abs(got - want).max() > tol_deg:
        raise ValueError(f"bounds ({lat_min}, {lon_min}, {lat_max}, {lon_max}) are not a "
                         f"z{zoom} mosaic (nearest {image_id}: {s:.5f}, {w:.5f}, {n:.5f}, "
                         f"{e:.5f})")
    return image_id
