"""Geometry: distances, WMTS ids <-> bounds, footprints, IoU across the antimeridian."""
from __future__ import annotations

import math

import numpy as np
import pytest
import shapely

from shard_tools.formats import parse_earthloc_name
from shard_tools.geometry import (
    EARTH_RADIUS_KM, FootprintSet, candidate_pairs, crosses_antimeridian, footprint_area_km2,
    footprint_polygons, haversine_km, haversine_matrix_km, intersects_matrix,
    iou_matrix, iou_pairs, km_to_chord, latlon_to_unit, pair_iou, parse_tile_ids,
    rectangles_to_footprints, tile_area_km2, tile_bounds, tile_footprint, tile_grid,
    tile_id_at, tile_id_from_bounds, tiles_bounds, unwrap_footprints, utm_distance_m,
)


def rect(s, w, n, e):
    return rectangles_to_footprints(np.array([[s, w, n, e]]))[0]


# ---------------------------------------------------------------- distances

def test_haversine_known_distances_vectorised():
    lat1 = np.array([48.8566, 0.0, 90.0, 0.0, 10.0])
    lon1 = np.array([2.3522, 0.0, 0.0, 0.0, 20.0])
    lat2 = np.array([51.5074, 0.0, -90.0, 0.0, 10.0])
    lon2 = np.array([-0.1278, 1.0, 0.0, 180.0, 20.0])
    d = haversine_km(lat1, lon1, lat2, lon2)
    assert d.shape == (5,)
    assert d[0] == pytest.approx(343.56, abs=0.05)                 # Paris - London
    assert d[1] == pytest.approx(2 * math.pi * 6371 / 360, rel=1e-12)  # 1 degree on the equator
    assert d[2] == pytest.approx(math.pi * 6371, rel=1e-12)      # pole to pole
    assert d[3] == pytest.approx(math.pi * 6371, rel=1e-12)      # antipodes on the equator
    assert d[4] == 0.0
    # symmetric, and the same across the antimeridian as without it
    assert haversine_km(0, 179.5, 0, -179.5) == pytest.approx(haversine_km(0, -0.5, 0, 0.5))
    np.testing.assert_allclose(haversine_km(lat2, lon2, lat1, lon1), d)


def test_haversine_matrix_and_chord_agree():
    rng = np.random.default_rng(0)
    a = np.c_[rng.uniform(-80, 80, 7), rng.uniform(-180, 180, 7)]
    b = np.c_[rng.uniform(-80, 80, 5), rng.uniform(-180, 180, 5)]
    m = haversine_matrix_km(a, b)
    assert m.shape == (7, 5)
    assert m[3, 2] == pytest.approx(float(haversine_km(*a[3], *b[2])))
    chord = np.linalg.norm(latlon_to_unit(a)[:, None] - latlon_to_unit(b)[None], axis=-1)
    np.testing.assert_allclose(chord, km_to_chord(m), atol=1e-12)


def test_utm_distance_same_zone_only():
    a = np.array([[500000.0, 4000000.0, 10, "S"], [500000.0, 4000000.0, 10, "S"]], dtype=object)
    b = np.array([[500003.0, 4000004.0, 10, "S"], [500003.0, 4000004.0, 11, "S"]], dtype=object)
    d = utm_distance_m(a, b)
    assert d[0] == pytest.approx(5.0)
    assert np.isinf(d[1])
    assert utm_distance_m([[0.0, 0.0]], [[3.0, 4.0]])[0] == pytest.approx(5.0)


# ---------------------------------------------------------------- WMTS

def test_tile_bounds_reference_example():
    s, w, n, e = tile_bounds("10_0510_0614")
    assert (s, n) == (pytest.approx(-0.70311, abs=1e-5), pytest.approx(0.70311, abs=1e-5))
    assert (w, e) == (pytest.approx(35.859, abs=1e-3), pytest.approx(37.266, abs=1e-3))
    assert tile_footprint("10_0510_0614") == [[s, w], [n, w], [n, e], [s, e]]


def test_tile_id_round_trip_every_zoom_and_latitude():
    rng = np.random.default_rng(1)
    for zoom in (2, 5, 9, 10, 11, 13):
        n = 2 ** zoom
        rows = rng.integers(0, n - 4 + 1, 40)
        cols = rng.integers(0, n, 40)
        for r, c in zip(rows, cols):
            image_id = f"{zoom:02d}_{r:04d}_{c:04d}"
            assert tile_id_from_bounds(*tile_bounds(image_id)) == image_id
            s, w, nn, e = tile_bounds(image_id)
            # rounded to the 5 decimals of EarthLoc names, still the same id
            assert tile_id_from_bounds(*(round(v, 5) for v in (s, w, nn, e))) == image_id
    assert tile_id_at(0.1, 36.0, 10) == "10_0510_0614"
    with pytest.raises(ValueError, match="not a z"):
        tile_id_from_bounds(0.0, 0.0, 1.3, 1.40625)
    with pytest.raises(ValueError):
        parse_tile_ids(["10_510_614"])


