"""GeoJSON (RFC 7946) of footprints, antimeridian split, and localize end to end with a map."""
from __future__ import annotations

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from retrieval.geojson import footprint_geometry, geometry_problems, point_geometry
from retrieval.provenance import encoder_identity
from tests.retrieval.helpers import run_cli, tiny_encoder
from tests.retrieval.test_images import half_red_half_blue, jpeg, phone_photo


@pytest.fixture(scope="module")
def other_encoder_dir(tmp_path_factory):
    """The tiny encoder's architecture with other weights (another seed)."""
    from trainer.models import save_encoder

    return save_encoder(tiny_encoder(seed=1), tmp_path_factory.mktemp("enc") / "other")


@pytest.fixture(scope="module")
def tile_index(tile_shards, encoder_dir, tmp_path_factory) -> dict:
    """A Flat index over the tiny encoder's embeddings of 24 EarthLoc tiles."""
    root = tmp_path_factory.mktemp("tile-index")
    emb, idx = root / "emb", root / "idx"
    proc = run_cli("embed", "--model", encoder_dir, "--shards", tile_shards, "--output", emb,
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("index", "--embeddings", emb, "--output", idx, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"embeddings": emb, "index": idx}


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
    # a copy of the same weights elsewhere is the same encoder: no warning
    copy = shutil.copytree(encoder_dir, tmp_path / "copied-encoder")
    proc = run_cli("localize", "--model", copy, "--index", idx, images[0], "--output",
                   tmp_path / "o2.geojson")
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("lat, lon, text", [(90.0, -289.5, "90.0N 70.5E"), (-12.25, 10.0, "12.2S 10.0E"),
                                            (45.0, 190.0, "45.0N 170.0W"), (0.0, -180.0, "0.0N 180.0W")])
def test_map_corner_label_wraps_longitude(lat, lon, text):
    from retrieval.mapdraw import latlon_label

    assert latlon_label(lat, lon) == text


# ---------------------------------------------------------------- which encoder made the index

def test_same_weights_in_another_folder_are_the_same_encoder(encoder_dir, tmp_path):
    from retrieval.localize import encoder_mismatch

    copy = shutil.copytree(encoder_dir, tmp_path / "copy")
    assert encoder_mismatch({"encoder": encoder_identity(encoder_dir)}, str(copy)) is None


def test_other_weights_are_named_in_the_warning(encoder_dir, other_encoder_dir):
    from retrieval.localize import encoder_mismatch

    said = encoder_mismatch({"encoder": encoder_identity(encoder_dir)}, str(other_encoder_dir))
    assert said and f"made by {encoder_dir}" in said and f"--model {other_encoder_dir}" in said


def test_embeddings_without_a_weights_digest_are_not_a_false_warning(encoder_dir, tmp_path,
                                                                     caplog):
    from retrieval.cli import model_label
    from retrieval.localize import encoder_mismatch

    copy = shutil.copytree(encoder_dir, tmp_path / "copy")
    old_meta = {"model": model_label(str(encoder_dir))}     # path@size:mtime, no digest
    with caplog.at_level(logging.DEBUG, logger="retrieval.localize"):
        assert encoder_mismatch(old_meta, str(copy)) is None
        assert encoder_mismatch({"encoder": None}, str(copy)) is None
    assert "no encoder weights digest" in caplog.text
    other_size = {"model": f"{encoder_dir}@123:0"}         # weights of another size: certain
    assert "made by" in encoder_mismatch(other_size, str(copy))


@pytest.mark.slow
def test_localize_warns_when_other_weights_made_the_index(tile_index, other_encoder_dir,
                                                           tile_shards, tmp_path):
    meta = json.loads((tile_index["embeddings"] / "embeddings.json").read_text())
    if not (meta.get("encoder") or {}).get("weights_sha256"):
        pytest.skip("embed does not record the encoder's weights digest")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(half_red_half_blue((40, 40))))
    proc = run_cli("localize", "--model", other_encoder_dir, "--index", tile_index["index"],
                   photo, "--output", tmp_path / "out.geojson")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING" in proc.stderr and f"not by --model {other_encoder_dir}" in proc.stderr


