"""Optimizers by name and learning-rate schedules stepped once per optimizer update.

A schedule is a multiplier of the base lr: linear warm-up over ``warmup_steps``
updates (``(s + 1) / warmup``, as GSV-Cities), times the decay: ``multistep``
(``gamma`` at each milestone epoch), ``cosine`` or ``linear`` down to
``end_factor`` over ``decay_steps`` updates after the warm-up, then flat.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from .recipe import OptimConfig

__all__ = ["build_optimizer", "lr_factor", "build_scheduler", "trainable_parameters"]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that train: frozen parts (``requires_grad`` False) never reach the optimizer."""
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("the model has no trainable parameter (everything is frozen)")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(cfg: OptimConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of the base lr at update ``s`` (0-based)."""
    warmup = int(cfg.warmup_steps)
    decay = int(cfg.decay_steps or max(1, total_steps - warmup))
    bounds = [int(m) * int(steps_per_epoch) for m in cfg.milestones]

    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if cfg.schedule == "multistep":
            f *= cfg.gamma ** sum(step >= b for b in bounds)
        elif cfg.schedule in ("cosine", "linear"):
            t = min(1.0, max(0, step - warmup) / decay)
            shape = 0.5 * (1.0 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1.0 - t
            f *= cfg.end_factor + (1.0 - cfg.end_factor) * shape
        return f

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_factor``; its state (the update count) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, total_steps, steps_per_epoch))
