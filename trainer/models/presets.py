"""Named model configs that reproduce the published architectures.

Presets ask for pretrained weights (ImageNet / LVD-142M) as the papers did; pass
``pretrained=None`` (or a local file) to ``model_preset`` when offline.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from .config import ModelConfig, check_keys

__all__ = ["PRESETS", "model_preset", "list_presets"]


def _salad(clusters: int, token_dim: int) -> dict[str, Any]:
    return {"name": "salad", "num_clusters": clusters, "cluster_dim": 64, "token_dim": token_dim, "dropout": 0.3}


_PRESETS: dict[str, dict[str, Any]] = {
    # EarthLoc (CVPR 2024): R50 without layer4, conv1..layer2 frozen, MixVPR 1024x4, Linear 4096.
    "earthloc": dict(
        backbone="resnet50", pretrained=True, image_size=320, layers_to_crop=[4], layers_to_freeze=2,
        aggregator={"name": "mixvpr", "out_channels": 1024, "mix_depth": 4, "mlp_ratio": 1, "out_rows": 4},
        projection_dim=4096,
    ),
    # EarthLoc2: DINOv2 with registers at 518 px, last block + final norm trainable.
    "earthloc2-dinov2-s-salad": dict(backbone="dinov2_small", pretrained=True, image_size=518,
                                     unfreeze_last_blocks=1, aggregator=_salad(24, 512)),
    "earthloc2-dinov2-b-salad": dict(backbone="dinov2_base", pretrained=True, image_size=518,
                                     unfreeze_last_blocks=1, aggregator=_salad(32, 1024)),
    "earthloc2-dinov2-l-salad": dict(backbone="dinov2_large", pretrained=True, image_size=518,
                                     unfreeze_last_blocks=1, aggregator=_salad(48, 1024)),
    # EarthLoc2 baselines without SALAD: the CLS token (384 / 768 / 1024).
    "earthloc2-dinov2-s": dict(backbone="dinov2_small", pretrained=True, image_size=518,
                               unfreeze_last_blocks=1, aggregator={"name": "cls"}),
    "earthloc2-dinov2-b": dict(backbone="dinov2_base", pretrained=True, image_size=518,
                               unfreeze_last_blocks=1, aggregator={"name": "cls"}),
    "earthloc2-dinov2-l": dict(backbone="dinov2_large", pretrained=True, image_size=518,
                               unfreeze_last_blocks=1, aggregator={"name": "cls"}),
    # GSV-Cities: ConvAP on the full R50 (2048 -> 1024, 2x2) and MixVPR on R50 without layer4.
    "gsv-convap-r50": dict(
        backbone="resnet50", pretrained=True, image_size=320, layers_to_freeze=2,
        aggregator={"name": "convap", "out_channels": 1024, "s1": 2, "s2": 2},
    ),
    "gsv-mixvpr-r50": dict(
        backbone="resnet50", pretrained=True, image_size=320, layers_to_crop=[4], layers_to_freeze=2,
        aggregator={"name": "mixvpr", "out_channels": 1024, "mix_depth": 4, "mlp_ratio": 1, "out_rows": 4},
    ),
    # The GSV-Cities losses/miners/aggregators seed: R18 without layer4 (256 ch) + CosPlace 512.
    "r18-cosplace512": dict(
        backbone="resnet18", pretrained=True, image_size=320, layers_to_crop=[4], layers_to_freeze=-1,
        aggregator={"name": "cosplace", "out_dim": 512},
    ),
}
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(_PRESETS)


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A fresh ``ModelConfig`` for preset ``name``; keyword overrides replace whole fields."""
    check_keys([name], _PRESETS, "model presets")
    data = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in _PRESETS[name].items()}
    data.update(overrides)
    return ModelConfig.from_dict(data)
