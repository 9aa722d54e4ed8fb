"""slurm/convert.sbatch as a real SLURM array job: three tasks equal one conversion."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, TEST_TILES, make_earthloc_tree, run_env

pytestmark = pytest.mark.slurm


def test_array_job_converts_like_a_single_task(slurm_cluster, tmp_path):
    root = tmp_path / "in"
    make_earthloc_tree(root, TEST_TILES)
    single = tmp_path / "single"
    subprocess.run([PYTHON, "-m", "shard_tools", "convert", "--format", "earthloc", "--kind",
                    "places", "--input", str(root), "--output", str(single), "--shard-size", "2",
                    "--no-progress"], env=run_env(), cwd=REPO, check=True, capture_output=True)
    out = tmp_path / "array"
    env = {**run_env(), "STREAMLOC_PYTHON": PYTHON}
    proc = slurm_cluster.sbatch("--array=0-2", f"--output={tmp_path}/task-%a.out",
                                "--cpus-per-task=1", "--mem=500M", str(REPO / "slurm" / "convert.sbatch"),
                                "earthloc", "places", str(root), str(out), "--shard-size", "2",
                                cwd=REPO, env=env)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("task-*.out")))
    assert proc.returncode == 0, proc.stderr + logs
    assert len(list(tmp_path.glob("task-*.out"))) == 3
    assert (out / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert len(shards) == 6
    # each task wrote its own contiguous range: two shards each
    assert sum("2 shards" in p.read_text() for p in tmp_path.glob("task-*.out")) == 3
