"""MixVPR: MLP token mixing over the flattened feature map, then channel and row projections."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_aggregator

__all__ = ["FeatureMixerLayer", "MixVPR"]


class FeatureMixerLayer(nn.Module):
    """Residual MLP over the H*W axis: x + Linear(ReLU(Linear(LayerNorm(x))))."""

    def __init__(self, in_dim: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        hidden = int(in_dim * mlp_ratio)
        self.mix = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim)
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mix(x)


@register_aggregator("mixvpr", inputs={"in_channels": "channels", "in_h": "height", "in_w": "width"})
class MixVPR(nn.Module):
    """Needs the exact feature-map size it was built for (the mixer is a Linear over H*W)."""

    def __init__(
        self,
        in_channels: int = 1024,
        in_h: int = 20,
        in_w: int = 20,
        out_channels: int = 512,
        mix_depth: int = 1,
        mlp_ratio: float = 1.0,
        out_rows: int = 4,
    ) -> None:
        super().__init__()
        hw = in_h * in_w
        self.in_hw = (in_h, in_w)
        self.mix = nn.Sequential(*[FeatureMixerLayer(hw, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(hw, out_rows)
        self.descriptor_dim = out_channels * out_rows

    def forward(self, x: Tensor, cls: Tensor | None = None) -> Tensor:
        if tuple(x.shape[-2:]) != self.in_hw:
            raise ValueError(f"MixVPR was built for a {self.in_hw} feature map, got {tuple(x.shape[-2:])}")
        x = self.mix(x.flatten(2))                      # [B, C, HW]
        x = self.channel_proj(x.transpose(1, 2))        # [B, HW, out_channels]
        x = self.row_proj(x.transpose(1, 2))            # [B, out_channels, out_rows]
        return F.normalize(x.flatten(1).float(), p=2, dim=-1)
