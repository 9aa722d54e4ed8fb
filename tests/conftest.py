"""Shared fixtures: the real reference data in ../shared/data and tiny generated images."""
from __future__ import annotations

import io
import os
import random
import sys
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
