"""The encoder: backbone -> aggregator -> optional projection -> L2-normalised descriptor."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .aggregators import FeatureShape, create_aggregator
from .backbones import build_backbone
from .config import ModelConfig

__all__ = ["LocalizationModel", "build_model"]

_log = logging.getLogger(__name__)


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


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> LocalizationModel:
    """Build an encoder from a ``ModelConfig`` or a dict with the same keys (typos raise)."""
    config = ModelConfig.coerce(cfg)
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
    params = dict(config.aggregator)
    name = params.pop("name")
    aggregator = create_aggregator(name, features, **params)
    model = LocalizationModel(backbone, aggregator, config, config.projection_dim)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model.compile()  # in place: state-dict keys stay unchanged
    _log.info("built %s + %s -> %d-d descriptors (%s trainable parameters)", config.backbone, name,
              model.descriptor_dim, f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,}")
    return model
