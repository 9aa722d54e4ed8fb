"""Saved encoders: a directory with ``model.safetensors`` (weights) and ``config.json``.

``config.json`` holds ``{"format": "streamloc-encoder", "version": 1, "model": <ModelConfig>,
"descriptor_dim": D, "image_size": [H, W], "extra": {...}}``. The saved ``ModelConfig`` has
``pretrained: null`` so loading never reaches for a hub.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from shard_tools.cli import error_line

from .config import ModelConfig
from .model import LocalizationModel, build_model
from .weights import load_checked

__all__ = ["save_encoder", "load_encoder", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION"]

_log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "streamloc-encoder"
FORMAT_VERSION = 1


def _unwrap(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        for attr in ("_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def save_encoder(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write weights and config into directory ``path`` (created); returns the directory."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    if not isinstance(model, LocalizationModel):
        raise TypeError(f"save_encoder expects a model from build_model, got {type(model).__name__}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.replace(pretrained=None, compile=False)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": config.to_dict(),
        "descriptor_dim": model.descriptor_dim,
        "image_size": list(config.image_hw),
        "extra": dict(extra or {}),
    }
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp_w, tmp_c = out / f".{WEIGHTS_NAME}.tmp", out / f".{CONFIG_NAME}.tmp"
    save_file(state, str(tmp_w), metadata={"format": FORMAT})
    tmp_c.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_w, out / WEIGHTS_NAME)
    os.replace(tmp_c, out / CONFIG_NAME)
    _log.info("saved encoder (%d-d) to %s", model.descriptor_dim, out)
    return out


def _read_config(cfg_path: Path) -> ModelConfig:
    """The ``ModelConfig`` of a saved encoder; every way ``config.json`` can be wrong is a
    ValueError naming the file, since the folder may hold several candidates."""
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, found {type(meta).__name__}")
    version = meta.get("version", 0)
    if meta.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: unsupported encoder format {meta.get('format')!r} v{version}")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{cfg_path}: no 'model' object (the encoder's ModelConfig)")
    try:
        return ModelConfig.from_dict(meta["model"]).replace(pretrained=None, compile=False)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{cfg_path}: {error_line(exc)}") from None


def load_encoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", compile: bool = False
) -> tuple[LocalizationModel, tuple[int, int], int]:
    """Rebuild a saved encoder in eval mode: returns ``(model, (H, W), descriptor_dim)``."""
    from safetensors.torch import load_file

    root = Path(path)
    if root.is_file():
        root = root.parent
    cfg_path, w_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"not a saved encoder (needs {CONFIG_NAME} and {WEIGHTS_NAME}): {root}")
    config = _read_config(cfg_path)
    model = build_model(config)
    try:
        state = load_file(str(w_path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{w_path}: not a readable safetensors file ({error_line(exc)})") from None
    load_checked(model, state, "the saved config", str(w_path))
    model = model.to(device).eval()
    if compile:
        model.compile()
    return model, config.image_hw, model.descriptor_dim