# ---------------------------------------------------------------- photographs

def test_phone_photo_is_embedded_upright(tmp_path):
    from retrieval.localize import embed_photos

    upright = half_red_half_blue((48, 96))
    (tmp_path / "upright.jpg").write_bytes(jpeg(upright))
    (tmp_path / "phone.jpg").write_bytes(phone_photo(upright))
    (tmp_path / "sideways.jpg").write_bytes(jpeg(upright.transpose(Image.Transpose.ROTATE_90)))
    v = embed_photos(tiny_encoder(), [str(tmp_path / n) for n in
                                      ("upright.jpg", "phone.jpg", "sideways.jpg")], (32, 32))
    assert float(v[0] @ v[1]) > 0.99                    # the phone photo as it was taken
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.001


def test_map_of_a_huge_photo_decodes_it_small(tmp_path):
    from retrieval.localize import Localization, map_image

    huge = tmp_path / "huge.jpg"
    Image.new("L", (12000, 6000), 90).save(huge, format="JPEG", quality=50)
    loc = Localization("huge.jpg", [{"rank": 1, "score": 1.0, "row": 0,
                                     "record": {"lat": 45.0, "lon": 9.0, "footprint": None}}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = map_image(loc, str(huge), height=256, use_bluemarble=False)
    assert im.height == 256 and im.width > 256 + 512        # the map and the 2:1 photo beside


def test_map_shows_the_phone_photo_upright(tmp_path):
    from retrieval.localize import Localization, map_image

    photo = tmp_path / "phone.jpg"
    photo.write_bytes(phone_photo(half_red_half_blue((100, 200))))
    loc = Localization("phone.jpg", [{"rank": 1, "score": 1.0, "row": 0,
                                      "record": {"lat": 45.0, "lon": 9.0, "footprint": None}}])
    im = map_image(loc, str(photo), height=256, use_bluemarble=False)
    beside = np.asarray(im)[:, -64:]                     # the right edge: the photo
    assert beside[10, 32, 0] > 200 and beside[-10, 32, 2] > 200   # red on top, blue below


# ---------------------------------------------------------------- bad input, before any work

@pytest.mark.parametrize("flag, name, said", [
    ("--output", "out.png", "--output"),
    ("--map", "map.txt", "--map"),
    ("--output", "a-file/out.geojson", "a-file"),
    ("--map", "a-file/map.png", "a-file"),
])
def test_unusable_output_is_refused_before_any_work(encoder_dir, tmp_path, flag, name, said):
    (tmp_path / "a-file").write_text("not a folder")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(half_red_half_blue((40, 40))))
    outputs = {"--output": str(tmp_path / "out.geojson"), "--map": str(tmp_path / "map.png")}
    outputs[flag] = str(tmp_path / name)
    proc = run_cli("localize", "--model", encoder_dir, "--index", tmp_path / "no-such-index",
                   photo, "--output", outputs["--output"], "--map", outputs["--map"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and said in line and "no-such-index" not in line


@pytest.mark.slow
def test_file_that_is_not_an_image_is_named_and_nothing_written(tile_index, encoder_dir,
                                                                tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "holiday.jpg"
    good.write_bytes(jpeg(half_red_half_blue((40, 40))))
    bad.write_text("not a picture")
    out = tmp_path / "out.geojson"
    proc = run_cli("localize", "--model", encoder_dir, "--index", tile_index["index"], good, bad,
                   "--output", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: {bad}: not an image Pillow can read"
    assert not out.exists()


@pytest.mark.slow
def test_localize_draws_a_map_without_an_extension_as_png(tile_index, encoder_dir, tmp_path):
    photo = tmp_path / "phone.jpg"
    photo.write_bytes(phone_photo(half_red_half_blue((40, 80))))
    proc = run_cli("localize", "--model", encoder_dir, "--index", tile_index["index"], photo,
                   "--output", tmp_path / "out.geojson", "--map", tmp_path / "map",
                   "--map-height", "128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with Image.open(tmp_path / "map.png") as im:
        assert im.format == "PNG" and im.height == 128
