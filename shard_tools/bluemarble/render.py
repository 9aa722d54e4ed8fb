"""Resampling the equirectangular source: Web Mercator tiles and arbitrary ground grids.

A database tile must show exactly the ground inside its bounds, so each
output pixel centre is mapped to its latitude (through the Mercator y) and
longitude, and the source is sampled there bilinearly. A tile's latitude
depends only on the output row and its longitude only on the column, so tiles
are resampled separably (rows, then columns); when one output pixel spans
several source pixels, ``k`` evenly spaced sub-samples per axis are averaged
(a box prefilter) so coarse zooms do not alias.
"""
from __future__ import annotations

import math

import numpy as np

from ..geometry.wmts import MOSAIC, col_to_lon, row_to_lat
from .camera import Camera
from .source import SourceImage


def supersampling(src_px_per_out_px: float) -> int:
    """Sub-samples per axis: 1 when upsampling, else enough to cover each output pixel."""
    return max(1, math.ceil(src_px_per_out_px - 0.25))


def bilinear_taps(coords: np.ndarray, n: int, wrap: bool, k: int = 1,
                  spacing: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights ``[S, 2k]`` that sample a length-``n`` axis at ``coords``.

    ``coords`` are fractional pixel positions (centres at integers); with
    ``k > 1`` each output averages ``k`` positions spread over ``spacing``
    (the output pixel's extent in source pixels). ``wrap`` wraps indices (longitude),
    otherwise they are clamped to the edge (latitude).
    """
    coords = np.asarray(coords, np.float64)
    offsets = (np.arange(k) + 0.5) / k - 0.5                       # [k] in (-0.5, 0.5)
    pos = coords[:, None] + offsets[None, :] * np.asarray(spacing, np.float64).reshape(-1, 1)
    lo = np.floor(pos)
    frac = pos - lo
    lo = lo.astype(np.int64)
    idx = np.concatenate([lo, lo + 1], axis=1)
    w = np.concatenate([1.0 - frac, frac], axis=1) / k
    idx = np.mod(idx, n) if wrap else np.clip(idx, 0, n - 1)
    return idx, w


def resample_separable(pixels: np.ndarray, row_taps: tuple[np.ndarray, np.ndarray],
                       col_taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``out[i, j] = sum_ab wr[i, a] wc[j, b] pixels[ir[i, a], ic[j, b]]``: float32 [S, T, C]."""
    ir, wr = row_taps
    ic, wc = col_taps
    rows, cols = np.unique(ir), np.unique(ic)
    crop = pixels[np.ix_(rows, cols)].astype(np.float32)          # only the pixels we need
    lr, lc = np.searchsorted(rows, ir), np.searchsorted(cols, ic)
    wr, wc = wr.astype(np.float32), wc.astype(np.float32)
    tmp = np.zeros((ir.shape[0], crop.shape[1], crop.shape[2]), np.float32)
    for t in range(ir.shape[1]):
        tmp += wr[:, t, None, None] * crop[lr[:, t]]
    out = np.zeros((ir.shape[0], ic.shape[0], crop.shape[2]), np.float32)
    for t in range(ic.shape[1]):
        out += wc[None, :, t, None] * tmp[:, lc[:, t]]
    return out


def tile_pixel_latlon(zoom: int, row: int, col: int, size: int,
                      mosaic: int = MOSAIC) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes of the output rows' centres and longitudes of the columns' centres."""
    frac = (np.arange(size) + 0.5) / size * mosaic
    return row_to_lat(row + frac, zoom), col_to_lon(col + frac, zoom)


def render_tile_float(source: SourceImage, zoom: int, row: int, col: int, size: int,
                      mosaic: int = MOSAIC) -> np.ndarray:
    """The mosaic ``(zoom, row, col)`` as float32 ``[size, size, 3]`` in 0..255, before JPEG."""
    lats, lons = tile_pixel_latlon(zoom, row, col, size, mosaic)
    edges = np.arange(size + 1) / size * mosaic
    lat_edges = row_to_lat(row + edges, zoom)
    dy = np.abs(np.diff(lat_edges)) * source.height / 180.0      # source px per output row
    dx = mosaic / size / 2.0 ** zoom * source.width               # source px per output column
    ky, kx = supersampling(float(dy.max())), supersampling(dx)
    row_taps = bilinear_taps(source.lat_to_y(lats), source.height, wrap=False, k=ky, spacing=dy)
    col_taps = bilinear_taps(source.lon_to_x(lons), source.width, wrap=True, k=kx, spacing=dx)
    return resample_separable(source.pixels, row_taps, col_taps)


def render_tile(source: SourceImage, zoom: int, row: int, col: int, size: int,
                mosaic: int = MOSAIC) -> np.ndarray:
    """The mosaic as uint8 ``[size, size, 3]`` (row 0 north, column 0 west)."""
    return to_uint8(render_tile_float(source, zoom, row, col, size, mosaic))


def sample_bilinear(source: SourceImage, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Source colours (float32, 0..255) at arbitrary (lat, lon) grids; longitude wraps."""
    y = source.lat_to_y(lat)
    x = source.lon_to_x(lon)
    y0 = np.floor(y)
    x0 = np.floor(x)
    fy = (y - y0).astype(np.float32)[..., None]
    fx = (x - x0).astype(np.float32)[..., None]
    y0 = y0.astype(np.int64)
    x0 = x0.astype(np.int64)
    ya, yb = np.clip(y0, 0, source.height - 1), np.clip(y0 + 1, 0, source.height - 1)
    xa, xb = np.mod(x0, source.width), np.mod(x0 + 1, source.width)
    p = source.pixels
    top = p[ya, xa].astype(np.float32) * (1 - fx) + p[ya, xb].astype(np.float32) * fx
    bottom = p[yb, xa].astype(np.float32) * (1 - fx) + p[yb, xb].astype(np.float32) * fx
    return top * (1 - fy) + bottom * fy


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round and clip a float 0..255 image to uint8."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_view(source: SourceImage, camera: Camera, size: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``camera`` sees: float32 ``[size, size, 3]`` (0..255) and each pixel's slant/altitude.

    Each pixel centre goes through the camera's image-to-ground homography to
    the local ground plane, then to (lat, lon), where the source is sampled.
    """
    u, v = camera.pixel_grid(size)
    lat, lon, slant = camera.ground_latlon(u, v)
    return sample_bilinear(source, lat, lon), slant
