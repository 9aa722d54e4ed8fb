"""Distances on the sphere and in UTM, vectorised over numpy arrays.

Haversine uses the mean Earth radius (6371 km), which is what EarthLoc's test
set selection uses; UTM distances are planar metres within one zone, which is
the VPR "within 25 m" protocol.
"""
from __future__ import annotations

import numpy as np

MEAN_EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1, lon1, lat2, lon2, radius_km: float = MEAN_EARTH_RADIUS_KM) -> np.ndarray:
    """Great-circle distance in km; inputs in degrees, broadcast like numpy."""
    p1, p2 = np.radians(np.asarray(lat1, np.float64)), np.radians(np.asarray(lat2, np.float64))
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2, np.float64) - np.asarray(lon1, np.float64))
    a = np.sin(dphi / 2.0) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2.0) ** 2
    return 2.0 * radius_km * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def haversine_matrix_km(a_latlon, b_latlon, radius_km: float = MEAN_EARTH_RADIUS_KM) -> np.ndarray:
    """[len(a), len(b)] distances between two lists of (lat, lon) points."""
    a = np.asarray(a_latlon, np.float64).reshape(-1, 2)
    b = np.asarray(b_latlon, np.float64).reshape(-1, 2)
    return haversine_km(a[:, None, 0], a[:, None, 1], b[None, :, 0], b[None, :, 1], radius_km)


def latlon_to_unit(latlon) -> np.ndarray:
    """[N, 3] unit vectors of (lat, lon) points: chord distances for KD-trees."""
    p = np.radians(np.asarray(latlon, np.float64).reshape(-1, 2))
    cl = np.cos(p[:, 0])
    return np.stack([cl * np.cos(p[:, 1]), cl * np.sin(p[:, 1]), np.sin(p[:, 0])], axis=1)


def km_to_chord(km, radius_km: float = MEAN_EARTH_RADIUS_KM):
    """Chord length on the unit sphere of a great-circle distance (for KD-tree radii)."""
    return 2.0 * np.sin(np.minimum(np.asarray(km, np.float64) / radius_km, np.pi) / 2.0)


def utm_distance_m(a_utm, b_utm) -> np.ndarray:
    """Planar distance in metres between UTM rows ``[east, north, ...]`` (broadcast).

    Points in different zones are given ``inf``: UTM coordinates of different
    zones are not comparable, and VPR ground truth never spans zones.
    """
    a, b = np.asarray(a_utm, dtype=object), np.asarray(b_utm, dtype=object)
    ea, na = a[..., 0].astype(np.float64), a[..., 1].astype(np.float64)
    eb, nb = b[..., 0].astype(np.float64), b[..., 1].astype(np.float64)
    d = np.hypot(ea - eb, na - nb)
    if a.shape[-1] > 2 and b.shape[-1] > 2:
        same = a[..., 2].astype(np.int64) == b[..., 2].astype(np.int64)
        d = np.where(same, d, np.inf)
    return d
