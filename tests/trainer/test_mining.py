"""Overlap geometry used by overlap-aware mining: convex quads (SAT), antimeridian, haversine."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import diamond, square
from trainer.mining import (
    footprint_overlap_matrix,
    footprints_intersect,
    haversine_km,
    negative_pair_mask,
)


def pairs(a, b) -> torch.Tensor:
    return footprints_intersect(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64))


def test_overlapping_disjoint_and_touching_squares():
    assert pairs(square(0, 0), square(0, 1.5)).item()        # 50% overlap
    assert not pairs(square(0, 0), square(0, 2.5)).item()    # disjoint in lon
    assert not pairs(square(0, 0), square(3, 0)).item()      # disjoint in lat
    assert pairs(square(0, 0), square(0, 2.0)).item()        # shared edge counts (as shapely.intersects)
    assert pairs(square(0, 0, 3), square(0.5, 0.5, 0.2)).item()  # containment


def test_rotated_quads_whose_boxes_overlap_but_polygons_do_not():
    # The diamond's bbox [-1,1]^2 overlaps the square's bbox corner, the shapes do not touch.
    a, b = diamond(0, 0, 1.0), square(0.9, 0.9, 0.3)
    box_a = torch.tensor(a).amin(0), torch.tensor(a).amax(0)
    box_b = torch.tensor(b).amin(0), torch.tensor(b).amax(0)
    assert bool(((box_a[0] <= box_b[1]) & (box_b[0] <= box_a[1])).all())  # bboxes overlap
    assert not pairs(a, b).item()
    assert not pairs(b, a).item()
    assert pairs(a, square(0.6, 0.6, 0.3)).item()  # moved inwards, they do overlap


def test_corner_order_does_not_matter():
    ring = square(0, 0)
    bowtie = [ring[0], ring[1], ring[3], ring[2]]
    reversed_ring = ring[::-1]
    other = square(0.5, 1.5, 0.6)
    far = square(0, 5)
    for quad in (ring, bowtie, reversed_ring):
        assert pairs(quad, other).item()
        assert not pairs(quad, far).item()


def test_antimeridian():
    east, west = square(10, 179.6, 0.5), square(10, -179.6, 0.5)  # 0.8 deg apart across 180
    assert pairs(east, west).item() and pairs(west, east).item()
    assert not pairs(square(10, 179.0, 0.5), square(10, -179.0, 0.5)).item()  # 2 deg apart
    crossing = [[11, 179.5], [11, -179.5], [9, -179.5], [9, 179.5]]        # itself crosses 180
    assert pairs(crossing, square(10, -179.8, 0.1)).item()
    assert pairs(square(10, 179.8, 0.1), crossing).item()
    assert not pairs(crossing, square(10, 0.0, 0.5)).item()


def test_far_side_of_the_globe_never_overlaps_in_either_order():
    crossing = [[11, 178.0], [11, -178.0], [9, -178.0], [9, 178.0]]
    assert not pairs(square(10, 0, 0.5), crossing).item()
    assert not pairs(crossing, square(10, 0, 0.5)).item()
    from shard_tools.geometry import tile_footprint
    west_edge, east_edge = tile_footprint("08_0100_0128"), tile_footprint("08_0100_0252")
    assert not pairs(west_edge, east_edge).item() and not pairs(east_edge, west_edge).item()


def test_matches_shapely_across_the_antimeridian_in_both_orders():
    from shard_tools.geometry import iou_matrix

    g = torch.Generator().manual_seed(1)
    n = 300
    lat = torch.rand(n, 1, generator=g, dtype=torch.float64) * 6 - 3
    lon = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 + 178  # 178..182 -> wraps
    half = torch.rand(n, 2, generator=g, dtype=torch.float64) * 1.5 + 0.2
    quads = torch.stack([torch.cat([lat + half[:, :1], lon - half[:, 1:]], 1),
                         torch.cat([lat + half[:, :1], lon + half[:, 1:]], 1),
                         torch.cat([lat - half[:, :1], lon + half[:, 1:]], 1),
                         torch.cat([lat - half[:, :1], lon - half[:, 1:]], 1)], 1)
    quads[..., 1] = torch.remainder(quads[..., 1] + 180.0, 360.0) - 180.0  # wrap to [-180, 180)
    a, b = quads[: n // 2], quads[n // 2:]
    want = torch.from_numpy(iou_matrix(a.numpy(), b.numpy()).diagonal() > 0)
    assert 10 < int(want.sum()) < n // 2 - 10
    assert torch.equal(footprints_intersect(a, b), want)
    assert torch.equal(footprints_intersect(b, a), want)


def test_edges_are_straight_in_the_equal_area_plane():
    # Near the diamond's NE edge at 60 N: inside it if edges were straight in degrees,
    # outside it in (lon rad, sin lat), where the project's IoU is defined.
    a = diamond(60.0, 0.0, 1.0)
    b = square(60.4985, 0.5, 0.0008)
    lat, lon = b[3]  # bottom-left corner; the degree-space NE edge is lat + lon = 61
    assert lat + lon < 61.0  # so in degree space the quads would intersect
    assert not pairs(a, b).item()
    assert pairs(a, square(60.4955, 0.5, 0.0008)).item()


def test_non_finite_footprints_never_overlap():
    nan = [[math.nan, math.nan]] * 4
    assert not pairs(nan, square(0, 0)).item()
    assert not pairs(square(0, 0), nan).item()


def test_matches_shapely_on_random_quads():
    from shapely.geometry import Polygon

    g = torch.Generator().manual_seed(0)
    n = 400
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([8.0, 8.0]) + torch.tensor([40.0, 0.0])
    angle = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 * math.pi
    size = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 + 0.5
    local = torch.tensor([[1, 1], [1, -1], [-1, -1], [-1, 1]], dtype=torch.float64)
    local = local.unsqueeze(0) * size.unsqueeze(1)
    rot = torch.stack([torch.cat([angle.cos(), -angle.sin()], -1), torch.cat([angle.sin(), angle.cos()], -1)], 1)
    quads = torch.einsum("pij,pvj->pvi", rot, local) + centre.unsqueeze(1)
    a, b = quads[: n // 2], quads[n // 2:]
    got = footprints_intersect(a, b)

    def poly(q):
        return Polygon([(math.radians(lon), math.sin(math.radians(lat))) for lat, lon in q.tolist()])

    want = torch.tensor([poly(x).intersects(poly(y)) for x, y in zip(a, b)])
    assert 20 < int(want.sum()) < n // 2 - 20  # both outcomes are exercised
    assert torch.equal(got, want)


def test_overlap_matrix_is_symmetric():
    fps = torch.tensor([square(0, 0), square(0, 1.5), square(0, 4), diamond(0, 5.5, 1.0)])
    m = footprint_overlap_matrix(fps)
    assert torch.equal(m, m.T)
    assert m.diagonal().all()
    assert m[0, 1] and not m[0, 2] and m[2, 3] and not m[1, 3]


def test_haversine_known_distances():
    a = torch.tensor([[0.0, 0.0], [0.0, 179.5], [45.0, 10.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, -179.5], [45.0, 10.0]])
    d = haversine_km(a, b)
    assert d[0].item() == pytest.approx(111.195, abs=0.01)
    assert d[1].item() == pytest.approx(111.195, abs=0.01)  # across the antimeridian
    assert d[2].item() == pytest.approx(0.0, abs=1e-9)


def test_negative_pair_mask_combines_filters():
    anchors = torch.tensor([0, 0, 1, 2])
    negatives = torch.tensor([1, 2, 3, 3])
    fps = torch.tensor([square(0, 0), square(0, 1.5), square(0, 10), square(0, 20)])
    keep = negative_pair_mask(anchors, negatives, footprints=fps)
    assert keep.tolist() == [False, True, True, True]
    is_query = torch.tensor([False, False, False, True])
    keep = negative_pair_mask(anchors, negatives, footprints=fps, is_query=is_query)
    assert keep.tolist() == [False, True, False, False]
    pos = torch.tensor([[0.0, 0.0], [0.0, 0.5], [0.0, 5.0], [0.0, 5.2]])
    keep = negative_pair_mask(anchors, negatives, positions=pos, distance_km=100.0)
    assert keep.tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="overlap_distance_km"):
        negative_pair_mask(anchors, negatives, positions=pos)
