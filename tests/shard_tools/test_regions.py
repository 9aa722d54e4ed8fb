"""Named regions: parsing, selection, and EarthLoc's published test-set counts."""
from __future__ import annotations

import numpy as np
import pytest

from shard_tools.formats import parse_earthloc_name
from shard_tools.regions import (
    REGION_GROUPS, REGIONS, Region, outside_regions, parse_region, region_counts, region_masks,
    resolve_regions, select_database, select_queries,
)

PUBLISHED = {"alps": 2394, "texas": 6143, "toshka": 2164, "amazon": 682, "napa": 3569,
             "gobi": 727}


def _lines(path):
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def test_known_regions_and_groups():
    assert REGION_GROUPS["earthloc-test"] == tuple(PUBLISHED)
    assert REGIONS["alps"] == Region("alps", 45.0, 10.0, 2500.0, 5000.0)
    assert REGIONS["earthloc-val"] == Region("earthloc-val", 30.0, -95.0, 500.0, 1200.0)
    assert REGIONS["earthloc2-val"] == Region("earthloc2-val", 30.0, -95.0, 1000.0, 2200.0)
    assert [r.name for r in resolve_regions(["earthloc-test", "alps", "earthloc-val"])] == \
        list(PUBLISHED) + ["earthloc-val"]


def test_parse_region_specs_and_errors():
    r = parse_region("paris:48.86,2.35,800,1500")
    assert r == Region("paris", 48.86, 2.35, 800.0, 1500.0)
    assert parse_region(r.spec()) == r
    assert resolve_regions(["paris:48.86,2.35,800,1500", r]) == [r]
    for bad, msg in [("atlantis", "unknown region"), ("x:1,2,3", "expected"),
                     ("x:a,2,3,4", "numbers"), ("x:91,2,3,4", "lat"), ("x:1,2,-3,4", "radii"),
                     (":1,2,3,4", "name")]:
        with pytest.raises(ValueError, match=msg):
            parse_region(bad)
    with pytest.raises(ValueError, match="built-in region"):
        resolve_regions(["alps:1,2,3,4", "alps"])
    with pytest.raises(ValueError, match="twice"):
        resolve_regions(["mine:1,2,3,4", "mine:1,2,3,5"])


def test_selection_by_nadir_centre_and_year():
    region = Region("r", 0.0, 0.0, 100.0, 300.0)
    # 1 degree on the equator is 111.19 km
    nadirs = np.array([[0.0, 0.89], [0.0, 0.91], [0.0, -0.5], [0.0, 180.0]])
    assert select_queries(nadirs, region).tolist() == [True, False, True, False]
    recs = [{"lat": 0.0, "lon": 2.0, "year": 2021, "nadir": None},
            {"lat": 0.0, "lon": 2.0, "year": 2019, "nadir": None},
            {"lat": 0.0, "lon": 2.8, "year": 2021, "nadir": None}]
    assert select_database(recs, region).tolist() == [True, False, False]
    assert select_database(recs, region, year=None).tolist() == [True, True, False]
    assert select_database(iter(recs), region).tolist() == [True, False, False]
    # records: queries use the nadir, mining exclusion the footprint centre
    q = [{"lat": 0.0, "lon": 5.0, "nadir": [0.0, 0.5]}, {"lat": 0.0, "lon": 0.5, "nadir": [0, 5]}]
    assert select_queries(q, region).tolist() == [True, False]
    assert outside_regions(q, [region]).tolist() == [True, False]
    assert outside_regions(q, [region], by="nadir").tolist() == [False, True]
    assert outside_regions(q, [region], km=1000).tolist() == [False, False]
    assert outside_regions(q, []).tolist() == [True, True]


def test_region_masks_group_is_union():
    pts = np.array([[45.0, 10.0], [30.0, -95.0], [-40.0, 150.0]])
    masks = region_masks(pts, ["alps", "texas", "earthloc-test"])
    assert masks["earthloc-test"].tolist() == [True, True, False]
    assert (masks["earthloc-test"] == masks["alps"] | masks["texas"]).all()
    with pytest.raises(ValueError):
        region_masks(pts, ["alps"], kind="tiles")


@pytest.fixture(scope="module")
def queries(shared_data):
    return [parse_earthloc_name(n) for n in _lines(shared_data / "earthloc" / "queries.txt")]


def test_published_test_set_counts(queries):
    assert len(queries) == 17752
    counts = region_counts(queries, list(PUBLISHED))
    assert {k: v["queries"] for k, v in counts.items()} == PUBLISHED
    assert all(v["database"] is None for v in counts.values())
    # the same selection from a plain array of nadirs
    nadirs = np.array([r["nadir"] for r in queries])
    assert select_queries(nadirs, REGIONS["gobi"]).sum() == 727


def test_mining_exclusion_keeps_the_published_5626(queries, shared_data):
    keep = outside_regions(queries, resolve_regions(["earthloc-test"]))
    assert keep.sum() == 5626
    want = set(_lines(shared_data / "earthloc" / "queries_outside_test_regions.txt"))
    assert {r["source"] for r, k in zip(queries, keep) if k} == want


def test_database_counts_on_real_tiles(shared_data, queries):
    db = [parse_earthloc_name(n)
          for n in _lines(shared_data / "earthloc" / "database_candidates.txt")]
    counts = region_counts(queries[:10], ["alps", "earthloc-test"], db)
    centres = np.array([[r["lat"], r["lon"]] for r in db])
    assert counts["alps"]["database"] == select_database(centres, REGIONS["alps"]).sum() > 0
    # every candidate is a 2021 tile; another year selects none
    assert region_counts(queries[:1], ["alps"], db, year=2019)["alps"]["database"] == 0
    assert counts["earthloc-test"]["database"] >= counts["alps"]["database"]
