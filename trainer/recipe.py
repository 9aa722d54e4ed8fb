"""A training recipe: YAML sections mapped onto dataclasses, checked before any heavy work.

Sections: ``model`` (``trainer.models.ModelConfig``), ``loss``
(``trainer.losses.CriterionConfig``), ``data`` (``trainer.data.DataConfig``), and
``optim``, ``train``, ``eval``, ``log`` defined here. ``Recipe.load(path, overrides)``
reads a file, applies ``section.key=value`` overrides and validates every key,
type and combination, raising ``ConfigError`` with one line that names the key
(and the nearest valid one for a typo). ``Recipe.to_dict()`` is the resolved
config written to ``RUN/config.yaml``.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import apply_overrides, load_recipe
from .data import DataConfig
from .losses import CriterionConfig
from .models.config import (CheckedConfig, ModelConfig, check_keys, coerce_value, image_hw,
                            type_name)

__all__ = ["ConfigError", "OptimConfig", "TrainConfig", "EvalConfig", "LogConfig", "Recipe",
           "OPTIMIZERS", "SCHEDULES", "PRECISIONS"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "multistep", "cosine", "linear")
PRECISIONS = ("fp32", "bf16", "fp16")
PROTOCOLS = ("apl", "vpr")


class ConfigError(ValueError):
    """A recipe that cannot train: the message is one line naming the key."""


def _one_of(value: Any, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


@dataclass
class OptimConfig(CheckedConfig):
    """Optimizer and learning-rate schedule, stepped once per optimizer update.

    - ``optimizer``: adam, adamw or sgd (``momentum``, ``nesterov``); ``betas`` for Adam(W);
    - ``schedule``: after ``warmup_steps`` of linear warm-up, ``constant``; ``multistep``
      (multiply by ``gamma`` at each of ``milestones``, in epochs); ``cosine`` or ``linear``
      decay to ``end_factor`` x lr over ``decay_steps`` updates (null: to the end of training).
    """

    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "constant"
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    end_factor: float = 0.0
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        _one_of(self.optimizer, OPTIMIZERS, "optim.optimizer")
        _one_of(self.schedule, SCHEDULES, "optim.schedule")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.optimizer == "sgd" and self.nesterov and self.momentum <= 0:
            raise ConfigError("optim.nesterov needs optim.momentum > 0")
        if self.gamma <= 0:
            raise ConfigError(f"optim.gamma must be > 0, got {self.gamma}")
        if self.schedule == "multistep" and not self.milestones:
            raise ConfigError("optim.schedule multistep needs optim.milestones (epochs)")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"optim.milestones must be increasing, got {self.milestones}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"optim.decay_steps must be >= 1 or null, got {self.decay_steps}")
        if not 0.0 <= self.end_factor <= 1.0:
            raise ConfigError(f"optim.end_factor must be in [0, 1], got {self.end_factor}")


@dataclass
class TrainConfig(CheckedConfig):
    """The loop: run folder, length, precision, checkpoints.

    - ``run_dir``: local folder or ``s3://...`` (null: ``runs/<recipe name>``);
    - ``epochs`` of ``data.steps_per_epoch`` batches; ``grad_accum`` batches per optimizer
      update; ``max_steps`` stops early after that many updates (smoke tests);
    - ``precision``: fp32, bf16 (autocast) or fp16 (autocast + GradScaler); on a machine
      without a GPU fp16 falls back to fp32;
    - ``clip_grad_norm``: max L2 norm of the gradients (null: no clipping);
    - ``channels_last`` / ``compile`` (torch.compile);
    - ``freeze_bn_stats``: BatchNorm layers whose parameters are frozen stay in eval mode
      (false: the upstream behaviour, their running statistics keep updating);
    - ``checkpoint_every``: optimizer updates between checkpoints (null: epoch ends only);
      ``keep_checkpoints``: how many to keep;
    - ``save_init``: also write the starting encoder to ``RUN/init`` (a fresh run only), the
      baseline that ``python -m retrieval evaluate --model RUN/init`` compares against.
    """

    run_dir: str | None = None
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    precision: str = "fp32"
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    channels_last: bool = False
    compile: bool = False
    freeze_bn_stats: bool = True
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    deterministic: bool = False
    save_init: bool = False

    def __post_init__(self) -> None:
        _one_of(self.precision, PRECISIONS, "train.precision")
        for name in ("epochs", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "max_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"train.{name} must be >= 1 or null, got {v}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"train.clip_grad_norm must be > 0 or null, got {self.clip_grad_norm}")


_METRIC = re.compile(r"^R@(\d+)$")


@dataclass
class EvalConfig(CheckedConfig):
    """Validation recall@K through ``retrieval``, every epoch or every ``every_steps`` updates.

    - ``database_shards`` / ``query_shards``: image-shard sets (null: no validation);
    - ``protocol``: apl (footprint intersection, per region) or vpr (within ``radius_m``);
    - ``regions``: APL regions (``earthloc-val``, ``name:lat,lon,q_km,db_km``) or null for
      the whole set; ``year``: the APL database year (null: every year);
    - ``rotations``: database rotations (EarthLoc: 0/90/180/270; queries at 0);
    - ``metric``: ``R@K`` that selects ``RUN/best`` (``dedupe``: each tile's best rotation);
    - ``image_size``: null uses the model's (SALAD: train 224, evaluate 322).
    """

    database_shards: str | None = None
    query_shards: str | None = None
    protocol: str = "apl"
    regions: list[str] | None = None
    year: int | None = 2021
    rotations: list[int] = field(default_factory=lambda: [0])
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 100])
    metric: str = "R@5"
    dedupe: bool = False
    every_steps: int | None = None
    at_start: bool = False
    batch_size: int = 64
    image_size: int | list[int] | None = None
    workers: int = 2
    radius_m: float = 25.0
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of(self.protocol, PROTOCOLS, "eval.protocol")
        if bool(self.database_shards) != bool(self.query_shards):
            raise ConfigError("eval.database_shards and eval.query_shards go together")
        if not self.ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1
                              for k in self.ks):
            raise ConfigError(f"eval.ks must be integers >= 1, got {self.ks}")
        m = _METRIC.match(str(self.metric))
        if not m:
            raise ConfigError(f"eval.metric must look like R@5, got {self.metric!r}")
        if int(m.group(1)) not in self.ks:
            raise ConfigError(f"eval.metric {self.metric} needs {m.group(1)} in eval.ks {self.ks}")
        if self.regions and self.protocol != "apl":
            raise ConfigError("eval.regions apply to protocol apl only")
        if self.regions:
            from shard_tools.regions import resolve_regions

            try:   # a typo fails here, not after the first epoch
                resolve_regions(self.regions)
            except ValueError as exc:
                raise ConfigError(f"eval.regions: {exc}") from None
        bad = [r for r in self.rotations if r not in (0, 90, 180, 270)]
        if bad or not self.rotations:
            raise ConfigError(f"eval.rotations must be multiples of 90 in [0, 360), got {self.rotations}")
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(f"eval.every_steps must be >= 1 or null, got {self.every_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.image_size is not None:
            try:
                self.image_size = list(image_hw(self.image_size))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"eval.image_size: {exc}") from None

    @property
    def enabled(self) -> bool:
        return bool(self.database_shards and self.query_shards)

    @property
    def metric_k(self) -> int:
        return int(_METRIC.match(self.metric).group(1))


@dataclass
class LogConfig(CheckedConfig):
    """TensorBoard and the console.

    - ``every_steps``: updates between scalar logs (averages over the window);
    - ``tensorboard``: write event files to ``RUN/tensorboard`` (for an ``s3://`` run,
      written under ``local_dir`` and copied up at every checkpoint);
    - ``image_grid``: one batch as an image grid at the start; ``progress``: the tqdm bar.
    """

    every_steps: int = 10
    tensorboard: bool = True
    image_grid: bool = True
    progress: bool = True
    local_dir: str | None = None

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"log.every_steps must be >= 1, got {self.every_steps}")


# ---------------------------------------------------------------- type checks

_SECTIONS: dict[str, type] = {"model": ModelConfig, "loss": CriterionConfig, "data": DataConfig,
                              "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig,
                              "log": LogConfig}
_NAME_SHORTHAND = {("model", "aggregator"), ("loss", "loss"), ("loss", "miner")}


def _checked(section: str, cls: type, data: Any) -> dict[str, Any]:
    """Keys and types of one section, before its dataclass sees it."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"section '{section}' must be a mapping of keys, got {data!r}")
    try:
        check_keys(data.keys(), cls.field_names(), f"section '{section}'")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        tp = hints[key]
        if (section, key) in _NAME_SHORTHAND and isinstance(value, str):
            out[key] = value
            continue
        ok, value = coerce_value(value, tp)
        if not ok:
            raise ConfigError(f"{section}.{key} must be {type_name(tp)}, got {data[key]!r}")
        out[key] = value
    return out


def _build(section: str, cls: type[CheckedConfig], data: Mapping[str, Any]):
    try:
        return cls.from_dict(data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(msg if msg.startswith(f"{section}.") else f"{section}: {msg}") from None


@dataclass
class Recipe:
    """One experiment: every section, validated together."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: CriterionConfig = field(default_factory=CriterionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    name: str = "run"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "run") -> "Recipe":
        if not isinstance(data, Mapping):
            raise ConfigError("a recipe is a mapping of sections")
        try:
            check_keys(data.keys(), list(_SECTIONS), "the recipe (sections)")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        built = {s: _build(s, c, _checked(s, c, data.get(s))) for s, c in _SECTIONS.items()}
        recipe = cls(**built, name=name)
        recipe.check()
        return recipe

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> "Recipe":
        """A recipe file plus ``section.key=value`` overrides, validated."""
        try:
            raw = apply_overrides(load_recipe(path), overrides)
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls.from_dict(raw, name=Path(path).stem)

    def check(self) -> None:
        """Combinations that no single section can see, and every check a run makes before
        it builds: the model (built and run on the meta device, so ``--check`` refuses
        what a run would) and the criterion."""
        if self.loss.query_aware and not self.data.mine_queries:
            raise ConfigError("loss.query_aware needs data.mine_queries: true (no batch would "
                              "hold a mined query)")
        from .losses import build_criterion
        from .models.model import check_model

        sizes = {"eval.image_size": self.eval.image_size} if self.eval.image_size else {}
        try:
            self.model = check_model(self.model, sizes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            build_criterion(self.loss)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"loss: {str(exc).splitlines()[0]}") from None

    def require_training_data(self) -> None:
        if not self.data.train_shards:
            raise ConfigError("data.train_shards is not set (add data.train_shards=PATH or "
                              "s3://bucket/places to the command line)")

    @property
    def run_dir(self) -> str:
        return self.train.run_dir or str(Path("runs") / self.name)

    @property
    def eval_image_size(self) -> tuple[int, int]:
        return image_hw(self.eval.image_size) if self.eval.image_size else self.model.image_hw

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (plain YAML types), as saved to ``RUN/config.yaml``."""
        out = {"model": self.model.to_dict(), "loss": dataclasses.asdict(self.loss),
               "data": self.data.to_dict()}
        for s in ("optim", "train", "eval", "log"):
            out[s] = dataclasses.asdict(getattr(self, s))
        out["train"]["run_dir"] = self.run_dir
        return out

    def to_yaml(self) -> str:
        import yaml

        class Dumper(yaml.SafeDumper):
            pass

        Dumper.add_representer(list, lambda d, v: d.represent_sequence(
            "tag:yaml.org,2002:seq", v, flow_style=True))
        Dumper.add_representer(dict, lambda d, v: d.represent_mapping(
            "tag:yaml.org,2002:map", v, flow_style=False))
        return yaml.dump(self.to_dict(), Dumper=Dumper, sort_keys=False, width=100)

    def flat(self) -> dict[str, Any]:
        """``section.key`` -> scalar (lists and mappings as text): TensorBoard hparams."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for k, v in values.items():
                if isinstance(v, (bool, int, float, str)):
                    out[f"{section}.{k}"] = v
                else:
                    out[f"{section}.{k}"] = "null" if v is None else str(v)
        return out
