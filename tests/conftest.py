"""Shared fixtures: the real reference data in ../shared/data and tiny generated images."""
from __future__ import annotations

import io
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PYTHON = sys.executable


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real reference data not found at {SHARED_DATA} (../shared/data beside "
                    "the repository)")
    return SHARED_DATA


def jpeg_bytes(seed: int, size: tuple[int, int] = (32, 24), quality: int = 85) -> bytes:
    """A small, distinct, valid JPEG (noise pattern from ``seed``)."""
    rng = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))
                for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_jpegs(root: Path, names, size=(32, 24), seed0: int = 0) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg_bytes(seed0 + i, size))
        paths.append(p)
    return paths


def run_env() -> dict:
    """Environment for subprocesses: the repo importable, no progress bars."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------- synthetic inputs

def earthloc_tile_path(image_id: str, year: int) -> str:
    """A tile path exactly as EarthLoc lays it out (folder from year, zoom, centre)."""
    from shard_tools import formats
    from shard_tools.geometry import tile_area_km2, tile_center, tile_footprint

    lat, lon = tile_center(image_id)
    rec = formats.empty_record(footprint=tile_footprint(image_id), image_id=image_id,
                               timestamp=str(year), year=year, nadir=[lat, lon], lat=lat,
                               lon=lon, area_km2=round(tile_area_km2(image_id)),
                               orientation_deg=0)
    name = formats.format_earthloc_name(rec, decimals=5, nadir_decimals=5)
    return f"{formats.earthloc_database_folder(rec)}/{name}"


def earthloc_query_name(image_id: str, n: int, shift: float = 0.1) -> str:
    """A query footprint: the tile's, shifted and slightly rotated in order."""
    from shard_tools import formats
    from shard_tools.geometry import tile_footprint

    fp = [[lat + shift, lon + shift] for lat, lon in tile_footprint(image_id)]
    fp = fp[1:] + fp[:1]
    rec = formats.empty_record(footprint=fp, image_id=f"ISS0{60 + n % 10}-E-{1000 + n}",
                               timestamp="20200105", nadir=[fp[0][0] + 1, fp[0][1] - 1],
                               area_km2=12345, orientation_deg=90.0)
    return formats.format_earthloc_name(rec, decimals=6, nadir_decimals=1,
                                        orientation_decimals=1)


def make_earthloc_tree(root: Path, tile_ids, years=(2019, 2021), seed0: int = 0) -> list[str]:
    names = [earthloc_tile_path(t, y) for t in tile_ids for y in years]
    write_jpegs(root, names, seed0=seed0)
    return names


TEST_TILES = [f"08_{r:04d}_{c:04d}" for r in (100, 102, 104) for c in (60, 62, 64, 66)]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM (skips, saying why, where it cannot exist)."""
    from slurm_cluster import SlurmCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


# ---------------------------------------------------------------- handmade footprints

def square(lat: float, lon: float, half: float = 1.0) -> list[list[float]]:
    """An axis-aligned [lat, lon] quad, corners in ring order."""
    return [[lat + half, lon - half], [lat + half, lon + half], [lat - half, lon + half],
            [lat - half, lon - half]]


def diamond(lat: float, lon: float, r: float) -> list[list[float]]:
    """A square rotated by 45 degrees (as a rotated ISS footprint)."""
    return [[lat + r, lon], [lat, lon + r], [lat - r, lon], [lat, lon - r]]


# ---------------------------------------------------------------- a real S3 server (moto)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint that s3fs talks to)."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (streamloc[dev])")
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS variables pointing at the moto server, and a fresh bucket ``streamloc-test``."""
    from shard_tools import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import fsspec
    fsspec.config.conf.pop("s3", None)
    fs, _ = storage.filesystem("s3://streamloc-test/")
    fs.clear_instance_cache()
    fs, _ = storage.filesystem("s3://streamloc-test/")
    if not fs.exists("streamloc-test"):
        fs.mkdir("streamloc-test")
    return fs
