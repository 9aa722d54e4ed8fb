"""ConvAP: 1x1 channel reduction, then adaptive average pooling to an s1 x s2 grid."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_aggregator

__all__ = ["ConvAP"]


@register_aggregator("convap", inputs={"in_channels": "channels"})
class ConvAP(nn.Module):
    def __init__(self, in_channels: int = 2048, out_channels: int = 512, s1: int = 2, s2: int = 2) -> None:
        super().__init__()
        self.channel_pool = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        self.AAP = nn.AdaptiveAvgPool2d((s1, s2))
        self.descriptor_dim = out_channels * s1 * s2

    def forward(self, x: Tensor, cls: Tensor | None = None) -> Tensor:
        x = self.AAP(self.channel_pool(x))
        return F.normalize(x.flatten(1).float(), p=2, dim=-1)
