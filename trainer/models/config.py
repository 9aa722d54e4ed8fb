"""Model configuration: one dataclass, validated so that a typo fails loudly."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Union

__all__ = ["CheckedConfig", "ModelConfig", "check_keys", "image_hw", "coerce_value", "type_name"]


def check_keys(given: Iterable[str], valid: Iterable[str], where: str) -> None:
    """Raise a one-line ValueError for the first unknown key, suggesting the closest valid one.

    Configs come from YAML and the command line, where a misspelt key would otherwise be
    silently ignored and a run would train with a default nobody asked for.
    """
    valid = sorted(valid)
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ValueError(f"unknown key '{key}' in {where}{hint}")


class CheckedConfig:
    """Base of the config dataclasses: built from a mapping whose keys are checked, so a
    typo in YAML or an override names the nearest valid key instead of being ignored."""

    CONFIG_NAME: ClassVar[str] = "config"   # how errors name the section

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        check_keys(data.keys(), cls.field_names(), cls.CONFIG_NAME)
        return cls(**dict(data))

    @classmethod
    def coerce(cls, cfg: Any):
        """A copy of a config of this class, or one built from a mapping."""
        if isinstance(cfg, cls):
            return dataclasses.replace(cfg)
        if isinstance(cfg, Mapping):
            return cls.from_dict(cfg)
        raise TypeError(f"expected a {cls.__name__} or a mapping, got {type(cfg).__name__}")

    def replace(self, **changes: Any):
        check_keys(changes.keys(), self.field_names(), self.CONFIG_NAME)
        return dataclasses.replace(self, **changes)


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return {list: "list", tuple: "list", dict: "mapping"}.get(origin, str(origin))
    return getattr(tp, "__name__", str(tp)).replace("str", "string")


def coerce_value(value: Any, tp: Any) -> tuple[bool, Any]:
    """(matches, value) of a YAML value against a type hint: ints are floats, a YAML
    ``1e-4`` (a string) is a float; shared by the recipe's sections and the aggregator's
    keyword parameters."""
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        for a in args:     # exact matches first: 3 stays an int in ``int | float``
            ok, v = coerce_value(value, a)
            if ok and (not isinstance(value, str) or a is str):
                return True, v
        for a in args:
            ok, v = coerce_value(value, a)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False, value
            pairs = list(zip(value, args))
        else:
            elem = args[0] if args else Any
            pairs = [(v, elem) for v in value]
        out = []
        for v, a in pairs:
            ok, v = coerce_value(v, a)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict or tp is dict or origin is Mapping:
        return isinstance(value, Mapping), value
    return True, value


def image_hw(size: int | Iterable[int]) -> tuple[int, int]:
    """Normalise an image size given as an int or [H, W] to (H, W)."""
    if isinstance(size, bool):
        raise ValueError(f"image_size must be an int or [H, W], got {size!r}")
    values = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    if len(values) != 2:
        raise ValueError(f"image_size must be an int or [H, W], got {size!r}")
    if min(values) < 1:
        raise ValueError(f"image_size must be positive, got {size!r}")
    return values  # type: ignore[return-value]


@dataclass
class ModelConfig(CheckedConfig):
    """Everything needed to rebuild an encoder; saved next to its weights.

    - ``backbone``: resnet18/34/50/101 or dinov2_small/base/large (timm
      ``vit_*_patch14_reg4_dinov2`` names are accepted too).
    - ``pretrained``: None/False (random init), True (ImageNet for ResNet, LVD-142M for
      DINOv2), a hub name/tag, or a local ``.pth``/``.safetensors`` file.
    - ``layers_to_crop`` / ``layers_to_freeze``: ResNet only (``-1`` freezes nothing,
      ``0`` conv1/bn1, ``n`` conv1/bn1 and layer1..n).
    - ``unfreeze_last_blocks``: DINOv2 only; the last N blocks and the final norm train
      (``-1``: the whole backbone trains).
    - ``aggregator``: ``{name: ..., <keyword params>}``; input-side params may be omitted.
    - ``projection_dim``: optional Linear after the aggregator (EarthLoc's 4096 -> 4096).
    """

    CONFIG_NAME = "model config"

    backbone: str = "resnet50"
    pretrained: bool | str | None = None
    image_size: int | tuple[int, int] = 320
    layers_to_crop: list[int] = field(default_factory=list)
    layers_to_freeze: int = -1
    unfreeze_last_blocks: int = 1
    aggregator: dict[str, Any] = field(default_factory=lambda: {"name": "gem"})
    projection_dim: int | None = None
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.aggregator, str):
            self.aggregator = {"name": self.aggregator}
        if not isinstance(self.aggregator, Mapping) or "name" not in self.aggregator:
            raise ValueError("model.aggregator must be a mapping with a 'name' key")
        self.aggregator = dict(self.aggregator)
        self.image_size = image_hw(self.image_size)
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"model.projection_dim must be >= 1 or null, got {self.projection_dim}")
        self.layers_to_crop = sorted(int(v) for v in (self.layers_to_crop or []))

    @property
    def image_hw(self) -> tuple[int, int]:
        return image_hw(self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["image_size"] = list(self.image_hw)
        return out
