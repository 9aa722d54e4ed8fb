"""The index benchmark's real-set protocol: the operating point is a recall target.

``benchmarks/`` is scripts, not a package, so the module is loaded from its file.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("index_search_bench",
                                                  ROOT / "benchmarks" / "index_search.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def region(seed: int, rows: int = 1200, nq: int = 60, dim: int = 32):
    """(name, vectors, local image of each row, queries, positives) like ``real_regions``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    db = centres[rng.integers(0, 40, rows)] + 0.6 * rng.normal(size=(rows, dim))
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
    pick = rng.integers(0, rows, nq)
    q = db[pick] + 0.05 * rng.normal(size=(nq, dim)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    local = np.arange(rows)
    positives = [np.array([p]) for p in pick]   # the perturbed row itself is the positive
    return ("r%d" % seed, db, local, q, positives)


def test_nprobe_ladder(bench):
    assert bench.nprobe_ladder(1) == [1]
    assert bench.nprobe_ladder(128) == [1, 2, 4, 8, 16, 32, 64, 128]


def test_target_picks_the_smallest_nprobe_that_reaches_it(bench):
    sets = [region(0), region(1)]
    flat = bench.real_recall(sets, "Flat", 0.5, None, None)
    assert flat["probes"] == [] and flat["nn_r100"] == 1.0
    assert flat["recall"][1] == pytest.approx(100.0)   # exact search finds each query's row
    out = bench.real_recall(sets, "IVF-Flat", 0.5, None, flat["ids"], target=0.95)
    assert out["reached"] and out["nn_r100"] >= 0.95
    for (_n, vectors, _l, qv, _p), probe, ref in zip(sets, out["probes"], flat["ids"]):
        nprobe, nlist = map(int, probe.split("/"))
        assert nlist == bench.pow2_near(4 * math.sqrt(len(vectors)))
        # minimal: half of it misses the target on this region
        if nprobe > 1:
            index = bench.build_index(vectors, None, f"IVF{nlist},Flat", 1, progress=False)
            got = bench.search(index, qv, bench.K, nprobe // 2).ids
            assert bench.overlap(got, ref, bench.K) < 0.95


def test_fraction_and_unreachable_target(bench):
    sets = [region(2)]
    flat = bench.real_recall(sets, "Flat", 0.5, None, None)
    out = bench.real_recall(sets, "IVF-Flat", 0.5, None, flat["ids"], fraction=4 / 2048)
    assert out["probes"] == ["1/128"]          # the carried fraction probes a single list
    assert out["nn_r100"] < 0.95
    # an unreachable target scans every list and says it was not reached
    never = bench.real_recall(sets, "IVF-PQ", 1 / 32, None, flat["ids"], target=1.01)
    assert not never["reached"] and never["probes"] == ["128/128"]
