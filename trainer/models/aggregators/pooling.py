"""Pooling aggregators: AVG, GeM, CosPlace (GeM + linear) and the bare CLS token."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_aggregator

__all__ = ["AvgPool", "GeMPool", "GeM", "CosPlace", "ClsToken", "gem"]


def gem(x: Tensor, p: Tensor, eps: float) -> Tensor:
    """Generalised mean over H, W in fp32 ([B, C, H, W] -> [B, C]); bf16 pow loses too much."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """Learnable-p GeM pooling without normalisation (CosPlace's inner block)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)


@register_aggregator("avg", inputs={"in_channels": "channels"})
class AvgPool(nn.Module):
    def __init__(self, in_channels: int | None = None) -> None:
        super().__init__()
        self.descriptor_dim = in_channels

    def forward(self, x: Tensor, cls: Tensor | None = None) -> Tensor:
        return F.normalize(x.float().mean(dim=(-2, -1)), p=2, dim=-1)


@register_aggregator("gem", inputs={"in_channels": "channels"})
class GeMPool(nn.Module):
    """GeM (p init 3, eps 1e-6) then L2; ``in_channels`` only records the descriptor size."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, in_channels: int | None = None) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps
        self.descriptor_dim = in_channels

    def forward(self, x: Tensor, cls: Tensor | None = None) -> Tensor:
        return F.normalize(gem(x, self.p, self.eps), p=2, dim=-1)


@register_aggregator("cosplace", inputs={"in_dim": "channels"})
class CosPlace(nn.Module):
    """L2 over channels -> GeM -> Linear(in_dim, out_dim) -> L2."""

    def __init__(self, in_dim: int, out_dim: int = 512) -> None:
        super().__init__()
        self.gem = GeM()
        self.fc = nn.Linear(in_dim, out_dim)
        self.descriptor_dim = out_dim

    def forward(self, x: Tensor, cls: Tensor | None = None) -> Tensor:
        x = self.gem(F.normalize(x, p=2, dim=1))
        return F.normalize(self.fc(x).float(), p=2, dim=-1)


@register_aggregator("cls", inputs={"in_channels": "channels"}, needs_cls_token=True)
class ClsToken(nn.Module):
    """The ViT CLS token alone (EarthLoc2's DINOv2 baselines without SALAD)."""

    def __init__(self, in_channels: int | None = None) -> None:
        super().__init__()
        self.descriptor_dim = in_channels

    def forward(self, x: Tensor, cls: Tensor | None = None) -> Tensor:
        if cls is None:
            raise ValueError("the 'cls' aggregator needs a CLS token")
        return F.normalize(cls.float(), p=2, dim=-1)
