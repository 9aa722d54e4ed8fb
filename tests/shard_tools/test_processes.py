"""Processes and temporaries: real signals, real concurrent runs.

A FIFO in the input blocks the converter at a known image, so a test can signal
it, or start a second run, while a shard is half-written.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, TEST_TILES, make_earthloc_tree, run_env

IMAGES = ("--format", "earthloc", "--kind", "images")


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc: no extra dependency)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"gave up waiting for {what}")


def read_to_eof(fd: int, timeout: float) -> bool:
    """True when every holder of the pipe's write end has closed it within ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready and not os.read(fd, 65536):
            return True
    return False


@pytest.fixture
def blocked_input(tmp_path):
    """An earthloc folder whose 14th image (shard 2 at --shard-size 5) is a FIFO."""
    root = tmp_path / "earthloc"
    names = sorted(make_earthloc_tree(root, TEST_TILES))
    blocker = root / names[13]
    good = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)

    def unblock() -> None:
        """For the next run: the FIFO becomes the image it stood for."""
        blocker.unlink()
        blocker.write_bytes(good)

    def feed() -> None:
        """For the blocked run: write the image's bytes into the FIFO."""
        with open(blocker, "wb") as f:
            f.write(good)

    unblock.feed = feed
    return root, names, unblock


def start(cmd_args, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "shard_tools", "convert", *map(str, cmd_args),
                             "--no-progress"], cwd=REPO, env=env or run_env(), **kw)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name) if folder.exists() \
        else []


# ---------------------------------------------------------------- workers die with the parent

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_parent(blocked_input, tmp_path, sig):
    root, _, unblock = blocked_input
    out = tmp_path / "out"
    read_fd, write_fd = os.pipe()
    proc = start([*IMAGES, "--input", root, "--output", out, "--shard-size", 5, "--workers", 2],
                 stdout=write_fd, stderr=subprocess.PIPE, pass_fds=())
    os.close(write_fd)
    try:
        wait_until(lambda: len(list(out.glob("*.stats.json"))) >= 3 and temporaries(out),
                   what="two workers, one blocked on the FIFO")
        workers = children_of(proc.pid)
        assert len(workers) >= 2                       # the pool (and the resource tracker)
        proc.send_signal(sig)
        proc.wait(60)
        # every process that inherited our stdout has exited: the pipe reaches EOF
        assert read_to_eof(read_fd, 60), "orphaned workers still hold the caller's stdout"
        wait_until(lambda: not any(alive(w) for w in workers), 30, "workers to exit")
        assert temporaries(out) == []                  # the blocked worker removed its temporary
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM
            err = proc.stderr.read().decode()
            assert "error: terminated" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(read_fd)
        for w in children_of(proc.pid):
            os.kill(w, signal.SIGKILL)
    unblock()
    done = subprocess.run([PYTHON, "-m", "shard_tools", "convert", *IMAGES, "--input", str(root),
                           "--output", str(out), "--shard-size", "5", "--no-progress"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "manifest.json").read_text())["totals"]["images"] == 24


# ---------------------------------------------------------------- a lock on the output

def test_a_second_run_into_a_busy_output_is_refused(blocked_input, tmp_path):
    root, _, unblock = blocked_input
    out = tmp_path / "out"
    args = [*IMAGES, "--input", root, "--output", out, "--shard-size", 5]
    first = start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # shards 0 and 1 come and go; shard 2 waits on the FIFO, so its temporary stays
        wait_until(lambda: any("images-000002" in t for t in temporaries(out)),
                   what="the first run's temporary of the blocked shard")
        live = temporaries(out)
        second = subprocess.run([PYTHON, "-m", "shard_tools", "convert", *map(str, args),
                                 "--no-progress"], cwd=REPO, env=run_env(),
                                capture_output=True, text=True)
        assert second.returncode == 2
        lines = [ln for ln in second.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in second.stderr
        assert f"PID {first.pid}" in lines[0] and ".convert-lock-" in lines[0]
        assert temporaries(out) == live                # the first run's temporary is untouched
        # another array task (disjoint shards) may run at the same time
        other = subprocess.run([PYTHON, "-m", "shard_tools", "convert", *map(str, args),
                                "--task-index", "1", "--num-tasks", "2", "--no-progress"],
                               cwd=REPO, env=run_env(), capture_output=True, text=True)
        # shards 3-4 of 5: but the first run (one task) holds all five, so it is refused
        assert other.returncode == 2 and "PID" in other.stderr
    finally:
        threading.Thread(target=unblock.feed, daemon=True).start()
        try:
            first.wait(120)
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 0, first.stderr.read().decode()
    assert not list(out.glob(".convert-lock-*"))


def test_array_tasks_run_side_by_side_and_a_dead_owner_is_taken_over(blocked_input,
                                                                       tmp_path):
    root, _, unblock = blocked_input
    out = tmp_path / "out"
    args = [*IMAGES, "--input", root, "--output", out, "--shard-size", 5, "--num-tasks", 2]
    task0 = start([*args, "--task-index", 0], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)                        # shards 0-1: not blocked
    task0.wait(120)
    task1 = start([*args, "--task-index", 1], stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)                        # shards 2-4: blocks
    try:
        wait_until(lambda: temporaries(out), what="task 1's temporary")
        again0 = subprocess.run([PYTHON, "-m", "shard_tools", "convert", *map(str, args),
                                 "--task-index", "0", "--no-progress"], cwd=REPO,
                                env=run_env(), capture_output=True, text=True)
        assert again0.returncode == 0, again0.stderr    # disjoint ranges: no conflict
    finally:
        task1.kill()                                   # dies holding its lock
        task1.wait()
    assert list(out.glob(".convert-lock-*"))
    unblock()
    again1 = subprocess.run([PYTHON, "-m", "shard_tools", "convert", *map(str, args),
                             "--task-index", "1", "--no-progress"], cwd=REPO, env=run_env(),
                            capture_output=True, text=True)
    assert again1.returncode == 0, again1.stderr
    assert "taking over the lock" in again1.stderr
    assert json.loads((out / "manifest.json").read_text())["totals"]["images"] == 24
    assert not list(out.glob(".convert-lock-*")) and temporaries(out) == []
