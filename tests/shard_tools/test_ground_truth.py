"""Ground truth (APL overlap, VPR radius) and mined pairs, on synthetic and real data."""
from __future__ import annotations

import json

import numpy as np
import pytest

from shard_tools.formats import parse_earthloc_name, parse_vpr_name
from shard_tools.geometry import FootprintSet, pair_iou, tile_footprint
from shard_tools.ground_truth import (
    apl_positives, apl_positives_from_records, iou_mining, mine_pairs, positives_to_lists,
    vpr_positives, vpr_positives_from_records,
)


def _lines(path):
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------- synthetic

def test_apl_positives_per_query_sorted_and_complete():
    tiles = ["10_0510_0614", "10_0510_0616", "10_0510_0618", "10_0512_0614", "10_0100_0100"]
    db = np.array([tile_footprint(t) for t in tiles])
    s, w = tile_footprint("10_0510_0616")[0]
    # q0: a small square inside tiles 0, 1 and 3 (0-1 overlap by half, 3 is one row down)
    q0 = [[s + 0.1, w + 0.1], [s + 0.3, w + 0.1], [s + 0.3, w + 0.3], [s + 0.1, w + 0.3]]
    q1 = [[50.0, 10.0], [51.0, 10.0], [51.0, 11.0], [50.0, 11.0]]          # nowhere
    pos = apl_positives(db, np.array([q0, q1, q0]))
    assert [p.tolist() for p in pos] == [[0, 1, 3], [], [0, 1, 3]]
    assert all(p.dtype.kind == "i" for p in pos)
    # a prebuilt database set is reused, and gives the same answer
    assert [p.tolist() for p in apl_positives(FootprintSet(db), np.array([q0]))] == [[0, 1, 3]]


def test_vpr_positives_radius_inclusive_and_zones():
    db = [[500000.0, 4000000.0, 10, "S"], [500025.0, 4000000.0, 10, "S"],
          [500025.01, 4000000.0, 10, "S"], [500000.0, 4000000.0, 11, "S"],
          [499990.0, 4000010.0, 10, "S"]]
    q = [[500000.0, 4000000.0, 10, "S"], [500000.0, 4000000.0, 11, "S"],
         [0.0, 0.0, 12, "T"]]
    pos = positives_to_lists(vpr_positives(db, q, 25.0))
    assert pos == [[0, 1, 4], [3], []]          # 25 m is in, 25.01 m is out, zones apart
    assert positives_to_lists(vpr_positives(db, q, 10.0)) == [[0], [3], []]
    # without zones everything is one plane
    assert positives_to_lists(vpr_positives([r[:2] for r in db], [q[0][:2]]))[0] == [0, 1, 3, 4]


def test_mine_pairs_keys_values_and_threshold():
    tiles = ["10_0510_0614", "10_0510_0616", "10_0200_0200"]
    db = [{"source": f"database/{t}.jpg", "footprint": tile_footprint(t)} for t in tiles]
    fp0 = tile_footprint(tiles[0])
    q = [{"source": "b.jpg", "footprint": fp0},                                       # IoU 1 with 0
         {"source": "a.jpg", "footprint": [[la, lo + 0.1] for la, lo in fp0]},         # 0.87 / 0.40
         {"source": "c.jpg", "footprint": [[la + 30, lo] for la, lo in fp0]}]          # none
    pairs = mine_pairs(db, q, 0.5)
    assert pairs == {"database/10_0510_0614.jpg": ["a.jpg", "b.jpg"]}
    pairs = mine_pairs(db, q, 0.2)
    assert pairs == {"database/10_0510_0614.jpg": ["a.jpg", "b.jpg"],
                     "database/10_0510_0616.jpg": ["a.jpg", "b.jpg"]}
    di, qi, iou = iou_mining(np.array([d["footprint"] for d in db]),
                             np.array([r["footprint"] for r in q]), 0.0)
    assert np.all(np.diff(di) >= 0) and np.all(iou > 0)
    assert mine_pairs(db, q[2:], 0.5) == {}


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def earthloc_mining(shared_data):
    el = shared_data / "earthloc"
    db = [parse_earthloc_name(n) for n in _lines(el / "database_candidates.txt")]
    q = [parse_earthloc_name(n) for n in _lines(el / "queries_outside_test_regions.txt")]
    return el, db, q, FootprintSet(np.array([r["footprint"] for r in db])), \
        FootprintSet(np.array([r["footprint"] for r in q]))


