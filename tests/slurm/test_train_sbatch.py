"""slurm/train.sbatch on a real single-node SLURM: 2 CPU processes (gloo) train and
checkpoint; a second submission of the same job resumes from the latest checkpoint and
the update count continues."""
from __future__ import annotations

import json

import pytest

from conftest import PYTHON, REPO, run_env
from tests.trainer.test_train import recipe, tiny_data, write_recipe  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _latest(run) -> dict:
    return json.loads((run / "checkpoints" / "latest.json").read_text())


def test_train_sbatch_checkpoints_and_a_resubmission_resumes(slurm_cluster, tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "recipe.yaml", recipe(
        tiny_data, run, data={"workers": 0},
        train={"epochs": 2, "max_steps": 2, "checkpoint_every": 1},
        eval={"database_shards": None, "query_shards": None}))
    env = {**run_env(), "STREAMLOC_PYTHON": PYTHON, "PROCS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    script = str(REPO / "slurm" / "train.sbatch")
    log = tmp_path / "train.out"

    first = slurm_cluster.sbatch(f"--output={log}", "--cpus-per-task=2", "--mem=4G", script,
                                 str(cfg), cwd=REPO, env=env, timeout=600)
    text = log.read_text() if log.exists() else ""
    assert first.returncode == 0, first.stderr + text
    assert "1 node(s) x 2 process(es)" in text
    assert _latest(run)["step"] == 2
    assert (run / "config.yaml").is_file()

    second = slurm_cluster.sbatch(f"--output={log}", "--open-mode=append", "--cpus-per-task=2",
                                  "--mem=4G", script, str(cfg), "train.max_steps=4", cwd=REPO,
                                  env=env, timeout=600)
    text = log.read_text()
    assert second.returncode == 0, second.stderr + text
    assert "resumed from" in text and "update 2" in text
    assert _latest(run)["step"] == 4
