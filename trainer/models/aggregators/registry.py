"""Aggregator registry: names to classes, keyword-only options, inputs derived from the backbone.

Published configs name only the aggregator's own options; what depends on the backbone
(channels, feature-map size) is filled in here, and checked when it is given explicitly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from torch import nn

from ..config import check_keys

__all__ = [
    "AggregatorSpec",
    "FeatureShape",
    "register_aggregator",
    "create_aggregator",
    "list_aggregators",
    "get_aggregator_spec",
]

M = TypeVar("M", bound=type[nn.Module])


@dataclass(frozen=True)
class FeatureShape:
    """What a backbone hands an aggregator: channels, map size, whether a CLS token exists."""

    channels: int | None = None
    height: int | None = None
    width: int | None = None
    has_cls_token: bool = False


@dataclass(frozen=True)
class AggregatorSpec:
    name: str
    cls: type[nn.Module]
    inputs: Mapping[str, str] = field(default_factory=dict)  # param -> FeatureShape attribute
    needs_cls_token: bool = False

    @property
    def params(self) -> dict[str, inspect.Parameter]:
        sig = inspect.signature(self.cls.__init__)
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return {k: p for k, p in sig.parameters.items() if k != "self" and p.kind in kinds}


_REGISTRY: dict[str, AggregatorSpec] = {}


def register_aggregator(
    name: str, *, inputs: Mapping[str, str] | None = None, needs_cls_token: bool = False
) -> Callable[[M], M]:
    """Class decorator: register under ``name``; ``inputs`` maps params to backbone facts."""

    def wrap(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"aggregator '{name}' registered twice")
        _REGISTRY[name] = AggregatorSpec(name, cls, dict(inputs or {}), needs_cls_token)
        return cls

    return wrap


def list_aggregators() -> list[str]:
    return sorted(_REGISTRY)


def get_aggregator_spec(name: str) -> AggregatorSpec:
    key = str(name).lower()
    if key not in _REGISTRY:
        check_keys([key], _REGISTRY, "aggregator names")
    return _REGISTRY[key]


def create_aggregator(name: str, features: FeatureShape | None = None, **params: Any) -> nn.Module:
    """Instantiate an aggregator; input-side params default to ``features`` and must agree with it."""
    spec = get_aggregator_spec(name)
    accepted = spec.params
    check_keys(params, accepted, f"aggregator '{spec.name}'")
    if spec.needs_cls_token and features is not None and not features.has_cls_token:
        raise ValueError(f"aggregator '{spec.name}' needs a CLS token; use a DINOv2 backbone")
    kwargs = dict(params)
    for param, attr in spec.inputs.items():
        derived = getattr(features, attr) if features is not None else None
        if derived is None:
            continue
        if param in kwargs and kwargs[param] is not None and int(kwargs[param]) != int(derived):
            raise ValueError(
                f"aggregator '{spec.name}': {param}={kwargs[param]} but the backbone gives {attr}={derived}"
            )
        kwargs[param] = derived
    missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(f"aggregator '{spec.name}' needs {', '.join(missing)}")
    return spec.cls(**kwargs)
