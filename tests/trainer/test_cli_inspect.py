"""``python -m trainer inspect-data``, and a real 2-process DDP run that sees the same batches."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, make_earthloc_tree, run_env
from shard_tools.__main__ import main as shard_main
from trainer.__main__ import main

TILES = [f"08_{r:04d}_{c:04d}" for r in range(100, 116, 2) for c in range(60, 72, 2)]   # 48


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect")
    make_earthloc_tree(root / "db", TILES, years=(2019, 2020, 2021))
    assert shard_main(["convert", "--no-progress", "--format", "earthloc", "--kind", "places",
                       "--input", str(root / "db"), "--output", str(root / "places"),
                       "--shard-size", "6"]) == 0
    return root / "places"


def inspect(capsys, *args) -> list[dict]:
    assert main(["inspect-data", "--no-progress", *map(str, args)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_lines_per_batch_and_ranks_disjoint(places, capsys):
    common = ["--shards", places, "--world-size", 2, "data.places_per_batch=4",
              "data.images_per_place=3", "data.workers=2", "--no-decode"]
    ranks = [inspect(capsys, *common, "--rank", r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    for r, lines in enumerate(ranks):
        assert [ln["step"] for ln in lines] == list(range(6))
        assert {ln["rank"] for ln in lines} == {r} and {ln["epoch"] for ln in lines} == {0}
        assert all(set(ln) == {"epoch", "step", "rank", "keys", "queries", "skipped"} for ln in lines)
    keys = [k for lines in ranks for ln in lines for k in ln["keys"]]
    assert len(keys) == len(set(keys)) == 48
    # --steps, --epoch and --start-step
    part = inspect(capsys, *common, "--rank", 1, "--start-step", 2, "--steps", 3)
    assert part == ranks[1][2:5]
    assert inspect(capsys, *common, "--rank", 1, "--epoch", 1) != ranks[1]


def test_config_with_overrides_and_worker_processes(places, capsys, tmp_path):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("model: {image_size: 32}\ndata:\n  places_per_batch: 4\n  images_per_place: 3\n"
                   "  workers: 2\n  augment: earthloc\n")
    inline = inspect(capsys, "--config", cfg, f"data.train_shards={places}", "--counts")
    workers = inspect(capsys, "--config", cfg, f"data.train_shards={places}", "--counts",
                      "--loader", "workers")
    assert inline == workers
    assert inline[-1]["counts"]["images"] == 3 * 48 and inline[-1]["steps_per_epoch"] == 12


def test_bad_input_is_one_line_and_exit_2(places, capsys):
    assert main(["inspect-data", "--shards", str(places), "data.places_per_bach=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown key 'places_per_bach' in data config; did you mean 'places_per_batch'?"
    assert main(["inspect-data", "--shards", str(places / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["inspect-data", "--shards", str(places), "--rank", "2", "--world-size", "2"]) == 2
    capsys.readouterr()
    # every place smaller than K: found while streaming, still one line
    assert main(["inspect-data", "--shards", str(places), "--steps", "1",
                 "data.images_per_place=50", "data.workers=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no usable place") and "\n" not in err
    # the same inside a DataLoader worker: the re-raised error is unwrapped to its message
    assert main(["inspect-data", "--shards", str(places), "--steps", "1", "--loader", "workers",
                 "data.images_per_place=50", "data.workers=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no usable place in the shards of rank 0") and "\n" not in err


DDP_SCRIPT = """
import json, os, sys
from accelerate import Accelerator
from trainer.data import build_train_data

acc = Accelerator(cpu=True)
shards, out = sys.argv[1], sys.argv[2]
cfg = dict(train_shards=shards, places_per_batch=4, images_per_place=3, workers=2,
           augment="earthloc", seed=7)
td = build_train_data(cfg, 32, acc.process_index, acc.num_processes)
lines = []
for epoch in (0, 1):
    for b in td.batches(epoch):
        assert b.images.shape == (12, 3, 32, 32)
        lines.append(b.summary())
    acc.wait_for_everyone()        # a collective per epoch: hangs if step counts differ
td.close()
with open(os.path.join(out, f"rank{acc.process_index}.jsonl"), "w") as f:
    f.write("".join(json.dumps(l) + "\\n" for l in lines))
"""


@pytest.mark.slow
def test_real_two_process_ddp_sees_what_inspect_data_prints(places, capsys, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(PYTHON))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    script = tmp_path / "record.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = run_env()
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                           "no", "--main_process_port", "0", str(script), str(places),
                           str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = [json.loads(ln) for ln in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
        want = []
        for epoch in (0, 1):
            want += inspect(capsys, "--shards", places, "--rank", rank, "--world-size", 2,
                            "--epoch", epoch, "data.places_per_batch=4", "data.images_per_place=3",
                            "data.workers=2", "data.seed=7", "--no-decode")
        assert got == want


@pytest.mark.parametrize("args, message", [
    (["--image-size", "0"], "error: --image-size must be >= 1, got 0"),
    (["--epoch", "-1"], "error: --epoch must be >= 0, got -1"),
    (["--world-size", "0"], "error: --world-size must be >= 1, got 0"),
    (["--steps", "-2"], "error: --steps must be >= 0, got -2"),
    (["--rank", "-1"], "error: --rank -1 must be in 0..0"),
    (["model.image_size=big"], "error: model.image_size: "),
])
def test_out_of_range_flags_are_refused_not_replaced(places, capsys, args, message):
    assert main(["inspect-data", "--no-progress", "--shards", str(places), *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
    assert captured.out == ""
