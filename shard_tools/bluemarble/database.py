"""The demo database: which EarthLoc mosaics to render, and their names and folders.

Ids follow EarthLoc: 4x4 mosaics of WMTS tiles on a 2-tile step, centres
between latitudes -60 and 60. Mosaics that are nearly all open ocean carry no
place to recognise, so they are skipped (EarthLoc's database is land, too).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..formats import (
    earthloc_database_folder, empty_record, footprint_centroid, format_earthloc_name,
)
from ..geometry.wmts import (
    MOSAIC, STEP, format_tile_id, lat_to_row, lon_to_col, tile_area_km2, tile_center,
    tile_footprint, tile_grid, tiles_bounds,
)
from .source import SourceImage

log = logging.getLogger(__name__)

TILE_DECIMALS = 5   # real tile names carry 5 decimals


@dataclass(frozen=True, order=True)
class Tile:
    """One mosaic: the WMTS zoom, row and column of its top-left tile."""

    zoom: int
    row: int
    col: int

    @property
    def image_id(self) -> str:
        return format_tile_id(self.zoom, self.row, self.col)


def land_fractions(land: np.ndarray, source: SourceImage, zoom: np.ndarray, row: np.ndarray,
                   col: np.ndarray) -> np.ndarray:
    """Share of land source pixels inside each mosaic's lat/lon rectangle (vectorised).

    A Mercator mosaic covers a lat/lon rectangle, which is a pixel rectangle of
    the equirectangular source, so a summed-area table answers each in O(1).
    Mosaics that reach past +-180 wrap around.
    """
    h, w = land.shape
    b = tiles_bounds(zoom, row, col)
    y0 = np.clip(np.floor(source.lat_to_y(b[:, 2]) + 0.5).astype(np.int64), 0, h - 1)
    y1 = np.clip(np.ceil(source.lat_to_y(b[:, 0]) + 0.5).astype(np.int64), y0 + 1, h)
    x0 = np.floor(source.lon_to_x(b[:, 1]) + 0.5).astype(np.int64) % w
    span = np.clip(np.rint((b[:, 3] - b[:, 1]) / 360.0 * w).astype(np.int64), 1, w)
    x1 = x0 + span
    extra = int(max(0, x1.max() - w)) if len(x1) else 0
    wide = np.concatenate([land, land[:, :extra]], axis=1)        # wrap past +180
    sat = np.zeros((h + 1, w + extra + 1), np.int32)
    sat[1:, 1:] = wide.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    total = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return total / ((y1 - y0) * (x1 - x0))


def plan_tiles(land: np.ndarray, source: SourceImage, zooms: tuple[int, ...],
               min_land: float = 0.05, lat_min: float = -60.0,
               lat_max: float = 60.0) -> list[Tile]:
    """The mosaics to render at ``zooms``: the EarthLoc grid minus open-ocean mosaics."""
    z, r, c = tile_grid(zooms, lat_min, lat_max)
    keep = land_fractions(land, source, z, r, c) >= min_land
    for zoom in zooms:
        at = z == zoom
        log.info("zoom %d: %d of %d mosaics have >= %.0f%% land", zoom, int(keep[at].sum()),
                 int(at.sum()), 100 * min_land)
    return [Tile(int(a), int(b), int(d)) for a, b, d in zip(z[keep], r[keep], c[keep])]


def covering_ids(lat: float, lon: float, zoom: int, step: int = STEP,
                 mosaic: int = MOSAIC) -> list[Tile]:
    """The grid mosaics at ``zoom`` whose bounds contain (lat, lon)."""
    n = 2 ** zoom
    fr, fc = float(lat_to_row(lat, zoom)), float(lon_to_col(lon, zoom)) % n
    out = []
    for r in range(int(fr // step) * step, int(fr) - mosaic, -step):
        if not 0 <= r <= n - mosaic:
            continue
        for c in range(int(fc // step) * step, int(fc) - mosaic, -step):
            out.append(Tile(zoom, r, c % n))
    return out


def tile_record(tile: Tile, year: int) -> dict:
    """The metadata record of a tile in one year: what its EarthLoc name parses to.

    Corners are rounded to the name's 5 decimals, the nadir is the tile centre
    and the area the integer km^2, as in the real names.
    """
    image_id = tile.image_id
    footprint = [[round(a, TILE_DECIMALS), round(b, TILE_DECIMALS)]
                 for a, b in tile_footprint(image_id)]
    nadir = [round(v, TILE_DECIMALS) for v in tile_center(image_id)]
    clat, clon = footprint_centroid(footprint)
    record = empty_record(
        kind="database", lat=clat, lon=clon, footprint=footprint, image_id=image_id,
        place_id=image_id, year=year, timestamp=str(year), nadir=nadir,
        area_km2=float(round(tile_area_km2(image_id))), orientation_deg=0.0,
    )
    record["source"] = tile_relpath(record)
    return record


def tile_relpath(record: dict) -> str:
    """``database/<year>_<zoom>/<lat10>_<lon10>/<EarthLoc name>`` (EarthLoc's layout)."""
    name = format_earthloc_name(record, decimals=TILE_DECIMALS, nadir_decimals=TILE_DECIMALS)
    return f"{earthloc_database_folder(record)}/{name}"
