"""Helpers shared by the retrieval tests (imported as ``tests.retrieval.helpers``)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from conftest import PYTHON, REPO, run_env

TINY_MODEL = {"backbone": "resnet18", "image_size": 32, "aggregator": {"name": "gem"},
              "projection_dim": 16}


def tiny_encoder(seed: int = 0):
    from trainer.models import build_model

    torch.manual_seed(seed)
    return build_model(TINY_MODEL).eval()


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run_cli(*args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "retrieval", *map(str, args)], capture_output=True,
                          text=True, env=env or run_env(), cwd=cwd or REPO, timeout=timeout)


def convert(src: Path, dst: Path, fmt: str = "earthloc", shard_size: int = 4,
            kind: str = "images") -> Path:
    proc = subprocess.run([PYTHON, "-m", "shard_tools", "convert", "--format", fmt, "--kind",
                           kind, "--input", str(src), "--output", str(dst), "--shard-size",
                           str(shard_size), "--no-progress"], capture_output=True, text=True,
                          env=run_env())
    assert proc.returncode == 0, proc.stderr
    return dst


def has_bluemarble() -> bool:
    try:
        from shard_tools.bluemarble import find_bluemarble

        find_bluemarble()
        return True
    except FileNotFoundError:
        return False


def reconvert_with_other_images(shards: Path, seed0: int = 500) -> Path:
    """Convert the same EarthLoc tiles from other pixels into ``shards`` again: the same
    shard names and count, other content (and manifest sha256s)."""
    import shutil

    from conftest import TEST_TILES, make_earthloc_tree

    src = shards.parent / f"{shards.name}-src-{seed0}"
    make_earthloc_tree(src, TEST_TILES, seed0=seed0)
    shutil.rmtree(shards)
    return convert(src, shards, shard_size=4)


def copy_shards(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def launch_two_ranks(command: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m retrieval COMMAND ARGS`` as 2 real processes (accelerate, gloo on the CPU)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(run_env(), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(Path(PYTHON).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(port), "-m", "retrieval", command, *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def assert_one_error_line_and_no_traceback(proc: subprocess.CompletedProcess, needle: str) -> None:
    """A failing multi-rank command: exit != 0, one ``error:`` line naming ``needle``, none of
    our frames and no gloo report."""
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    ours = [ln for ln in proc.stderr.splitlines() if "retrieval" in ln and "File " in ln]
    assert not ours and "gloo" not in proc.stderr.lower(), proc.stderr[-3000:]
