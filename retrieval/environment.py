"""The software and hardware a result was computed in, recorded beside the result.

Trained weights move with the library versions and the CPU kernels torch dispatches to
(AVX2 vs AVX-512 reductions round differently), so a figure without its environment
cannot be reproduced or compared. Every report (the trainer's ``summary.json``,
``retrieval evaluate``'s JSON, the demo's ``report.md``) carries ``environment()``.
Values are read from the running process, never from what pip says is installed.
"""
from __future__ import annotations

import importlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["environment", "environment_lines", "PACKAGES"]

# import name -> the name a reader knows it by
PACKAGES: dict[str, str] = {
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "faiss": "faiss",
    "numpy": "numpy", "cv2": "opencv", "webdataset": "webdataset", "accelerate": "accelerate",
}

_REPO = Path(__file__).resolve().parent.parent


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a missing or broken package is recorded as absent
        return None
    return str(getattr(mod, "__version__", None) or getattr(mod, "VERSION", None) or "unknown")


def _project_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("streamloc")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return None


def git_commit(repo: Path = _REPO) -> str | None:
    """``<sha>`` of the checkout the code runs from (``<sha>-dirty`` with local changes),
    or None outside a git checkout."""
    if not (repo / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def _torch_runtime() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {}
    out: dict[str, Any] = {"cpu_capability": None, "threads": torch.get_num_threads(),
                           "cuda": torch.version.cuda, "gpus": []}
    try:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch: no such query
        pass
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


def environment(seed: int | None = None) -> dict[str, Any]:
    """Versions, CPU kernels, threads, GPUs, the project's version and commit, and ``seed``."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": {name: _version(module) for module, name in PACKAGES.items()},
        **_torch_runtime(),
        "machine": platform.machine(),
        "streamloc": _project_version(),
        "git_commit": git_commit(),
        "seed": seed,
    }
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS"):
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


def environment_lines(env: dict[str, Any]) -> list[str]:
    """A short human-readable form, for the end of a report."""
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    gpus = ", ".join(env.get("gpus") or []) or "none"
    lines = [
        f"- Python {env.get('python')}; {versions}",
        f"- CPU kernels {env.get('cpu_capability')} ({env.get('machine')}), "
        f"{env.get('threads')} thread{'' if env.get('threads') == 1 else 's'}; GPU {gpus}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") and env.get("gpus") else ""),
        f"- streamloc {env.get('streamloc')}, commit {env.get('git_commit') or 'unknown'}"
        + (f", seed {env['seed']}" if env.get("seed") is not None else ""),
    ]
    forced = [f"{v}={env[v]}" for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
              if env.get(v)]
    if forced:
        lines[1] += f" ({', '.join(forced)})"
    return lines
