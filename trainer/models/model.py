"""The encoder: backbone -> aggregator -> optional projection -> L2-normalised descriptor."""
from __future__ import annotations

import logging
import typing
from typing import Any, Callable, Iterable, Mapping, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .aggregators import FeatureShape, create_aggregator, get_aggregator_spec
from .backbones import build_backbone, canonical_backbone_name, check_input_size, check_pretrained
from .config import ModelConfig, check_keys, coerce_value, image_hw, type_name

__all__ = ["LocalizationModel", "build_model", "check_model", "aggregator_params"]

_log = logging.getLogger(__name__)
T = TypeVar("T")


class LocalizationModel(nn.Module):
    """Maps ``[B, 3, H, W]`` images to ``[B, descriptor_dim]`` unit-norm fp32 descriptors.

    Keeps its ``ModelConfig`` so that ``save_encoder`` can write it next to the weights.
    """

    def __init__(self, backbone: nn.Module, aggregator: nn.Module, config: ModelConfig,
                 projection_dim: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator
        agg_dim = int(aggregator.descriptor_dim)
        self.projection = nn.Linear(agg_dim, projection_dim) if projection_dim else None
        self.descriptor_dim = int(projection_dim or agg_dim)
        self.config = config
        self.channels_last = bool(config.channels_last)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_hw

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fmap, cls = self.backbone(x)
        desc = self.aggregator(fmap, cls)
        if self.projection is not None:
            desc = self.projection(desc)
        return F.normalize(desc.float(), p=2, dim=-1)


def aggregator_params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``{name, <params>}`` with each parameter name checked and each value of the type its
    constructor declares (a YAML ``1e-4`` becomes a float), so that a typo or ``p: abc``
    fails here in one line, not as a TypeError inside the aggregator."""
    params = dict(spec)
    name = params.pop("name")
    agg = get_aggregator_spec(name)
    check_keys(params, agg.params, f"aggregator '{agg.name}'")
    hints = typing.get_type_hints(agg.cls.__init__)
    out = {"name": name}
    for key, value in params.items():
        tp = hints.get(key, Any)
        ok, coerced = coerce_value(value, tp)
        if not ok:
            raise ValueError(f"model.aggregator.{key} must be {type_name(tp)}, got {value!r}")
        out[key] = coerced
    return out


def _assemble(config: ModelConfig) -> LocalizationModel:
    backbone = build_backbone(
        config.backbone,
        pretrained=config.pretrained,
        image_size=config.image_hw,
        layers_to_crop=config.layers_to_crop,
        layers_to_freeze=config.layers_to_freeze,
        unfreeze_last_blocks=config.unfreeze_last_blocks,
    )
    h, w = backbone.feature_hw(config.image_hw)
    features = FeatureShape(backbone.out_channels, h, w, backbone.has_cls_token)
    params = aggregator_params(config.aggregator)
    name = params.pop("name")
    aggregator = create_aggregator(name, features, **params)
    return LocalizationModel(backbone, aggregator, config, config.projection_dim)


def _named_error(key: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, any refusal raised again as one ValueError line starting with ``key``."""
    try:
        return fn(*args)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError, KeyError) as exc:
        text = str(exc).strip().splitlines()
        msg = text[0] if text else type(exc).__name__
        raise ValueError(msg if msg.startswith(key) else f"{key}: {msg}") from None


def _dry_forward(model: LocalizationModel, size: int | Iterable[int]) -> None:
    """A batch of two through the model (eval mode: BatchNorm takes a 1x1 map too)."""
    model.eval()(torch.empty(2, 3, *image_hw(size)))


def check_model(cfg: ModelConfig | Mapping[str, Any],
                input_sizes: Mapping[str, int | Iterable[int]] | None = None) -> ModelConfig:
    """Everything ``build_model`` and a forward pass would refuse, found before a run builds
    anything: the backbone name, ``pretrained`` (a missing file, an unknown tag), the
    aggregator's parameter names and types, and the architecture built and run on the
    ``meta`` device (no memory, no weights, no download) at ``model.image_size`` and at
    each of ``input_sizes`` (``{"eval.image_size": 322}``: DINOv2 needs multiples of 14).

    Returns the config with the aggregator's values coerced to their declared types;
    raises ``ValueError`` with one line that names the key."""
    config = ModelConfig.coerce(cfg)
    _named_error("model.backbone", canonical_backbone_name, config.backbone)
    _named_error("model.pretrained", check_pretrained, config.backbone, config.pretrained)
    config.aggregator = _named_error("model.aggregator", aggregator_params, config.aggregator)
    sizes = {"model.image_size": config.image_hw, **(input_sizes or {})}
    for key, size in sizes.items():
        _named_error(key, check_input_size, config.backbone, size)
    bare = config.replace(pretrained=None, compile=False, channels_last=False)
    with torch.device("meta"):
        model = _named_error("model", _assemble, bare)
        for key, size in sizes.items():
            _named_error(key, _dry_forward, model, size)
    return config


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> LocalizationModel:
    """Build an encoder from a ``ModelConfig`` or a dict with the same keys (typos raise)."""
    config = ModelConfig.coerce(cfg)
    model = _assemble(config)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model.compile()  # in place: state-dict keys stay unchanged
    _log.info("built %s + %s -> %d-d descriptors (%s trainable parameters)", config.backbone,
              config.aggregator["name"], model.descriptor_dim,
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    return model
