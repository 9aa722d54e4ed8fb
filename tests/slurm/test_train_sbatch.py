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


def test_train_sbatch_usr1_checkpoints_every_rank_requeues_and_the_job_resumes(
        slurm_cluster, tiny_data, tmp_path):
    import time

    from tests.slurm_cluster import job_state, signal_batch_shell

    run = tmp_path / "run"
    # checkpoints only at epoch ends (3 updates): the one at the stop comes from USR1
    cfg = write_recipe(tmp_path / "recipe.yaml", recipe(
        tiny_data, run, data={"workers": 0, "steps_per_epoch": 3},
        train={"epochs": 12, "checkpoint_every": None},
        eval={"database_shards": None, "query_shards": None},
        log={"tensorboard": False, "image_grid": False}))
    env = {**run_env(), "STREAMLOC_PYTHON": PYTHON, "PROCS_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    log = tmp_path / "train.out"
    job = slurm_cluster.submit(f"--output={log}", "--cpus-per-task=2", "--mem=4G",
                               str(REPO / "slurm" / "train.sbatch"), str(cfg), cwd=REPO, env=env)
    deadline = time.time() + 600
    while not (run / "checkpoints" / "latest.json").exists():
        assert time.time() < deadline and job_state(slurm_cluster, job).get("JobState") in (
            "PENDING", "RUNNING", "CONFIGURING"), log.read_text() if log.exists() else job
        time.sleep(0.2)
    signal_batch_shell(slurm_cluster, job, "USR1")
    while job_state(slurm_cluster, job).get("JobState") != "COMPLETED":
        state = job_state(slurm_cluster, job)
        assert time.time() < deadline and state.get("JobState") not in (
            "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), (state, log.read_text())
        time.sleep(1)
    text = log.read_text()
    assert "checkpointing, then requeueing" in text, text[-3000:]
    stopped = [ln for ln in text.splitlines() if ln.startswith("stopped by SIGUSR1 at update ")]
    assert len(stopped) == 1, text[-3000:]
    update = int(stopped[0].split("at update ")[1].split(":")[0])
    assert f"step-{update:09d}" in stopped[0]
    assert "restart 1" in text and f"update {update}; recipe changes: none" in text
    summary = json.loads((run / "summary.json").read_text())
    assert summary["updates"] == 36 and summary["world_size"] == 2
    assert len(set(summary["param_sha256_by_rank"])) == 1
