"""Name parsers against the real EarthLoc and SF-XS lists, and malformed inputs."""
from __future__ import annotations

import math
import re

import pytest

from shard_tools import formats
from shard_tools.formats import (
    RECORD_FIELDS, format_earthloc_name, format_vpr_name, parse_csv_row, parse_earthloc_name,
    parse_gsv_cities_name, parse_gsv_cities_row, parse_vpr_name,
)
from shard_tools.geometry import tile_bounds


def _lines(path):
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _without_source(rec):
    return {k: v for k, v in rec.items() if k != "source"}


def test_every_real_query_name_round_trips(shared_data):
    names = _lines(shared_data / "earthloc" / "queries.txt")
    assert len(names) == 17752
    for name in names:
        rec = parse_earthloc_name(name)
        assert set(rec) == set(RECORD_FIELDS)
        assert rec["kind"] == "query" and re.match(r"^(ISS|STS)\d+-E-\d+$", rec["image_id"])
        again = parse_earthloc_name(format_earthloc_name(rec))
        assert _without_source(again) == _without_source(rec), name
        # with the real names' precision the corners, id and timestamp come back as text
        text = format_earthloc_name(rec, decimals=6, nadir_decimals=1, orientation_decimals=1)
        assert text.split("@")[:11] == name.split("@")[:11]


def test_real_query_fields_are_the_name_fields(shared_data):
    name = _lines(shared_data / "earthloc" / "queries.txt")[0]
    parts = name.split("@")
    rec = parse_earthloc_name(name)
    assert rec["footprint"] == [[float(parts[i]), float(parts[i + 1])] for i in (1, 3, 5, 7)]
    assert rec["image_id"] == parts[9] and rec["timestamp"] == parts[10]
    assert rec["year"] == int(parts[10][:4]) and rec["month"] == int(parts[10][4:6])
    assert rec["nadir"] == [float(parts[11]), float(parts[12])]
    assert rec["area_km2"] == float(parts[13]) and rec["orientation_deg"] == float(parts[14])
    lats = [c[0] for c in rec["footprint"]]
    lons = [c[1] for c in rec["footprint"]]
    assert min(lats) < rec["lat"] < max(lats) and min(lons) < rec["lon"] < max(lons)


def test_negative_orientations_parse(shared_data):
    names = _lines(shared_data / "earthloc" / "queries.txt")
    negative = [n for n in names if parse_earthloc_name(n)["orientation_deg"] < 0]
    assert negative, "the real list has negative orientations"


def test_every_real_tile_path_parses_with_year_and_zoom_from_folder(shared_data):
    paths = _lines(shared_data / "earthloc" / "database_candidates.txt")
    assert len(paths) == 8475
    for path in paths:
        rec = parse_earthloc_name(path)
        folder = path.split("/")[1]
        assert rec["kind"] == "database" and rec["place_id"] == rec["image_id"]
        assert rec["year"] == int(folder[:4]) == 2021
        assert rec["image_id"][:2] == folder[5:7]
        again = parse_earthloc_name(format_earthloc_name(rec))
        assert _without_source(again) == _without_source(rec)
        assert formats.earthloc_database_folder(rec) == "/".join(path.split("/")[:3])
        # the name's corners are the WMTS bounds of the tile id (5 decimals)
        s, w, n, e = tile_bounds(rec["image_id"])
        assert rec["footprint"] == [[round(s, 5), round(w, 5)], [round(n, 5), round(w, 5)],
                                    [round(n, 5), round(e, 5)], [round(s, 5), round(e, 5)]]


def test_year_from_folder_when_timestamp_is_empty():
    name = ("database/2019_10/0_40/@-0.70311@35.85938@0.70311@35.85938@0.70311@37.26563"
            "@-0.70311@37.26563@10_0510_0614@@0.00000@36.56250@24500@0@.jpg")
    rec = parse_earthloc_name(name)
    assert rec["year"] == 2019 and rec["timestamp"] == ""


@pytest.mark.parametrize("split", ["val_database.txt", "val_queries.txt"])
def test_every_real_sf_xs_name_parses(shared_data, split):
    names = _lines(shared_data / "sf-xs" / split)
    kind = "query" if "queries" in split else "database"
    for name in names:
        rec = parse_vpr_name(name)
        assert rec["kind"] == kind
        east, north, zone, band = rec["utm"]
        assert (zone, band) == (10, "S") and 5e5 < east < 6e5 and 4.1e6 < north < 4.2e6
        assert 37 < rec["lat"] < 38.5 and -123 < rec["lon"] < -122
        again = parse_vpr_name(format_vpr_name(rec), kind=kind)
        assert _without_source(again) == _without_source(rec), name
        assert format_vpr_name(rec) == name.rsplit("/", 1)[-1]  # the benchmark's own widths


