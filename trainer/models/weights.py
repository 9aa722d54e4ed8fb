"""Reading backbone weights from local files or hubs, with one-line errors.

Training nodes are often offline, so a local file is a first-class source and every
failure (missing file, failed download, keys that do not fit) says what to do next.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch

__all__ = [
    "WEIGHT_SUFFIXES",
    "is_weights_file",
    "read_state_dict",
    "strip_common_prefix",
    "fetch_or_fail",
    "describe_mismatch",
    "load_checked",
    "select_prefix",
]


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.")
T = TypeVar("T")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def is_weights_file(value: Any) -> bool:
    """A `pretrained` string names a file when it has a weights suffix or a path separator."""
    if not isinstance(value, (str, os.PathLike)):
        return False
    text = os.fspath(value)
    if text.startswith("hf-hub:"):
        return False
    return text.lower().endswith(WEIGHT_SUFFIXES) or os.sep in text or Path(text).exists()


def strip_common_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DDP `module.`, compile `_orig_mod.`, `model.`...) shared by all keys."""
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def select_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keep only `prefix.*` keys (stripped) when some keys carry it, e.g. a whole encoder's file."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a `.safetensors` or torch-pickled state dict (weights only), unwrapping checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format
        raise ValueError(f"cannot read weights file {path}: {_one_line(exc)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return strip_common_prefix(state)


def fetch_or_fail(what: str, fetch: Callable[[], T]) -> T:
    """Run a hub download; turn any failure into one actionable line."""
    try:
        return fetch()
    except Exception as exc:
        raise RuntimeError(
            f"could not fetch pretrained weights for {what} ({_one_line(exc)}); "
            "when offline pass a local .pth/.safetensors file as `pretrained`, or pretrained: null"
        ) from None


def describe_mismatch(name: str, missing: list[str], unexpected: list[str], wrong: list[str] = ()) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} keys with other shapes (e.g. {', '.join(wrong[:3])})")
    return f"weights do not fit {name}: " + "; ".join(parts)


def load_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    """Strict load that reports missing, unexpected and mis-shaped keys on one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: " + describe_mismatch(name, missing, unexpected, wrong))
    module.load_state_dict(state, strict=True)