def test_vectorised_bounds_match_scalar():
    ids = ["09_0262_0202", "10_0510_0614", "11_0084_2044", "09_0000_0508"]
    b = tiles_bounds(*parse_tile_ids(ids))
    np.testing.assert_allclose(b, np.array([tile_bounds(i) for i in ids]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("image_id", ["09_0148_0100", "09_0362_0100",   # about +-60 degrees
                                      "09_0084_0000", "09_0426_0508",   # about +-75, at +-180
                                      "09_0000_0300"])                  # the top row, 85 degrees
def test_high_latitude_tiles_bounds_and_area(image_id):
    s, w, n, e = tile_bounds(image_id)
    z, r, c = (int(x) for x in image_id.split("_"))
    assert n == pytest.approx(math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * r / 2 ** z)))))
    assert e - w == pytest.approx(4 * 360 / 2 ** z)
    assert s < n
    area = tile_area_km2(image_id)
    exact = (EARTH_RADIUS_KM ** 2 * math.radians(e - w)
             * (math.sin(math.radians(n)) - math.sin(math.radians(s))))
    assert area == pytest.approx(exact, rel=1e-12)
    # the equal-area polygon of a lat/lon rectangle has exactly the spherical area
    assert footprint_area_km2(np.array([tile_footprint(image_id)]))[0] == pytest.approx(area)
    assert tile_id_from_bounds(s, w, n, e) == image_id


def test_tile_areas_match_published_names(shared_data):
    lines = (shared_data / "earthloc" / "database_candidates.txt").read_text().split()
    recs = [parse_earthloc_name(n) for n in lines[::20]]
    got = np.array([tile_area_km2(r["image_id"]) for r in recs])
    want = np.array([r["area_km2"] for r in recs])
    # names carry integer km^2 (within 1.5 km^2 of ours); the mean radius would be 0.2% off
    assert np.abs(got - want).max() < 1.5
    assert np.abs(got * (6371.0 / EARTH_RADIUS_KM) ** 2 / want - 1).min() > 1e-3
    for r in recs[:50]:                           # and the names' corners are the tile's bounds
        np.testing.assert_allclose(r["footprint"], tile_footprint(r["image_id"]), atol=1e-5)


def test_tile_grid_covers_the_band():
    z, r, c = tile_grid((9,), -60.0, 60.0)
    b = tiles_bounds(z, r, c)
    centre = (b[:, 0] + b[:, 2]) / 2
    assert centre.min() >= -60 and centre.max() <= 60
    assert np.all(r % 2 == 0) and np.all(c % 2 == 0)
    assert len(np.unique(c)) == 256 and len(z) == 256 * len(np.unique(r))
    assert 55 < centre.max() <= 60 and -60 <= centre.min() < -55


# ---------------------------------------------------------------- footprints

def test_unwrap_is_canonical():
    rng = np.random.default_rng(2)
    fps = []
    for lat, lon in zip(rng.uniform(-60, 60, 30), rng.uniform(-180, 180, 30)):
        fps.append([[lat, lon], [lat + 1, lon + 0.2], [lat + 1.3, lon + 1.5], [lat + 0.1, lon + 1]])
    fps = np.array(fps)
    fps[..., 1] = (fps[..., 1] + 180) % 360 - 180
    un = unwrap_footprints(fps)
    assert np.all(np.ptp(un[..., 1], axis=1) < 3)      # no 360-degree jumps
    mean = un[..., 1].mean(axis=1)
    assert np.all((mean >= -180) & (mean < 180))


def test_area_is_true_spherical_area_and_order_free():
    fp = rect(10.0, 20.0, 12.0, 23.0)
    exact = EARTH_RADIUS_KM ** 2 * math.radians(3) * (math.sin(math.radians(12))
                                                      - math.sin(math.radians(10)))
    assert footprint_area_km2(fp[None])[0] == pytest.approx(exact)
    assert footprint_area_km2(fp[::-1][None])[0] == pytest.approx(exact)
    assert shapely.is_valid(footprint_polygons(fp[None])).all()


