"""SALAD: optimal-transport assignment of patch features to clusters, plus a global token."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_aggregator

__all__ = ["SALAD", "log_sinkhorn"]


def log_sinkhorn(scores: Tensor, dustbin: Tensor, num_iters: int = 3) -> Tensor:
    """Log-domain Sinkhorn with a dustbin row: [B, m, n] scores -> [B, m + 1, n] log-probabilities.

    The m clusters and the dustbin share the mass of the n features; the dustbin takes
    what is left over (n - m), so features may stay unassigned. The result is scaled so
    that each feature's column sums to 1. Runs in fp32 outside autocast: logsumexp over
    a few hundred bf16 terms is too coarse.
    """
    b, m, n = scores.shape
    if n <= m:
        raise ValueError(f"SALAD needs more features than clusters, got {n} features for {m} clusters")
    device = scores.device.type
    no_autocast = (torch.autocast(device_type=device, enabled=False)
                   if torch.amp.is_autocast_available(device) else contextlib.nullcontext())
    with no_autocast:
        s = torch.cat([scores.float(), dustbin.float().expand(b, 1, n)], dim=1)
        log_norm = -math.log(n + m)
        log_a = torch.full((m + 1,), log_norm, dtype=s.dtype, device=s.device)
        log_a = torch.cat([log_a[:m], log_a[m:] + math.log(n - m)])
        log_b = torch.full((n,), log_norm, dtype=s.dtype, device=s.device)
        u = torch.zeros(b, m + 1, dtype=s.dtype, device=s.device)
        v = torch.zeros(b, n, dtype=s.dtype, device=s.device)
        for _ in range(num_iters):
            u = log_a - torch.logsumexp(s + v.unsqueeze(1), dim=2)
            v = log_b - torch.logsumexp(s + u.unsqueeze(2), dim=1)
        return s + u.unsqueeze(2) + v.unsqueeze(1) - log_norm


def _head(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_dim, 512, 1),
        nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(512, out_dim, 1),
    )


@register_aggregator("salad", inputs={"num_channels": "channels"}, needs_cls_token=True)
class SALAD(nn.Module):
    """Descriptor = L2(token MLP) ++ per-cluster-L2 aggregates, then L2: token_dim + m * l."""

    def __init__(
        self,
        num_channels: int = 1536,
        num_clusters: int = 64,
        cluster_dim: int = 128,
        token_dim: int = 256,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.cluster_dim = cluster_dim
        self.token_features = nn.Sequential(
            nn.Linear(num_channels, 512), nn.ReLU(), nn.Linear(512, token_dim)
        )
        self.cluster_features = _head(num_channels, cluster_dim, dropout)
        self.score = _head(num_channels, num_clusters, dropout)
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        self.descriptor_dim = token_dim + num_clusters * cluster_dim

    def forward(self, x: Tensor, cls: Tensor | None = None) -> Tensor:
        if cls is None:
            raise ValueError("SALAD needs the CLS token as well as the feature map")
        f = self.cluster_features(x).flatten(2)                      # [B, l, n]
        log_p = log_sinkhorn(self.score(x).flatten(2), self.dust_bin, 3)
        p = log_p[:, :-1].exp()                                       # [B, m, n], dustbin dropped
        agg = torch.einsum("bln,bmn->blm", f.float(), p)              # [B, l, m]
        agg = F.normalize(agg.float(), p=2, dim=1).flatten(1)
        token = F.normalize(self.token_features(cls).float(), p=2, dim=-1)
        return F.normalize(torch.cat([token, agg], dim=-1), p=2, dim=-1)
