"""Geometry for mining: which pairs in a batch overlap on the ground, on torch tensors.

Two tiles of different places can still cover the same ground (EarthLoc's tiles overlap
by 50%), so treating them as negatives teaches the model to push apart views of the same
place. These tests run on the batch's device and are vectorised over pairs.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "EARTH_RADIUS_KM",
    "equal_area_polygons",
    "footprints_intersect",
    "footprint_overlap_matrix",
    "haversine_km",
    "negative_pair_mask",
]

EARTH_RADIUS_KM = 6371.0088
_CHUNK = 1 << 16


def _unwrap(lon: Tensor) -> Tensor:
    """Make each polygon's longitudes continuous around its own first corner."""
    ref = lon[:, :1]
    return ref + torch.remainder(lon - ref + 180.0, 360.0) - 180.0


def equal_area_polygons(fp_a: Tensor, fp_b: Tensor) -> tuple[Tensor, Tensor]:
    """Project two batches of [lat, lon] quads to (lon_rad, sin lat) on one continuous plane.

    Each polygon is first unwrapped on its own (a quad across the antimeridian stays
    small), then ``fp_b`` is shifted as a whole by the multiple of 360 deg that brings
    its mean longitude nearest ``fp_a``'s: the comparison is symmetric and a polygon is
    never torn apart. Corners are then sorted by angle around their mean, so the SAT
    edges are right whatever the input order (ring in either direction, or a "bow-tie").
    """
    lon_a = _unwrap(fp_a[..., 1])
    lon_b = _unwrap(fp_b[..., 1])
    gap = lon_b.mean(dim=1, keepdim=True) - lon_a.mean(dim=1, keepdim=True)
    lon_b = lon_b - 360.0 * torch.round(gap / 360.0)

    def project(lat: Tensor, lon: Tensor) -> Tensor:
        xy = torch.stack([torch.deg2rad(lon), torch.sin(torch.deg2rad(lat))], dim=-1)
        centre = xy.mean(dim=1, keepdim=True)
        angle = torch.atan2(xy[..., 1] - centre[..., 1], xy[..., 0] - centre[..., 0])
        order = angle.argsort(dim=1)
        return torch.gather(xy, 1, order.unsqueeze(-1).expand_as(xy))

    return project(fp_a[..., 0], lon_a), project(fp_b[..., 0], lon_b)


def _edge_normals(poly: Tensor) -> Tensor:
    edges = torch.roll(poly, shifts=-1, dims=1) - poly
    normals = torch.stack([-edges[..., 1], edges[..., 0]], dim=-1)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-15)


def _sat_intersect(pa: Tensor, pb: Tensor, tol: float) -> Tensor:
    """Separating-axis test for convex polygons [P, V, 2]; touching counts as intersecting."""
    axes = torch.cat([_edge_normals(pa), _edge_normals(pb)], dim=1)  # [P, 2V, 2]
    proj_a = torch.einsum("pkd,pvd->pkv", axes, pa)
    proj_b = torch.einsum("pkd,pvd->pkv", axes, pb)
    gap_ab = proj_b.amin(-1) - proj_a.amax(-1)
    gap_ba = proj_a.amin(-1) - proj_b.amax(-1)
    separated = (gap_ab > tol) | (gap_ba > tol)
    return ~separated.any(dim=-1)


def footprints_intersect(fp_a: Tensor, fp_b: Tensor, tol: float = 1e-9) -> Tensor:
    """Do quads ``fp_a[i]`` and ``fp_b[i]`` ([P, 4, 2] of [lat, lon] degrees) intersect?

    Exact for convex quads in the equal-area plane (x = lon rad, y = sin lat), where the
    project's IoU is defined; a bounding-box test would call rotated ISS footprints
    overlapping when only their boxes do. Pairs with a non-finite corner never intersect.
    """
    if fp_a.shape != fp_b.shape or fp_a.dim() != 3 or fp_a.shape[-1] != 2:
        raise ValueError(f"footprints must both be [P, V, 2], got {tuple(fp_a.shape)} and {tuple(fp_b.shape)}")
    dtype = torch.float64 if fp_a.device.type != "mps" else torch.float32
    fp_a, fp_b = fp_a.to(dtype), fp_b.to(dtype)
    out = torch.zeros(fp_a.shape[0], dtype=torch.bool, device=fp_a.device)
    for start in range(0, fp_a.shape[0], _CHUNK):
        a, b = fp_a[start:start + _CHUNK], fp_b[start:start + _CHUNK]
        valid = torch.isfinite(a).all(dim=(1, 2)) & torch.isfinite(b).all(dim=(1, 2))
        pa, pb = equal_area_polygons(torch.nan_to_num(a), torch.nan_to_num(b))
        out[start:start + _CHUNK] = _sat_intersect(pa, pb, tol) & valid
    return out


def footprint_overlap_matrix(footprints: Tensor) -> Tensor:
    """[B, B] bool: which footprints of a batch intersect (the diagonal is True when finite)."""
    n = footprints.shape[0]
    i, j = torch.meshgrid(torch.arange(n, device=footprints.device),
                          torch.arange(n, device=footprints.device), indexing="ij")
    return footprints_intersect(footprints[i.reshape(-1)], footprints[j.reshape(-1)]).reshape(n, n)


def haversine_km(a: Tensor, b: Tensor) -> Tensor:
    """Great-circle distance between [P, 2] [lat, lon] degree positions, in km."""
    a, b = torch.deg2rad(a.double()), torch.deg2rad(b.double())
    dlat, dlon = b[:, 0] - a[:, 0], b[:, 1] - a[:, 1]
    h = torch.sin(dlat / 2) ** 2 + torch.cos(a[:, 0]) * torch.cos(b[:, 0]) * torch.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(h.clamp(0.0, 1.0)))


def negative_pair_mask(
    anchors: Tensor,
    negatives: Tensor,
    *,
    footprints: Tensor | None = None,
    positions: Tensor | None = None,
    distance_km: float | None = None,
    is_query: Tensor | None = None,
) -> Tensor:
    """True for negative pairs to keep; False where a filter says the pair is no negative.

    - footprints [B, 4, 2]: drop pairs whose footprints intersect (overlap-aware, EarthLoc);
    - positions [B, 2] with distance_km: drop pairs closer than distance_km;
    - is_query [B] bool: drop pairs that involve a query (query-aware, EarthLoc2).
    """
    keep = torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    if anchors.numel() == 0:
        return keep
    if footprints is not None:
        fp = footprints.to(anchors.device)
        keep &= ~footprints_intersect(fp[anchors], fp[negatives])
    if positions is not None:
        if distance_km is None or not math.isfinite(distance_km):
            raise ValueError("positions were given but overlap_distance_km is not set")
        pos = positions.to(anchors.device)
        keep &= ~(haversine_km(pos[anchors], pos[negatives]) < distance_km)  # NaN compares False
    if is_query is not None:
        q = is_query.to(device=anchors.device, dtype=torch.bool)
        keep &= ~(q[anchors] | q[negatives])
    return keep
