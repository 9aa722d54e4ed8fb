"""Checkpoints of a run folder: save order, fallbacks past broken ones, failed writes; the
run-folder lock; which recipe keys a resume may change."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from shard_tools.lock import FolderLock, LockHeld
from trainer import checkpoint
from trainer.checkpoint import CheckpointError, CheckpointStore, CheckpointWriteError
from trainer.resume import WORLD_SIZE_KEY, compare_recipes


def _same(ok: bool) -> bool:       # the collective AND of a single process
    return ok


def _save(store: CheckpointStore, step: int, run_id: str = "run-a", keep: int = 2) -> str:
    return store.save(step, {"step": step}, {"rank": 0, "step": step}, 0, 1, _same, keep, run_id)


def _names(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name != "latest.json")


def _resumed(tmp_path, name: str) -> CheckpointStore:
    """The store of a new start that resumed from checkpoint ``name``."""
    store = CheckpointStore(str(tmp_path))
    store.continue_from(CheckpointStore.load(store.path(name), 0)[2])
    return store


def test_pruning_and_latest_follow_the_runs_save_order_not_the_step_number(tmp_path):
    store = CheckpointStore(str(tmp_path))
    for step in (10, 12):
        _save(store, step)
    # resumed from step 10 (step 12 abandoned): the new checkpoints have lower numbers
    store = _resumed(tmp_path, "step-000000010")
    _save(store, 11)
    assert store.latest().endswith("step-000000011")
    _save(store, 12)          # re-saved in place: counts as the newest, not the old 12
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest.json", "step-000000011", "step-000000012"]
    assert json.loads((tmp_path / "checkpoints" / "step-000000012" / "complete.json")
                      .read_text())["seq"] == 4


@pytest.mark.parametrize("keep, left", [
    (2, ["step-000000005", "step-000000008"]),
    (3, ["step-000000004", "step-000000005", "step-000000008"]),
])
def test_checkpoints_saved_after_the_one_resumed_from_are_pruned_and_never_a_fallback(
        tmp_path, keep, left):
    store = CheckpointStore(str(tmp_path))
    for step in (4, 5, 6):
        _save(store, step, keep=3)
    store = _resumed(tmp_path, "step-000000005")      # step 6 is now an abandoned branch
    _save(store, 8, keep=keep)
    assert _names(tmp_path) == left
    assert store.latest().endswith("step-000000008")
    assert [f.rsplit("/", 1)[-1] for f in store.fallbacks(store.latest())] == left[::-1]


def test_a_checkpoint_without_a_file_of_a_rank_it_was_saved_with_is_broken(tmp_path, caplog):
    stores = [CheckpointStore(str(tmp_path)) for _ in range(2)]    # two ranks in one process
    for step in (2, 4):
        for rank in (1, 0):                  # rank 0 last: it writes complete.json
            stores[rank].save(step, {"step": step} if rank == 0 else None,
                              {"rank": rank, "step": step}, rank, 2, _same, 2, "run-a")
    store = stores[0]
    (tmp_path / "checkpoints" / "step-000000004" / "rank-00001.pt").unlink()
    with pytest.raises(CheckpointError, match="step-000000004/rank-00001.pt: missing"):
        CheckpointStore.load(store.latest(), 1)
    folder, (_, mine, _) = CheckpointStore.load_newest_intact(
        store.fallbacks(store.latest()), 1, _same)
    assert folder.endswith("step-000000002") and mine == {"rank": 1, "step": 2}
    assert any("step-000000004" in r.getMessage() and "rank-00001.pt" in r.getMessage()
               for r in caplog.records if "is broken, skipped" in r.getMessage())
    assert CheckpointStore.load(store.latest(), 2)[1] is None     # a rank it never had


def test_another_runs_checkpoints_are_never_pruned(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 50, run_id="other")
    for step in (1, 2, 3):
        _save(store, step, run_id="mine")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest.json", "step-000000002", "step-000000003", "step-000000050"]
    assert store.run_ids() == {"other", "mine"}


def _broken_store(tmp_path, breakage: str) -> CheckpointStore:
    store = CheckpointStore(str(tmp_path))
    for step in (2, 4):
        _save(store, step)
    newest = tmp_path / "checkpoints" / "step-000000004"
    if breakage == "state":
        data = (newest / "state.pt").read_bytes()
        (newest / "state.pt").write_bytes(data[: len(data) // 2])
    elif breakage == "rank":
        data = (newest / "rank-00000.pt").read_bytes()
        (newest / "rank-00000.pt").write_bytes(data[:20])
    return store


@pytest.mark.parametrize("breakage, named", [("state", "state.pt"), ("rank", "rank-00000.pt")])
def test_a_broken_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog,
                                                                       breakage, named):
    store = _broken_store(tmp_path, breakage)
    folder, (shared, mine, _) = CheckpointStore.load_newest_intact(
        store.fallbacks(store.latest()), 0, _same)
    assert folder.endswith("step-000000002") and shared == {"step": 2} and mine["step"] == 2
    warning = [r.getMessage() for r in caplog.records if "is broken, skipped" in r.getMessage()]
    assert len(warning) == 1 and "step-000000004" in warning[0] and named in warning[0]


def test_a_pointer_that_is_not_an_object_is_ignored_with_a_warning(tmp_path, caplog):
    store = _broken_store(tmp_path, "none")
    (tmp_path / "checkpoints" / "latest.json").write_text("[]")
    assert store.latest().endswith("step-000000004")
    assert any("latest.json is not a checkpoint pointer" in r.getMessage()
               for r in caplog.records)


def test_no_intact_checkpoint_is_one_error_naming_each_broken_file(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 2)
    (tmp_path / "checkpoints" / "step-000000002" / "state.pt").write_bytes(b"\x80\x02trunc")
    with pytest.raises(CheckpointError) as info:
        CheckpointStore.load_newest_intact(store.fallbacks(store.latest()), 0, _same)
    msg = str(info.value)
    assert "\n" not in msg and "no intact checkpoint" in msg and "step-000000002/state.pt" in msg


def test_a_failed_write_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path))
    _save(store, 2)
    real = checkpoint.storage.write_bytes_atomic

    def full_disk(url, data, opts=None):
        if url.endswith("state.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), url)
        return real(url, data, opts)
    monkeypatch.setattr(checkpoint.storage, "write_bytes_atomic", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        _save(store, 4)
    msg = str(info.value)
    assert "No space left on device" in msg and "step-000000004" in msg
    assert "step-000000002 is intact" in msg
    assert store.latest().endswith("step-000000002")
    assert not (tmp_path / "checkpoints" / "step-000000004").exists()   # nothing half-made


# ---------------------------------------------------------------- the run-folder lock

def test_folder_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    held = FolderLock(str(tmp_path), ".train-lock.json", what="training into this run folder")
    held.acquire()
    # a second process on this host while the first lives
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys; from shard_tools.lock import FolderLock, LockHeld\n"
         f"try: FolderLock({str(tmp_path)!r}, '.train-lock.json').acquire()\n"
         "except LockHeld as e: print(e); sys.exit(3)"],
        capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert probe.returncode == 3, probe.stderr
    assert f"PID {os.getpid()} on {socket.gethostname()}" in probe.stdout
    held.release()
    assert not (tmp_path / ".train-lock.json").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".train-lock.json").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "slurm": None, "started": 0}))
    with FolderLock(str(tmp_path), ".train-lock.json"):
        owner = json.loads((tmp_path / ".train-lock.json").read_text())
        assert owner["pid"] == os.getpid()


def test_folder_lock_of_another_host_is_refused_unless_it_is_this_slurm_job(tmp_path,
                                                                           monkeypatch):
    lock = tmp_path / ".train-lock.json"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "slurm": "77_", "started": 0}))
    with pytest.raises(LockHeld, match="PID 1 on elsewhere, SLURM job 77_"):
        FolderLock(str(tmp_path), lock.name).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")      # the same job, requeued
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with FolderLock(str(tmp_path), lock.name):
        assert json.loads(lock.read_text())["slurm"] == "77_"


# ---------------------------------------------------------------- recipe keys on resume

def test_recipe_keys_are_breaking_or_changeable_by_what_they_do_to_the_saved_state():
    saved = {"model": {"aggregator": {"name": "gem"}, "pretrained": "/a.pth"},
             "optim": {"optimizer": "adam", "lr": 1e-3}, "train": {"seed": 1, "epochs": 3},
             "data": {"workers": 2, "storage_options": {}}, "eval": {"metric": "R@5"}}
    new = {"model": {"aggregator": {"name": "gem", "p": 4}, "pretrained": "/b.pth"},
           "optim": {"optimizer": "sgd", "lr": 1e-5}, "train": {"seed": 2, "epochs": 4},
           "data": {"workers": 3, "storage_options": {"anon": True}}, "eval": {"metric": "R@1"}}
    change = compare_recipes(saved, new, saved_world=2, world=1)
    assert change.breaking == ["data.workers", "model.aggregator", "optim.optimizer",
                               "train.seed", WORLD_SIZE_KEY]
    assert change.changeable == ["data.storage_options", "eval.metric", "model.pretrained",
                                 "optim.lr", "train.epochs"]
    assert "optim.lr 0.001 -> 1e-05" in change.describe()
    assert not compare_recipes(saved, saved, 1, 1).changed