@pytest.mark.parametrize("threshold, filename, n_tiles, n_pairs",
                         [(0.5, "pairs_iou050.json", 1618, 3062),
                          (0.25, "pairs_iou025.json", 8475, 28270)])
def test_mined_pairs_reproduce_earthloc2(earthloc_mining, threshold, filename, n_tiles, n_pairs):
    el, db, q, dbs, qs = earthloc_mining
    ref = json.loads((el / filename).read_text())
    want = {(k, v) for k, vs in ref.items() for v in vs}
    assert len(ref) == n_tiles and len(want) == n_pairs
    di, qi, iou = iou_mining(dbs, qs, threshold)
    got = {(db[d]["source"], q[j]["source"]): x for d, j, x in zip(di, qi, iou)}
    tp = len(want & set(got))
    recall, precision = tp / len(want), tp / len(got)
    print(f"IoU > {threshold}: {len(got)} pairs found, {len(want)} published, "
          f"recall {recall:.4%}, precision {precision:.4%}")
    assert recall == 1.0
    assert precision >= 0.99
    extra = np.array([got[p] for p in set(got) - want])
    assert np.all((extra > threshold) & (extra <= threshold + 0.002))
    # the published pairs are all above the threshold by our IoU too
    dindex = {r["source"]: i for i, r in enumerate(db)}
    qindex = {r["source"]: i for i, r in enumerate(q)}
    pairs = np.array([(qindex[v], dindex[k]) for k, v in want])
    assert pair_iou(qs, dbs, pairs[:, 0], pairs[:, 1]).min() > threshold


def test_mine_pairs_records_api_format(earthloc_mining):
    el, db, q, _, _ = earthloc_mining
    pairs = mine_pairs(db, q, 0.5)
    ref = json.loads((el / "pairs_iou050.json").read_text())
    assert list(pairs) == sorted(pairs)
    assert all(v == sorted(v) for v in pairs.values())
    assert set(ref) <= set(pairs)
    assert all(set(ref[k]) <= set(pairs[k]) for k in ref)


def test_vpr_positives_reproduce_sf_xs(shared_data):
    sf = shared_data / "sf-xs"
    db = [parse_vpr_name(n, "database") for n in _lines(sf / "val_database.txt")]
    q = [parse_vpr_name(n, "query") for n in _lines(sf / "val_queries.txt")]
    got = positives_to_lists(vpr_positives_from_records(db, q))
    assert got == json.loads((sf / "val_positives.json").read_text())


def test_apl_positives_real_queries_against_candidates(shared_data):
    el = shared_data / "earthloc"
    db = [parse_earthloc_name(n) for n in _lines(el / "database_candidates.txt")]
    q = [parse_earthloc_name(n) for n in _lines(el / "queries_outside_test_regions.txt")[:300]]
    pos = apl_positives_from_records(db, q)
    assert len(pos) == 300
    # every mined pair (IoU > 0.25) is an intersecting pair
    ref = json.loads((el / "pairs_iou025.json").read_text())
    dindex = {r["source"]: i for i, r in enumerate(db)}
    by_query: dict[str, set] = {}
    for k, vs in ref.items():
        for v in vs:
            by_query.setdefault(v, set()).add(dindex[k])
    checked = 0
    for j, r in enumerate(q):
        want = by_query.get(r["source"], set())
        assert want <= set(pos[j].tolist())
        checked += len(want)
    assert checked > 300


def test_a_utm_without_its_zone_is_named_not_reshaped_into_other_records():
    from shard_tools.ground_truth import vpr_positives_from_records

    db = [{"key": f"d{i}", "utm": [500000.0 + i, 4e6, 10, "S"]} for i in range(3)]
    bad = [{"key": "q0", "utm": [500000.0, 4e6]}, {"key": "q1", "utm": [500001.0, 4e6]}]
    with pytest.raises(ValueError, match=r"'q0' has utm .*zone"):
        vpr_positives_from_records(db, bad)
