"""Real runs into one run folder: fresh starts, resumes with a changed recipe, broken
checkpoints, a full disk, signals and a second run at the same time.

Tiny in-process runs (``trainer.train.main``) where the exit status and stderr are the
point; real processes where a signal or a second process is."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import PYTHON, REPO, free_port, run_env
from tests.trainer.test_train import load_weights, recipe, tiny_data, write_recipe  # noqa: F401

from trainer.train import main


def _recipe(tiny_data, run: Path, **train) -> dict:
    return recipe(tiny_data, run, data={"steps_per_epoch": 3},
                  train={"epochs": 2, "checkpoint_every": 1, "keep_checkpoints": 2, **train},
                  eval={"database_shards": None, "query_shards": None},
                  log={"tensorboard": False, "image_grid": False})


def _errors(err: str) -> list[str]:
    return [ln for ln in err.strip().splitlines() if ln.strip()]


def _latest(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "latest.json").read_text())


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


@pytest.fixture()
def finished(tiny_data, tmp_path) -> tuple[Path, Path]:
    """A run of 2 epochs x 3 updates, done: checkpoints 5 and 6, final/."""
    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", _recipe(tiny_data, run))
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    assert _checkpoints(run) == ["step-000000005", "step-000000006"]
    return run, cfg


# ---------------------------------------------------------------- a fresh run into a used folder

def test_a_fresh_run_into_another_runs_folder_is_refused_then_overwrite_moves_it_aside(
        finished, tmp_path, capsys):
    run, cfg = finished
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["--config", str(cfg), "--no-progress", "optim.lr=1e-5"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ") and "another run" in err[0]
    assert "--resume latest" in err[0] and "--overwrite" in err[0]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before

    old_id = json.loads((run / "run.json").read_text())["run_id"]
    old_final = load_weights(run / "final")
    assert main(["--config", str(cfg), "--no-progress", "--overwrite", "optim.lr=1e-5",
                 "train.max_steps=2"]) == 0
    moved = list((run / "overwritten").iterdir())
    assert len(moved) == 1 and _checkpoints(moved[0]) == ["step-000000005", "step-000000006"]
    kept = load_weights(moved[0] / "final")
    assert all(np.array_equal(kept[k], old_final[k]) for k in kept)
    # the new run: its own id, its own checkpoints (the old 5 and 6 did not outlive them)
    assert json.loads((run / "run.json").read_text())["run_id"] != old_id
    assert _checkpoints(run) == ["step-000000001", "step-000000002"]
    assert json.loads((run / "summary.json").read_text())["updates"] == 2


# ---------------------------------------------------------------- the recipe on resume

def test_a_changed_lr_on_resume_is_used_recorded_and_named(tiny_data, tmp_path, caplog):
    from trainer.recipe import Recipe
    from trainer.train import Trainer

    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", _recipe(tiny_data, run, max_steps=2))
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    new = Recipe.load(cfg, ["optim.lr=1e-5", "train.max_steps=4"])
    trainer = Trainer(new, progress=False)
    try:
        trainer.setup("latest")
        factor = trainer.scheduler.lr_lambdas[0](trainer.scheduler.last_epoch)
        assert trainer.state.update == 2
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * factor)
        assert trainer.scheduler.base_lrs == [pytest.approx(1e-5)]
        trainer.fit()
        assert trainer._lr_used == pytest.approx(1e-5 * trainer.scheduler.lr_lambdas[0](3))
    finally:
        trainer.close()
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    assert len(line) == 1 and "optim.lr 0.003 -> 1e-05" in line[0] and "train.max_steps 2 -> 4" in line[0]
    record = json.loads((run / "resumes.jsonl").read_text().splitlines()[-1])
    assert record["changed"]["optim.lr"] == [0.003, 1e-05] and record["breaking"] == []
    assert "lr: 1.0e-05" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("override, keys", [
    (["optim.optimizer=sgd"], ["optim.optimizer"]),
    (["model.projection_dim=8", "data.seed=2"], ["data.seed", "model.projection_dim"]),
])
def test_a_resume_that_changes_breaking_keys_is_refused_naming_each(finished, capsys,
                                                                   override, keys):
    run, cfg = finished
    capsys.readouterr()
    assert main(["--config", str(cfg), "--no-progress", "--resume", "latest",
                 "train.epochs=3", *override]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ") and "--allow-recipe-change" in err[0]
    for key in keys:
        assert key in err[0]
    assert "train.epochs" not in err[0]              # changeable: not refused
    assert not (run / "resumes.jsonl").exists()


def test_allowed_breaking_changes_resume_or_fail_in_one_line(finished, capsys):
    run, cfg = finished
    # another optimizer: its state starts afresh, and training goes on
    assert main(["--config", str(cfg), "--no-progress", "--resume", "latest",
                 "--allow-recipe-change", "optim.optimizer=sgd", "train.epochs=3"]) == 0
    record = json.loads((run / "resumes.jsonl").read_text().splitlines()[-1])
    assert record["breaking"] == ["optim.optimizer"] and record["allowed"] is True
    assert json.loads((run / "summary.json").read_text())["updates"] == 9
    # weights of another shape cannot be loaded: one line, no traceback
    capsys.readouterr()
    assert main(["--config", str(cfg), "--no-progress", "--resume", "latest",
                 "--allow-recipe-change", "optim.optimizer=sgd", "model.projection_dim=8",
                 "train.epochs=4"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and "do not fit this recipe's model" in err[0]


def test_a_resume_from_an_older_checkpoint_prunes_the_abandoned_later_ones(tiny_data, tmp_path,
                                                                          caplog):
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", recipe(
        tiny_data, run, data={"steps_per_epoch": 10},
        train={"epochs": 1, "max_steps": 6, "checkpoint_every": 1, "keep_checkpoints": 2},
        eval={"database_shards": None, "query_shards": None},
        log={"tensorboard": False, "image_grid": False}))
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    assert _checkpoints(run) == ["step-000000005", "step-000000006"]
    five = run / "checkpoints" / "step-000000005"
    assert main(["--config", str(cfg), "--no-progress", "--resume", str(five),
                 "train.max_steps=8", "train.checkpoint_every=4"]) == 0
    # 8 continues 5: the abandoned 6 goes, the checkpoint the run came from stays
    assert _checkpoints(run) == ["step-000000005", "step-000000008"]
    assert json.loads((run / "checkpoints" / "step-000000008" / "complete.json").read_text())[
        "parent"] == json.loads((five / "complete.json").read_text())["seq"]
    state = run / "checkpoints" / "step-000000008" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    caplog.clear()
    assert main(["--config", str(cfg), "--no-progress", "--resume", "latest",
                 "train.max_steps=8", "train.checkpoint_every=4"]) == 0
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed")]
    assert "step-000000005" in resumed[0]           # the fallback is 8's own line


# ---------------------------------------------------------------- broken checkpoints

def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(finished, capsys, caplog):
    caplog.set_level(logging.INFO)
    run, cfg = finished
    state = run / "checkpoints" / "step-000000006" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    assert main(["--config", str(cfg), "--no-progress", "--resume", "latest"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step-000000006" in w and "state.pt" in w for w in warnings), warnings
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed")]
    assert "step-000000005" in resumed[0] and "update 5" in resumed[0]
    assert json.loads((run / "summary.json").read_text())["updates"] == 6


def test_no_intact_checkpoint_is_one_line(finished, capsys):
    run, cfg = finished
    for name in _checkpoints(run):
        (run / "checkpoints" / name / "rank-00000.pt").write_bytes(b"PK\x03\x04")
    capsys.readouterr()
    assert main(["--config", str(cfg), "--no-progress", "--resume", "latest"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: no intact checkpoint")
    assert "step-000000006/rank-00000.pt" in err[0] and "step-000000005/rank-00000.pt" in err[0]


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous(
        tiny_data, tmp_path, capsys, monkeypatch):
    from trainer import checkpoint

    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", _recipe(tiny_data, run))
    real = checkpoint.storage.write_bytes_atomic

    def fill_up(url, data, opts=None):
        if "step-000000002" in url:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(url, data, opts)
    monkeypatch.setattr(checkpoint.storage, "write_bytes_atomic", fill_up)
    assert main(["--config", str(cfg), "--no-progress"]) == 2
    err = _errors(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: cannot write checkpoint")
    assert "No space left on device" in err[0] and "step-000000001 is intact" in err[0]
    assert _latest(run)["step"] == 1 and _checkpoints(run) == ["step-000000001"]
    assert not (run / ".train-lock.json").exists()
    monkeypatch.undo()
    assert main(["--config", str(cfg), "--no-progress", "--resume", "latest"]) == 0


# ---------------------------------------------------------------- summary.json

def test_summary_is_json_without_nan_and_keeps_throughput_after_a_resume_with_nothing_left(
        finished, tmp_path):
    run, cfg = finished
    first = json.loads((run / "summary.json").read_text())
    assert first["images_per_s"] > 0 and first["data_wait_fraction"] is not None
    assert main(["--config", str(cfg), "--no-progress", "--resume", "latest"]) == 0
    text = (run / "summary.json").read_text()
    assert "NaN" not in text
    again = json.loads(text)
    assert again["updates"] == 6 and again["final/loss"] is None      # no update: no loss
    assert again["images_per_s"] == first["images_per_s"]
    assert again["data_wait_fraction"] == first["data_wait_fraction"]


def test_summary_records_the_environment_it_trained_in_and_the_seeds(finished):
    import torch

    run, cfg = finished
    summary = json.loads((run / "summary.json").read_text())
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    env = summary["environment"]
    assert env["versions"]["torch"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["seed"] == recipe["train"]["seed"]
    assert summary["seeds"] == {"train": recipe["train"]["seed"], "data": recipe["data"]["seed"]}


# ---------------------------------------------------------------- other processes

def _env() -> dict:
    env = run_env()
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


def _start(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "trainer", "--config", str(cfg), "--no-progress",
                             *extra], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_second_run_into_a_busy_folder_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", _recipe(tiny_data, run, epochs=40))
    first = _start(cfg)
    try:
        _wait_for(lambda: (run / ".train-lock.json").exists(), first, "the lock")
        capsys.readouterr()
        assert main(["--config", str(cfg), "--no-progress", "--resume", "latest"]) == 2
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and f"PID {first.pid}" in err[0] and ".train-lock.json" in err[0]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM     # also when it arrives during setup
    assert not (run / ".train-lock.json").exists()      # released on the way out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_stops_at_an_update_with_a_checkpoint_and_one_line(tiny_data, tmp_path, sig):
    run = tmp_path / "run"
    # checkpoints only at epoch ends (every 3 updates): the stop writes its own
    cfg = write_recipe(tmp_path / "r.yaml", _recipe(tiny_data, run, epochs=40,
                                                    checkpoint_every=None))
    proc = _start(cfg, "data.workers=1")
    _wait_for(lambda: (run / "checkpoints" / "latest.json").exists(), proc, "a checkpoint")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    step = _latest(run)["step"]
    assert last.startswith(f"stopped by {signal.Signals(sig).name} at update {step}:"), err[-2000:]
    assert f"step-{step:09d}" in last and "--resume latest" in last
    assert not (run / "final").exists() and not (run / ".train-lock.json").exists()
    # it goes on from there
    resumed = subprocess.run([PYTHON, "-m", "trainer", "--config", str(cfg), "--no-progress",
                              "--resume", "latest", "data.workers=1", f"train.max_steps={step + 1}"],
                             cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"update {step}" in resumed.stderr


@pytest.mark.slow
def test_an_error_every_rank_agrees_on_is_one_line_and_both_ranks_leave_cleanly(tiny_data,
                                                                              tmp_path):
    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", _recipe(tiny_data, run))
    broken = run / "checkpoints" / "step-000000003"       # complete.json, no state.pt
    broken.mkdir(parents=True)
    (broken / "complete.json").write_text(json.dumps({"step": 3, "world_size": 2}))
    proc = subprocess.run(
        [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "trainer", "--config", str(cfg),
         "--no-progress", "--resume", "latest"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no intact checkpoint"), \
        proc.stderr[-3000:]
    assert f"{broken}/state.pt: missing" in errors[0]
    # no traceback of ours, no rank aborted by gloo (the launcher's own report of the exit
    # codes stays; it may SIGTERM the slower rank once the first one has exited)
    ours = [ln for ln in proc.stderr.splitlines() if "File " in ln and "/trainer/" in ln]
    assert not ours and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert "gloo" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert not (run / ".train-lock.json").exists()       # released before the ranks leave
