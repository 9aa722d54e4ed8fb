"""The localization map: one world at most, every shape drawn, small shapes visible, a legend."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from retrieval.mapdraw import (OTHER_COLOUR, TOP1_COLOUR, TRUTH_COLOUR, central_lon, draw_map,
                               legend_entries, view_bounds)

GROUND = (30, 30, 30)
MARKER = (255, 0, 255)
HEIGHT = 512


def box(lat: float, lon: float, half: float) -> np.ndarray:
    """A footprint ``[4, 2]`` of ``[lat, lon]`` corners, clockwise from the top left."""
    return np.array([[lat + half, lon - half], [lat + half, lon + half],
                     [lat - half, lon + half], [lat - half, lon - half]])


def plain_world(marker_lon: float | None = None, h: int = 360) -> np.ndarray:
    """A dark ``[h, 2h, 3]`` world, with a magenta meridian at ``marker_lon`` if given."""
    world = np.empty((h, 2 * h, 3), np.uint8)
    world[:] = GROUND
    if marker_lon is not None:
        x = int((marker_lon + 180) / 360 * 2 * h)
        world[:, x:x + 2] = MARKER
    return world


def mask(image, colour, tol: int = 40) -> np.ndarray:
    px = np.asarray(image, np.int16)
    return np.all(np.abs(px - np.asarray(colour, np.int16)) <= tol, axis=-1)


def off_legend(m: np.ndarray) -> np.ndarray:
    """The mask without the legend's corner (bottom left)."""
    m = m.copy()
    m[-100:, :200] = False
    return m


def blobs(m: np.ndarray) -> int:
    return ndimage.label(m, structure=np.ones((3, 3)))[1]


# predictions on both sides of the antimeridian and in Europe, the truth in Asia:
# the case whose view was wider than the world (the world drawn twice)
SPREAD = [box(10, 179, 3), box(-40, -179, 3), box(60, 0, 3)]
SPREAD_TRUTH = box(5, 100, 1)


def test_central_lon_takes_the_shortest_arc():
    assert central_lon([179, -179]) == pytest.approx(180)
    assert central_lon([10, 20]) == pytest.approx(15)
    assert central_lon([-170, 170, 10]) == pytest.approx(100)      # the arc 10 E -> 170 W


def test_view_is_never_wider_than_one_world():
    lat0, lat1, lon0, lon1 = view_bounds([box(0, -170, 3), box(50, 175, 3), box(-60, 0, 3)])
    assert lon1 - lon0 <= 360 and -90 <= lat0 < lat1 <= 90


def test_world_is_drawn_once_when_predictions_span_the_globe():
    im = draw_map(SPREAD, SPREAD_TRUTH, height=HEIGHT, world=plain_world(marker_lon=0.0),
                  labels=[""] * 3)
    marker_columns = np.median(mask(im, MARKER, tol=120), axis=0) > 0
    assert blobs(marker_columns[None, :]) == 1          # the meridian at 0 E appears once
    assert im.width <= 2 * HEIGHT + 2


def test_every_prediction_and_the_truth_are_drawn_once():
    im = draw_map(SPREAD, SPREAD_TRUTH, height=HEIGHT, world=plain_world(), labels=[""] * 3)
    assert blobs(off_legend(mask(im, TOP1_COLOUR))) == 1
    assert blobs(off_legend(mask(im, OTHER_COLOUR))) == 2
    assert blobs(off_legend(mask(im, TRUTH_COLOUR))) == 1


def test_tiny_true_footprint_is_outlined_at_a_visible_size():
    preds = [box(45.5, 9.5, 0.5), box(44, 8, 0.5)]
    im = draw_map(preds, box(45.0, 9.0, 0.0005), height=HEIGHT, world=plain_world(),
                  labels=["", ""])
    ys, xs = np.nonzero(off_legend(mask(im, TRUTH_COLOUR)))
    assert len(xs) and xs.max() - xs.min() >= 10 and ys.max() - ys.min() >= 10


def test_legend_names_each_colour_shown():
    assert [text for _, text in legend_entries(5, True)] == \
        ["true footprint", "prediction 1", "predictions 2-5"]
    assert [c for c, _ in legend_entries(1, False)] == [TOP1_COLOUR]
    # shapes in the top right; the legend sits bottom left
    im = draw_map([box(50, 20, 1), box(50, 22, 1)], box(50, 21, 0.5), height=HEIGHT,
                  world=plain_world(), labels=["", ""])
    corner = np.asarray(im)[-120:, :220]
    for colour in (TRUTH_COLOUR, TOP1_COLOUR, OTHER_COLOUR, (255, 255, 255)):
        assert mask(corner, colour, tol=10).sum() > 20, colour


def test_rank_labels_are_readable():
    im = draw_map([box(20, 20, 2)], height=HEIGHT, world=plain_world(), labels=["8"])
    red = off_legend(mask(im, TOP1_COLOUR, tol=60))
    labelled, n = ndimage.label(red, structure=np.ones((3, 3)))
    heights = sorted(sl[0].stop - sl[0].start for sl in ndimage.find_objects(labelled))
    assert n == 2 and heights[0] >= 14                  # the box and the glyph "8"