@pytest.mark.parametrize("name, field", [
    ("@1@2@3@4@5@6@7@8@ISS1-E-1@20200101@1@2@3@4@.png", "extension"),
    ("@abc@2@3@4@5@6@7@8@ISS1-E-1@20200101@1@2@3@4@.jpg", "lat1"),
    ("@1@2@3@4@5@6@7@8@ISS1-E-1@20200101@1@2@3@.jpg", "orientation"),
    ("@1@2@3@4@95@6@7@8@ISS1-E-1@20200101@1@2@3@4@.jpg", "lat3"),
    ("@1@2@3@4@5@6@7@8@ISS1-E-1@2020x@1@2@3@4@.jpg", "timestamp"),
    ("@1@2@3@4@5@6@7@8@ISS1-E-1@20200101@1@nan@3@4@.jpg", "nadir_lon"),
    ("1@2@3@4@5@6@7@8@ISS1-E-1@20200101@1@2@3@4@.jpg", "lat1"),
])
def test_malformed_earthloc_names_name_the_field(name, field):
    with pytest.raises(ValueError, match=f"field '{field}'"):
        parse_earthloc_name(name)


@pytest.mark.parametrize("name, field", [
    ("@x@4181608.34@10@S@037.78@-122.46@pano@@360@@@@201511@@.jpg", "utm_east"),
    ("@0546703.60@4181608.34@99@S@037.78@-122.46@pano@@360@@@@201511@@.jpg", "utm_zone"),
    ("@0546703.60@4181608.34@10@7@037.78@-122.46@pano@@360@@@@201511@@.jpg", "utm_band"),
    ("@0546703.60@4181608.34@10@S@037.78@-122.46@pano@@360@@@@201511@.jpg", "note"),
])
def test_malformed_vpr_names_name_the_field(name, field):
    with pytest.raises(ValueError, match=f"field '{field}'"):
        parse_vpr_name(name)


def test_vpr_round_trip_keeps_extra_precision():
    name = "@0550758.425@4179252.39@10@S@37.774929512@-122.42375@pano@@300@@@@201405@@.jpg"
    rec = parse_vpr_name(name)
    assert _without_source(parse_vpr_name(format_vpr_name(rec))) == _without_source(rec)


def test_gsv_cities_name_and_row_agree_and_panoid_may_hold_underscores():
    row = {"place_id": "42", "year": "2017", "month": "6", "northdeg": "90",
           "city_id": "London", "lat": "51.5074", "lon": "-0.1278", "panoid": "ab_cd-EF"}
    name = formats.gsv_cities_image_name(row)
    assert name == "London_0000042_2017_06_090_51.5074_-0.1278_ab_cd-EF.jpg"
    from_name = parse_gsv_cities_name(name)
    from_row = parse_gsv_cities_row(row, source=name)
    assert from_name == from_row
    assert from_row["place_id"] == "London_0000042" and from_row["image_id"] == "ab_cd-EF"
    assert (from_row["year"], from_row["month"], from_row["heading_deg"]) == (2017, 6, 90.0)
    with pytest.raises(ValueError, match="field 'lat'"):
        parse_gsv_cities_row({**row, "lat": "north"})
    with pytest.raises(ValueError, match="field 'panoid'"):
        parse_gsv_cities_row({**row, "panoid": ""})


def test_csv_rows_with_and_without_footprint():
    rec = parse_csv_row({"path": "a/b.jpg", "lat": "10", "lon": "20", "place_id": "p1"})
    assert rec["footprint"] is None and rec["place_id"] == "p1" and rec["kind"] == "database"
    corners = {f"lat{i}": str(i) for i in range(1, 5)} | {f"lon{i}": str(10 + i) for i in range(1, 5)}
    rec = parse_csv_row({"path": "q.jpg", "lat": "2", "lon": "12", "place_id": "p",
                         "kind": "query", "year": "2020", **corners})
    assert rec["footprint"] == [[1.0, 11.0], [2.0, 12.0], [3.0, 13.0], [4.0, 14.0]]
    assert rec["year"] == 2020 and rec["kind"] == "query"
    with pytest.raises(ValueError, match="field 'place_id'"):
        parse_csv_row({"path": "a.jpg", "lat": "1", "lon": "2", "place_id": ""})
    with pytest.raises(ValueError, match="field 'lon3'"):
        parse_csv_row({"path": "a.jpg", "lat": "1", "lon": "2", "place_id": "p",
                       **{k: v for k, v in corners.items() if k != "lon3"}})


def test_centroid_across_the_antimeridian():
    fp = [[-1.0, 179.0], [1.0, 179.0], [1.0, -179.0], [-1.0, -179.0]]
    lat, lon = formats.footprint_centroid(fp)
    assert math.isclose(lat, 0.0, abs_tol=1e-9)
    assert math.isclose(abs(lon), 180.0, abs_tol=1e-9)
