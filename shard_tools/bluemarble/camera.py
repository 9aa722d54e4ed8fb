"""An oblique pinhole camera above a flat local ground: the geometry of one ISS photograph.

The ground near the look point is a plane (x east, y north, km) whose points
map to the sphere by the azimuthal equidistant projection centred on the look
point, so distances from it (and the nadir distance) are true. The camera hangs
at ``altitude_km`` above the nadir and looks at the origin; a square image
then sees a general quadrilateral, wider on the far side. Image-to-ground is a
plane projective map (a homography), so the image corners land exactly on the
footprint corners and every pixel is placed consistently with them.

Image coordinates: ``u`` right and ``v`` up, both in [-1, 1] at the image
edges. Footprint corners are listed in the order of real ISS query names:
top-left, bottom-left, bottom-right, top-right, which winds counter-clockwise
on a north-up map (every one of the 17,752 real EarthLoc queries does).
The orientation in a name is minus the bearing of the image's up direction
(real names agree with this to a median of 7 degrees).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..geometry.distances import MEAN_EARTH_RADIUS_KM

CORNERS_UV = np.array([[-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [1.0, 1.0]])   # TL, BL, BR, TR
MIN_ELEVATION_DEG = 12.0   # keep every ray at least this far below the horizon


def local_to_latlon(x_km, y_km, lat0: float, lon0: float,
                    radius_km: float = MEAN_EARTH_RADIUS_KM) -> tuple[np.ndarray, np.ndarray]:
    """Inverse azimuthal equidistant projection centred on (lat0, lon0); lon in [-180, 180)."""
    x, y = np.asarray(x_km, np.float64), np.asarray(y_km, np.float64)
    rho = np.hypot(x, y) / radius_km
    theta = np.arctan2(x, y)                                      # bearing from north
    p0, l0 = math.radians(lat0), math.radians(lon0)
    sin_lat = math.sin(p0) * np.cos(rho) + math.cos(p0) * np.sin(rho) * np.cos(theta)
    lat = np.arcsin(np.clip(sin_lat, -1.0, 1.0))
    lon = l0 + np.arctan2(np.sin(theta) * np.sin(rho) * math.cos(p0),
                          np.cos(rho) - math.sin(p0) * sin_lat)
    lon = (np.degrees(lon) + 180.0) % 360.0 - 180.0
    return np.degrees(lat), lon


@dataclass(frozen=True)
class Camera:
    """An oblique view of the ground around a look point (all lengths in km)."""

    look_lat: float
    look_lon: float
    position: tuple[float, float, float]   # camera in the local frame (nadir x, nadir y, altitude)
    forward: tuple[float, float, float]
    right: tuple[float, float, float]
    up: tuple[float, float, float]
    tan_half_fov: float

    def rays(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Ray directions ``[..., 3]`` through image points (u, v)."""
        f, r, w = (np.asarray(a) for a in (self.forward, self.right, self.up))
        t = self.tan_half_fov
        return f + t * (np.asarray(u)[..., None] * r + np.asarray(v)[..., None] * w)

    def ground(self, u, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local ground (x, y) of image points, and slant range / altitude for each."""
        d = self.rays(u, v)
        p = np.asarray(self.position)
        s = -p[2] / d[..., 2]
        g = p + s[..., None] * d
        return g[..., 0], g[..., 1], s * np.linalg.norm(d, axis=-1) / p[2]

    def ground_latlon(self, u, v) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lat, lon, slant / altitude) of image points."""
        x, y, slant = self.ground(u, v)
        lat, lon = local_to_latlon(x, y, self.look_lat, self.look_lon)
        return lat, lon, slant

    def footprint(self) -> np.ndarray:
        """[4, 2] (lat, lon) of the image corners TL, BL, BR, TR."""
        lat, lon, _ = self.ground_latlon(CORNERS_UV[:, 0], CORNERS_UV[:, 1])
        return np.stack([lat, lon], axis=1)

    def nadir(self) -> tuple[float, float]:
        lat, lon = local_to_latlon(self.position[0], self.position[1], self.look_lat,
                                   self.look_lon)
        return float(lat), float(lon)

    def orientation_deg(self) -> float:
        """Minus the bearing of the image's up direction at the image centre, in [0, 360)."""
        x0, y0, _ = self.ground(np.array(0.0), np.array(0.0))
        x1, y1, _ = self.ground(np.array(0.0), np.array(1e-3))
        bearing = math.degrees(math.atan2(float(x1 - x0), float(y1 - y0)))
        return (-bearing) % 360.0

    def pixel_grid(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) of the pixel centres of a ``size`` x ``size`` image (row 0 at the top)."""
        c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
        return np.meshgrid(c, -c, indexing="xy")


def _frame(nadir_km: float, azimuth_deg: float, up_bearing_deg: float, altitude_km: float):
    az = math.radians(azimuth_deg)
    p = np.array([-nadir_km * math.sin(az), -nadir_km * math.cos(az), altitude_km])
    f = -p / np.linalg.norm(p)
    b = math.radians(up_bearing_deg)
    g = np.array([math.sin(b), math.cos(b), 0.0])
    w = g - (g @ f) * f
    w /= np.linalg.norm(w)
    r = np.cross(f, w)                                            # image right, no mirroring
    return p, f, r, w


def _corner_rays(p, f, r, w, t: float) -> list[tuple[float, float, float]]:
    """Ray directions through the four image corners (plain floats: this runs in a solver)."""
    return [(f[0] + t * (u * r[0] + v * w[0]), f[1] + t * (u * r[1] + v * w[1]),
             f[2] + t * (u * r[2] + v * w[2])) for u, v in CORNERS_UV.tolist()]


def _ground_area(p, rays) -> float:
    """Shoelace area of where the corner rays meet the ground."""
    pts = [(p[0] - p[2] / d[2] * d[0], p[1] - p[2] / d[2] * d[1]) for d in rays]
    return 0.5 * abs(sum(pts[i][0] * pts[i - 3][1] - pts[i - 3][0] * pts[i][1]
                         for i in range(4)))


def oblique_camera(look_lat: float, look_lon: float, area_km2: float, nadir_km: float,
                   azimuth_deg: float, up_bearing_deg: float,
                   altitude_km: float = 410.0) -> Camera | None:
    """The camera that sees ``area_km2`` of ground around the look point, or None.

    The nadir lies ``nadir_km`` from the look point, on the bearing
    ``azimuth_deg + 180`` (the camera looks along ``azimuth_deg``); the image's
    up points roughly along ``up_bearing_deg``. The field of view is solved so
    the ground quadrilateral has the requested area; None when that needs rays
    too close to the horizon.
    """
    p, f, r, w = (a.tolist() for a in _frame(nadir_km, azimuth_deg, up_bearing_deg,
                                              altitude_km))
    sin_min = math.sin(math.radians(MIN_ELEVATION_DEG))

    def steep(t: float) -> bool:
        return all(-d[2] >= sin_min * math.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
                   for d in _corner_rays(p, f, r, w, t))

    lo, hi = 0.0, 2.0
    for _ in range(40):                                           # widest admissible fov
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if steep(mid) else (lo, mid)
    t_max = lo
    if t_max <= 0 or _ground_area(p, _corner_rays(p, f, r, w, t_max)) < area_km2:
        return None
    lo, hi = 0.0, t_max
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _ground_area(p, _corner_rays(p, f, r, w, mid)) < area_km2 \
            else (lo, mid)
    return Camera(look_lat, look_lon, tuple(p), tuple(f), tuple(r), tuple(w), 0.5 * (lo + hi))
