"""GeoJSON (RFC 7946) of footprints, antimeridian split, and localize end to end with a map."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from retrieval.geojson import footprint_geometry, geometry_problems, point_geometry
from tests.retrieval.helpers import run_cli


def test_polygon_is_lon_first_closed_counter_clockwise():
    # corners in EarthLoc order [lat, lon], clockwise on the map
    g = footprint_geometry([[46, 9], [46, 11], [44, 11], [44, 9]])
    assert g["type"] == "Polygon" and geometry_problems(g) == []
    ring = g["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    assert {tuple(p) for p in ring} == {(9, 46), (11, 46), (11, 44), (9, 44)}   # lon first


def test_antimeridian_footprint_is_split_in_two_valid_parts():
    g = footprint_geometry([[-16, 178], [-16, -178], [-20, -178], [-20, 178]])
    assert g["type"] == "MultiPolygon" and geometry_problems(g) == []
    lons = sorted({round(p[0]) for part in g["coordinates"] for p in part[0]})
    assert lons == [-180, -178, 178, 180]
    east, west = sorted(g["coordinates"], key=lambda part: part[0][0][0])[::-1]
    assert max(p[0] for p in east[0]) == 180 and min(p[0] for p in west[0]) == -180
    # total width is 4 degrees, not 356
    widths = [max(p[0] for p in part[0]) - min(p[0] for p in part[0]) for part in g["coordinates"]]
    assert sum(widths) == pytest.approx(4.0)


def test_validator_catches_what_rfc7946_forbids():
    assert geometry_problems({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1]]]})
    cw = [[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]
    assert "counter-clockwise" in geometry_problems({"type": "Polygon", "coordinates": [cw]})[0]
    assert geometry_problems({"type": "Point", "coordinates": [200, 0]})
    assert point_geometry(10, 190)["coordinates"] == [-170, 10]


@pytest.mark.slow
def test_localize_writes_valid_geojson_and_a_map(tiny_apl, encoder_dir, tmp_path):
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    proc = run_cli("embed", "--model", encoder_dir, "--shards", tiny_apl["database"], "--output",
                   emb, "--rotations", "0,90,180,270", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run_cli("index", "--embeddings", emb, "--output", idx, "--num-shards", "2",
                   "--no-progress").returncode == 0
    images = sorted((tiny_apl["bm"] / "queries" / "test").glob("*.jpg"))[:2]
    out, png = tmp_path / "out.geojson", tmp_path / "map.png"
    proc = run_cli("localize", "--model", encoder_dir, "--index", idx, *images, "--top-k", "3",
                   "--output", out, "--map", png)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "made by" not in proc.stderr
    doc = json.loads(out.read_text())
    assert doc["type"] == "FeatureCollection"
    preds = [f for f in doc["features"] if f["properties"]["role"] == "prediction"]
    truths = [f for f in doc["features"] if f["properties"]["role"] == "truth"]
    assert len(preds) == 6 and len(truths) == 2
    for f in doc["features"]:
        assert f["type"] == "Feature" and geometry_problems(f["geometry"]) == []
    for q in {f["properties"]["query"] for f in preds}:
        mine = [f["properties"] for f in preds if f["properties"]["query"] == q]
        assert [p["rank"] for p in mine] == [1, 2, 3]
        assert len({p["image_id"] + str(p["year"]) for p in mine}) == 3   # distinct images
        assert mine[0]["score"] >= mine[1]["score"] >= mine[2]["score"]
    for i in range(2):
        with Image.open(tmp_path / f"map-{i}.png") as im:
            assert im.height == 512 and im.width > 512      # map + query beside it
    # an encoder other than the one that made the index's embeddings: said, not silent
    import shutil

    other = shutil.copytree(encoder_dir, tmp_path / "other-encoder")
    proc = run_cli("localize", "--model", other, "--index", idx, images[0], "--output",
                   tmp_path / "o2.geojson")
    assert proc.returncode == 0 and "WARNING" in proc.stderr
    assert f"made by {encoder_dir}, not by --model {other}" in proc.stderr


@pytest.mark.parametrize("lat, lon, text", [(90.0, -289.5, "90.0N 70.5E"), (-12.25, 10.0, "12.2S 10.0E"),
                                            (45.0, 190.0, "45.0N 170.0W"), (0.0, -180.0, "0.0N 180.0W")])
def test_map_corner_label_wraps_longitude(lat, lon, text):
    from retrieval.mapdraw import latlon_label

    assert latlon_label(lat, lon) == text
