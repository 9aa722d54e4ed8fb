"""``pairs``, ``positives`` and ``regions`` end to end through ``python -m shard_tools``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shard_tools.formats import format_earthloc_name, empty_record
from shard_tools.geometry import tile_area_km2, tile_center, tile_footprint

REPO = Path(__file__).resolve().parents[2]


def shard_tools(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "shard_tools", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def tile_name(image_id: str) -> str:
    lat, lon = tile_center(image_id)
    rec = empty_record(footprint=tile_footprint(image_id), image_id=image_id, timestamp="2021",
                       nadir=[lat, lon], area_km2=round(tile_area_km2(image_id)),
                       orientation_deg=0)
    return "database/2021_10/" + format_earthloc_name(rec, decimals=5)


def query_name(n: int, footprint) -> str:
    rec = empty_record(footprint=footprint, image_id=f"ISS060-E-{n}", timestamp="20200105",
                       nadir=[footprint[0][0], footprint[0][1]], area_km2=10000,
                       orientation_deg=12.5)
    return format_earthloc_name(rec, decimals=6)


@pytest.fixture()
def small_apl(tmp_path):
    tiles = ["10_0510_0614", "10_0510_0616", "10_0300_0300"]
    db = [tile_name(t) for t in tiles]
    fp = tile_footprint(tiles[0])
    queries = [query_name(2, [[la + 30, lo] for la, lo in fp]),
               query_name(1, [[la, lo + 0.1] for la, lo in fp])]
    (tmp_path / "db.txt").write_text("\n".join(db) + "\n")
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    return tmp_path, db, queries


def test_pairs_and_apl_positives_on_a_small_list(small_apl):
    tmp, db, queries = small_apl
    r = shard_tools("pairs", "--database", tmp / "db.txt", "--queries", tmp / "q.txt",
                    "--min-iou", "0.3", "--output", tmp / "pairs.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp / "pairs.json").read_text()) == {db[0]: [queries[1]], db[1]: [queries[1]]}
    assert "2 database images, 2 pairs, 1 queries" in r.stdout
    r = shard_tools("positives", "--protocol", "apl", "--database", tmp / "db.txt",
                    "--queries", tmp / "q.txt", "--output", tmp / "pos.json")
    assert r.returncode == 0, r.stderr
    # input order kept: the far query first, with no positive
    assert json.loads((tmp / "pos.json").read_text()) == [[], [0, 1]]


def test_pairs_reproduce_published_with_exclusion(shared_data, tmp_path):
    el = shared_data / "earthloc"
    out = tmp_path / "pairs.json"
    r = shard_tools("pairs", "--database", el / "database_candidates.txt",
                    "--queries", el / "queries.txt", "--exclude-regions", "earthloc-test",
                    "--min-iou", "0.5", "--output", out)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    ref = json.loads((el / "pairs_iou050.json").read_text())
    got_pairs = {(k, v) for k, vs in got.items() for v in vs}
    ref_pairs = {(k, v) for k, vs in ref.items() for v in vs}
    assert ref_pairs <= got_pairs                                  # recall 100%
    assert len(ref_pairs) / len(got_pairs) >= 0.99                 # precision
    assert all(k.startswith("database/2021_") for k in got)        # keys as listed
    assert all(v == sorted(v) for v in got.values())


def test_vpr_positives_reproduce_sf_xs_bytes(shared_data, tmp_path):
    sf = shared_data / "sf-xs"
    out = tmp_path / "pos.json"
    r = shard_tools("positives", "--protocol", "vpr", "--database", sf / "val_database.txt",
                    "--queries", sf / "val_queries.txt", "--radius-m", "25", "--output", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == json.loads((sf / "val_positives.json").read_text())
    assert out.read_bytes() == (sf / "val_positives.json").read_bytes()
    assert "7993 queries" in r.stdout


def test_regions_json_counts(shared_data):
    r = shard_tools("regions", "--queries", shared_data / "earthloc" / "queries.txt", "--json",
                    "--regions", "earthloc-test", "alps", "texas", "toshka", "amazon", "napa",
                    "gobi", "mine:0,0,100,200")
    assert r.returncode == 0, r.stderr
    counts = json.loads(r.stdout)
    assert {k: counts[k]["queries"] for k in ("alps", "texas", "toshka", "amazon", "napa",
                                              "gobi")} == {
        "alps": 2394, "texas": 6143, "toshka": 2164, "amazon": 682, "napa": 3569, "gobi": 727}
    assert counts["mine"] == {"queries": 0, "database": None}
    assert 6143 < counts["earthloc-test"]["queries"] < 17752


def test_regions_table_with_database(small_apl):
    tmp, _, _ = small_apl
    r = shard_tools("regions", "--queries", tmp / "q.txt", "--database", tmp / "db.txt")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["region", "centre", "query_km", "db_km", "queries", "database"]
    names = [ln.split()[0] for ln in lines[1:-1]]
    assert names == ["alps", "texas", "toshka", "amazon", "napa", "gobi", "earthloc-val",
                     "earthloc2-val", "earthloc-test"]
    # the two tiles near (0, 36) are within 5,000 km of Toshka (23, 30); the one near
    # (57, -74) of Texas (30, -95) and Napa (38, -122)
    db = {ln.split()[0]: int(ln.split()[-1]) for ln in lines[1:-1]}
    assert db == {"alps": 0, "texas": 1, "toshka": 2, "amazon": 0, "napa": 1, "gobi": 0,
                  "earthloc-val": 0, "earthloc2-val": 0, "earthloc-test": 3}


@pytest.mark.parametrize("args, message", [
    (["pairs", "--database", "{tmp}/bad.txt", "--queries", "{tmp}/q.txt", "--output",
      "{tmp}/o.json"], "malformed earthloc name"),
    (["pairs", "--database", "{tmp}/missing.txt", "--queries", "{tmp}/q.txt", "--output",
      "{tmp}/o.json"], "not found"),
    (["pairs", "--database", "{tmp}/db.txt", "--queries", "{tmp}/q.txt", "--min-iou", "1.5",
      "--output", "{tmp}/o.json"], "--min-iou"),
    (["pairs", "--database", "{tmp}/db.txt", "--queries", "{tmp}/q.txt", "--exclude-regions",
      "atlantis", "--output", "{tmp}/o.json"], "unknown region"),
    (["positives", "--protocol", "vpr", "--database", "{tmp}/db.txt", "--queries",
      "{tmp}/q.txt", "--output", "{tmp}/o.json"], "malformed vpr name"),
    (["regions", "--queries", "{tmp}/q.txt", "--regions", "x:1,2"], "bad region"),
])
def test_bad_input_is_one_line_and_exit_2(small_apl, args, message):
    tmp, db, _ = small_apl
    (tmp / "bad.txt").write_text(db[0] + "\n@1@2@3@.jpg\n")
    r = shard_tools(*[a.format(tmp=tmp) for a in args])
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], r.stderr
    assert not (tmp / "o.json").exists()


@pytest.mark.parametrize("command", ["pairs", "positives", "regions"])
def test_help_has_examples(command):
    r = shard_tools(command, "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and f"python -m shard_tools {command}" in r.stdout
