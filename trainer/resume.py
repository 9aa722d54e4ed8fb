"""What a resumed run may change in its recipe, and what it may not.

A checkpoint holds the recipe it was trained with (``state.pt``'s ``recipe``). On
``--resume``, the new recipe is compared with it key by key (``section.key``; a
mapping such as ``model.aggregator`` is one key):

- **breaking** keys change what the saved state means or which batches come next, so
  the run would no longer continue the one it resumes: every ``model.*`` key (the
  weights' shapes and the forward pass) except those below, every ``loss.*`` key, every
  ``data.*`` key except those below (the batches, their order and the data seed;
  ``data.workers`` with the world size sets how the shards are split into streams),
  ``optim.optimizer`` (the optimizer state's structure), ``train.seed``,
  ``train.grad_accum`` (batches per update, so the position in the epoch),
  ``train.precision`` and ``train.freeze_bn_stats``, and the world size (the
  ``world_size`` of the checkpoint against this run's process count). They are refused,
  each named, unless ``--allow-recipe-change`` is given; then they are logged and recorded.
- **changeable** keys are applied for real from the update where the run resumes: the
  optimizer's hyper-parameters (``optim.lr``, ``weight_decay``, ``momentum``,
  ``nesterov``, ``betas``) are set on the restored optimizer, the schedule (``optim.
  schedule``, ``warmup_steps``, ``milestones``, ``gamma``, ``end_factor``,
  ``decay_steps``) is rebuilt over the new base lr at the restored update count, and the
  length (``train.epochs``, ``train.max_steps``), ``train.checkpoint_every``,
  ``keep_checkpoints``, ``clip_grad_norm``, ``eval.*`` and ``log.*`` take effect as read.
  Keys that do not touch the training state are also changeable: ``train.run_dir`` (a
  moved or copied folder), ``train.channels_last``, ``compile``, ``deterministic``,
  ``save_init``, ``model.pretrained`` (the weights come from the checkpoint),
  ``model.channels_last``, ``model.compile``, and the data loader's plumbing
  (``data.storage_options``, ``prefetch_factor``, ``persistent_workers``,
  ``pin_memory``, ``read_retries``, ``loader_timeout``).

Every resume, with or without changes, appends one JSON line to ``RUN/resumes.jsonl``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["RecipeChange", "compare_recipes", "flatten", "is_breaking", "WORLD_SIZE_KEY"]

WORLD_SIZE_KEY = "world size"

CHANGEABLE_SECTIONS = ("eval", "log")
CHANGEABLE_KEYS = frozenset({
    "optim.lr", "optim.weight_decay", "optim.momentum", "optim.nesterov", "optim.betas",
    "optim.schedule", "optim.warmup_steps", "optim.milestones", "optim.gamma",
    "optim.end_factor", "optim.decay_steps",
    "train.epochs", "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.clip_grad_norm", "train.run_dir", "train.channels_last", "train.compile",
    "train.deterministic", "train.save_init",
    "model.pretrained", "model.channels_last", "model.compile",
    "data.storage_options", "data.prefetch_factor", "data.persistent_workers",
    "data.pin_memory", "data.read_retries", "data.loader_timeout",
})


def is_breaking(key: str) -> bool:
    """True for a key whose change stops the run from continuing the one it resumes."""
    if key == WORLD_SIZE_KEY:
        return True
    return key.split(".", 1)[0] not in CHANGEABLE_SECTIONS and key not in CHANGEABLE_KEYS


def flatten(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``section.key`` -> value (nested mappings stay whole: one key each)."""
    out: dict[str, Any] = {}
    for section, values in recipe.items():
        if isinstance(values, Mapping):
            for k, v in values.items():
                out[f"{section}.{k}"] = v
        else:
            out[section] = values
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@dataclass
class RecipeChange:
    """The differences between a checkpoint's recipe and the one resuming it."""

    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)   # key -> (old, new)

    @property
    def breaking(self) -> list[str]:
        return [k for k in self.changed if is_breaking(k)]

    @property
    def changeable(self) -> list[str]:
        return [k for k in self.changed if not is_breaking(k)]

    def describe(self, keys: list[str] | None = None) -> str:
        """``key old -> new, ...`` for one-line messages."""
        keys = list(self.changed) if keys is None else keys
        return ", ".join(f"{k} {self.changed[k][0]!r} -> {self.changed[k][1]!r}" for k in keys)

    def to_record(self) -> dict[str, Any]:
        return {"changed": {k: [o, n] for k, (o, n) in self.changed.items()},
                "breaking": self.breaking}


def compare_recipes(saved: Mapping[str, Any] | None, current: Mapping[str, Any],
                    saved_world: int | None, world: int) -> RecipeChange:
    """Key-by-key differences (a checkpoint without a recipe compares only the world size).
    Keys present on one side only count as changed (``None`` on the other)."""
    change = RecipeChange()
    if saved is not None:
        old, new = flatten(saved), flatten(current)
        for key in sorted(set(old) | set(new)):
            if not _same(old.get(key), new.get(key)):
                change.changed[key] = (old.get(key), new.get(key))
    if saved_world is not None and int(saved_world) != int(world):
        change.changed[WORLD_SIZE_KEY] = (int(saved_world), int(world))
    return change