def test_iou_known_values_and_symmetry():
    a = rect(0.0, 0.0, 2.0, 2.0)
    b = rect(0.0, 1.0, 2.0, 3.0)                 # half of a: IoU = 1 / 3
    c = rect(10.0, 10.0, 11.0, 11.0)             # far away
    m = iou_matrix(np.array([a, b, c]))
    assert m[0, 1] == pytest.approx(1 / 3) and m[1, 0] == pytest.approx(1 / 3)
    np.testing.assert_allclose(np.diag(m), 1.0)
    assert m[0, 2] == 0 and m[2, 1] == 0
    np.testing.assert_allclose(m, m.T)
    inter = intersects_matrix(np.array([a, b, c]))
    assert inter.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # strictly greater: a pair at exactly the threshold is not kept
    qi, di, iou = iou_pairs(np.array([a]), np.array([a, b]), 1 / 3 + 1e-9)
    assert qi.tolist() == [0] and di.tolist() == [0]


# ---------------------------------------------------------------- antimeridian

def test_footprint_across_antimeridian_meets_tiles_on_both_sides():
    query = np.array([[[-1.0, 179.0], [1.0, 179.0], [1.0, -179.0], [-1.0, -179.0]]])
    assert crosses_antimeridian(query).tolist() == [True]
    west = "09_0254_0000"   # lon -180 .. -177.2
    east = "09_0254_0508"   # lon 177.2 .. 180
    far = "09_0254_0250"
    tiles = np.array([tile_footprint(t) for t in (west, east, far)])
    qi, di = candidate_pairs(query, tiles)
    assert di.tolist() == [0, 1]
    iou = iou_matrix(query, tiles)[0]
    assert iou[0] > 0 and iou[1] > 0 and iou[2] == 0
    assert iou[0] == pytest.approx(iou[1])       # symmetric about the antimeridian
    # the same footprint written with longitudes beyond 180 is the same footprint
    query_360 = query.copy()
    query_360[..., 1] %= 360
    np.testing.assert_allclose(iou_matrix(query_360, tiles)[0], iou)


def test_iou_invariant_under_longitude_shift_across_antimeridian():
    rng = np.random.default_rng(3)
    base = []
    for _ in range(40):
        lat, lon = rng.choice([-2.0, 66.0]) + rng.uniform(-3, 3), rng.uniform(-4, 4)
        w, h, t = rng.uniform(0.5, 3), rng.uniform(0.5, 3), rng.uniform(0, 1.5)
        base.append([[lat, lon], [lat + h, lon + t], [lat + h + t, lon + w + t], [lat + t, lon + w]])
    base = np.array(base)
    ref = iou_matrix(base)
    assert (ref > 0).sum() > 120                  # the set has plenty of overlaps
    for shift in (180.0, 178.5, -179.0, 360.0):
        moved = base.copy()
        moved[..., 1] = (moved[..., 1] + shift + 180) % 360 - 180
        got = iou_matrix(moved)
        np.testing.assert_allclose(got, ref, atol=1e-9)
        np.testing.assert_allclose(got, got.T, atol=1e-12)
        qi, di, iou = iou_pairs(moved, moved, 0.2)        # pruned path, across the seam
        want = np.argwhere(ref > 0.2)
        np.testing.assert_array_equal(np.c_[qi, di], want)
        np.testing.assert_allclose(iou, ref[ref > 0.2], atol=1e-9)


def test_candidate_pairs_equal_brute_force_with_wrapping():
    rng = np.random.default_rng(4)

    def quads(n):
        lat, lon = rng.uniform(-75, 75, n), rng.uniform(-180, 180, n)
        w, h = rng.uniform(0.5, 6, n), rng.uniform(0.5, 6, n)
        c = np.stack([np.stack([lat, lon], 1), np.stack([lat + h, lon + 0.3], 1),
                      np.stack([lat + h, lon + w], 1), np.stack([lat, lon + w - 0.3], 1)], 1)
        c[..., 1] = (c[..., 1] + 180) % 360 - 180
        return c

    q, db = quads(300), quads(800)
    q[:20, :, 1] = np.array([178.0, 179.0, -178.5, -179.5])      # force some to wrap
    qi, di = candidate_pairs(q, db)
    # brute force: every pair, on polygons shifted so both are around lon 0
    qs, ds = FootprintSet(q), FootprintSet(db)
    want = set()
    for dx in (-2 * np.pi, 0.0, 2 * np.pi):
        shifted = shapely.transform(ds.polygons, lambda c, dx=dx: c + [dx, 0])
        hit = shapely.intersects(qs.polygons[:, None], shifted[None, :])
        want |= set(zip(*np.nonzero(hit)))
    assert set(zip(qi.tolist(), di.tolist())) == {(int(a), int(b)) for a, b in want}
    assert any(a < 20 for a, _ in want)
    assert np.all(np.diff(qi) >= 0)
    iou = pair_iou(qs, ds, qi, di)
    assert np.all((iou >= 0) & (iou <= 1 + 1e-12))
