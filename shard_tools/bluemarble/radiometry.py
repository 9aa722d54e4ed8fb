"""Appearance changes: per-year looks of the database, and the camera/atmosphere of queries.

The Blue Marble is a single picture, so the "years" of the database are
deterministic radiometric variants of it (gamma, brightness, colour balance,
haze, and a seasonal greening/browning that flips between hemispheres), and a
query gets its own colour shift, haze that thickens with the slant range,
clouds, blur and sensor noise. All randomness comes from generators the caller
seeds, so the same seed gives the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

HAZE_RGB = np.array([0.72, 0.78, 0.86], np.float32)   # bluish-white scattered skylight


@dataclass(frozen=True)
class YearLook:
    """The radiometric variant of one database year (applies to every tile of that year)."""

    year: int
    gamma: float
    brightness: float
    gains: tuple[float, float, float]
    haze: float
    season: float   # +1: northern summer (greener north, browner south), -1: the reverse


def year_look(seed: int, year: int) -> YearLook:
    """The look of ``year``: a fixed function of (seed, year)."""
    rng = np.random.default_rng([seed, 1, year])
    return YearLook(
        year=year, gamma=float(rng.uniform(0.88, 1.12)), brightness=float(rng.uniform(0.92, 1.08)),
        gains=tuple(float(g) for g in rng.uniform(0.95, 1.05, 3)),
        haze=float(rng.uniform(0.0, 0.07)), season=float(rng.uniform(-1.0, 1.0)),
    )


def seasonal_weight(image: np.ndarray, row_lats: np.ndarray) -> np.ndarray:
    """[H, W] float32 in -1..1: how much a pixel greens up in a northern summer.

    Vegetation (green over red and blue) counts; the sign flips with the
    hemisphere and fades towards the equator. It does not depend on the year,
    so a tile computes it once for all its years.
    """
    x = image.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    veg = np.clip((g - b) * 6.0, 0.0, 1.0) * np.clip((g - r + 0.05) * 8.0, 0.0, 1.0)
    hemi = np.clip(np.asarray(row_lats, np.float32) / 30.0, -1.0, 1.0)[:, None]
    return veg * hemi


def year_lut(look: YearLook) -> np.ndarray:
    """[3, 256] uint8: colour balance, brightness, gamma and haze of a year, per channel."""
    i = np.arange(256, dtype=np.float64)[None, :] / 255.0
    gain = np.asarray(look.gains, np.float64)[:, None] * look.brightness
    x = np.clip(i * gain, 0.0, 1.0) ** look.gamma
    x = x * (1.0 - look.haze) + HAZE_RGB[:, None].astype(np.float64) * look.haze
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def apply_year_look(image: np.ndarray, look: YearLook, seasonal: np.ndarray) -> np.ndarray:
    """A float 0..255 ``[H, W, 3]`` tile in the look of one year -> uint8.

    ``seasonal`` is the tile's ``seasonal_weight``: vegetation greens (and
    reddens less) in its hemisphere's summer, browns in its winter.
    """
    s = look.season * seasonal
    lut = year_lut(look)
    out = np.empty(image.shape, np.uint8)
    for c, factor in ((0, 1.0 - 0.06 * s), (1, 1.0 + 0.07 * s), (2, None)):
        ch = image[..., c] if factor is None else image[..., c] * factor
        out[..., c] = lut[c][np.clip(np.rint(ch), 0, 255).astype(np.uint8)]
    return out


@dataclass(frozen=True)
class QueryLook:
    """The atmosphere and camera of one synthetic astronaut photograph."""

    gamma: float
    brightness: float
    gains: tuple[float, float, float]
    haze_depth: float      # optical depth per altitude of slant range
    cloud_cover: float     # fraction of the image under cloud (0: clear)
    blur_px: float         # Gaussian sigma at 256 px
    noise: float           # sensor noise, 0..1 units


def query_look(rng: np.random.Generator) -> QueryLook:
    """A random look: a third of the photographs are clear, the others partly cloudy."""
    cover = 0.0 if rng.random() < 0.35 else float(rng.uniform(0.05, 0.45))
    return QueryLook(
        gamma=float(rng.uniform(0.85, 1.2)), brightness=float(rng.uniform(0.85, 1.15)),
        gains=tuple(float(g) for g in rng.normal(1.0, 0.06, 3)),
        haze_depth=float(rng.uniform(0.03, 0.3)), cloud_cover=cover,
        blur_px=float(rng.uniform(0.3, 1.4)), noise=float(rng.uniform(0.002, 0.012)),
    )


def cloud_field(rng: np.random.Generator, size: int, octaves: int = 5) -> np.ndarray:
    """Fractal noise ``[size, size]`` (zero mean, unit std): octaves of smooth random grids."""
    base = 64
    field = np.zeros((base, base), np.float32)
    for o in range(octaves):
        n = 2 ** (o + 2)                                           # 4, 8, 16, 32, 64 cells
        grid = rng.standard_normal((n, n)).astype(np.float32)
        field += ndimage.zoom(grid, base / n, order=3, mode="reflect", grid_mode=True) / 1.7 ** o
    field = ndimage.zoom(field, size / base, order=1, mode="reflect", grid_mode=True)
    field = field[:size, :size]
    return (field - field.mean()) / (field.std() + 1e-6)


def apply_query_look(image: np.ndarray, look: QueryLook, slant: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """A float 0..255 ``[S, S, 3]`` ground view seen through ``look`` -> uint8.

    ``slant`` is each pixel's slant range divided by the camera altitude (1 at
    nadir, larger for oblique rays): haze grows with it.
    """
    size = image.shape[0]
    x = np.clip(image.astype(np.float32) / 255.0, 0.0, 1.0)
    x = np.clip(x * np.asarray(look.gains, np.float32) * look.brightness, 0.0, 1.0) ** look.gamma
    haze = (1.0 - np.exp(-look.haze_depth * slant.astype(np.float32)))[..., None]
    x = x * (1.0 - haze) + HAZE_RGB * haze
    if look.cloud_cover > 0:
        field = cloud_field(rng, size)
        thr = np.quantile(field, 1.0 - look.cloud_cover)
        alpha = np.clip((field - thr) / 0.9, 0.0, 1.0)[..., None] ** 0.7
        shade = (0.9 + 0.06 * np.tanh(field - thr))[..., None]
        x = x * (1.0 - alpha) + shade * alpha
    sigma = look.blur_px * size / 256.0
    if sigma > 0.05:
        x = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest")
    x = x + rng.normal(0.0, look.noise, x.shape).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
