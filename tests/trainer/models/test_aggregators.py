"""Aggregators: exact parameter counts, structure, L2 output, registry behaviour."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.models.aggregators import (
    SALAD,
    ConvAP,
    CosPlace,
    FeatureShape,
    GeMPool,
    MixVPR,
    create_aggregator,
    list_aggregators,
    log_sinkhorn,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "name, kwargs, params, dim",
    [
        ("mixvpr", dict(in_channels=1024, in_h=20, in_w=20, out_channels=1024, mix_depth=4, mlp_ratio=1, out_rows=4),
         2_337_604, 4096),
        ("salad", dict(num_channels=768, num_clusters=32, cluster_dim=64, token_dim=1024), 1_755_745, 3072),
        ("salad", dict(num_channels=384, num_clusters=24, cluster_dim=64, token_dim=512), 899_161, 2048),
        ("convap", dict(in_channels=2048, out_channels=1024, s1=2, s2=2), 2_098_176, 4096),
        ("cosplace", dict(in_dim=256, out_dim=512), 131_585, 512),
        ("gem", dict(in_channels=256), 1, 256),
        ("avg", dict(in_channels=256), 0, 256),
    ],
)
def test_reference_parameter_counts(name, kwargs, params, dim):
    agg = create_aggregator(name, **kwargs)
    assert n_params(agg) == params
    assert agg.descriptor_dim == dim


def test_registry_lists_the_six_and_cls():
    assert set(list_aggregators()) == {"avg", "gem", "cosplace", "convap", "mixvpr", "salad", "cls"}


@pytest.mark.parametrize(
    "name, kwargs, fmap, cls",
    [
        ("avg", {}, (2, 32, 5, 7), False),
        ("gem", {}, (2, 32, 5, 7), False),
        ("cosplace", {"out_dim": 48}, (2, 32, 5, 7), False),
        ("convap", {"out_channels": 16, "s1": 2, "s2": 3}, (2, 32, 5, 7), False),
        ("mixvpr", {"out_channels": 16, "mix_depth": 2, "out_rows": 3}, (2, 32, 5, 7), False),
        ("salad", {"num_clusters": 4, "cluster_dim": 8, "token_dim": 16}, (2, 32, 5, 7), True),
        ("cls", {}, (2, 32, 5, 7), True),
    ],
)
def test_output_shape_and_unit_norm(name, kwargs, fmap, cls):
    b, c, h, w = fmap
    agg = create_aggregator(name, FeatureShape(c, h, w, cls), **kwargs).eval()
    x = torch.randn(*fmap).abs() if name == "gem" else torch.randn(*fmap)
    out = agg(x, torch.randn(b, c) if cls else None)
    assert out.shape == (b, agg.descriptor_dim) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(b), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = agg(x, torch.randn(b, c) if cls else None)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert torch.allclose(low.norm(dim=-1), torch.ones(b), atol=1e-3)


def test_avg_and_gem_formulas():
    x = torch.rand(3, 8, 4, 6) + 0.1
    avg = create_aggregator("avg", in_channels=8)
    assert torch.allclose(avg(x), F.normalize(x.mean((2, 3)), dim=-1))
    gem = GeMPool(p=3.0)
    want = F.normalize(F.avg_pool2d(x.pow(3), (4, 6)).pow(1 / 3).flatten(1), dim=-1)
    assert torch.allclose(gem(x), want, atol=1e-6)
    gem(x).sum().backward()
    assert gem.p.grad is not None  # p is learned


def test_cosplace_normalises_channels_before_gem():
    agg = CosPlace(in_dim=8, out_dim=4)
    x = torch.rand(2, 8, 3, 3) + 0.1
    scaled = x * 7.0  # a global scale disappears with the channel L2
    assert torch.allclose(agg(x), agg(scaled), atol=1e-5)
    want = F.normalize(agg.fc(F.avg_pool2d(F.normalize(x, dim=1).pow(3), 3).pow(1 / 3).flatten(1)), dim=-1)
    assert torch.allclose(agg(x), want, atol=1e-5)


def test_convap_structure():
    agg = ConvAP(in_channels=8, out_channels=4, s1=2, s2=2)
    x = torch.randn(2, 8, 6, 6)
    y = F.adaptive_avg_pool2d(F.conv2d(x, agg.channel_pool.weight, agg.channel_pool.bias), (2, 2))
    assert torch.allclose(agg(x), F.normalize(y.flatten(1), dim=-1), atol=1e-6)


def test_mixvpr_structure():
    agg = MixVPR(in_channels=8, in_h=3, in_w=4, out_channels=5, mix_depth=2, mlp_ratio=2, out_rows=3)
    assert isinstance(agg.mix[0].mix[0], torch.nn.LayerNorm) and agg.mix[0].mix[1].out_features == 24
    x = torch.randn(2, 8, 3, 4)
    # with the mixers' last Linear zeroed the mixer is the identity (residual), so
    # the output is the channel projection then the row projection of the flat map
    for layer in agg.mix:
        torch.nn.init.zeros_(layer.mix[3].weight)
        torch.nn.init.zeros_(layer.mix[3].bias)
    flat = x.flatten(2)                                  # [B, C, HW]
    y = agg.channel_proj(flat.transpose(1, 2))           # [B, HW, out_channels]
    y = agg.row_proj(y.transpose(1, 2))                  # [B, out_channels, out_rows]
    assert torch.allclose(agg(x), F.normalize(y.flatten(1), dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="feature map"):
        agg(torch.randn(2, 8, 4, 4))


def naive_salad(agg: SALAD, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SALAD written the long way (repeat and sum), to pin down the descriptor layout."""
    f = agg.cluster_features(x).flatten(2)
    p = log_sinkhorn(agg.score(x).flatten(2), agg.dust_bin, 3).exp()[:, :-1]
    m, l = agg.num_clusters, agg.cluster_dim
    p = p.unsqueeze(1).repeat(1, l, 1, 1)
    f = f.unsqueeze(2).repeat(1, 1, m, 1)
    local = F.normalize((f * p).sum(-1), dim=1).flatten(1)
    return F.normalize(torch.cat([F.normalize(agg.token_features(t), dim=-1), local], -1), dim=-1)


def test_salad_matches_the_long_form_and_sinkhorn_marginals():
    torch.manual_seed(0)
    agg = SALAD(num_channels=16, num_clusters=3, cluster_dim=5, token_dim=7, dropout=0.3).eval()
    assert agg.dust_bin.item() == 1.0
    x, t = torch.randn(2, 16, 3, 4), torch.randn(2, 16)
    out = agg(x, t)
    assert out.shape == (2, 7 + 3 * 5)
    assert torch.allclose(out, naive_salad(agg, x, t), atol=1e-6)
    # every feature's mass (column) sums to 1 over clusters + dustbin after the last v-update
    log_p = log_sinkhorn(torch.randn(2, 3, 12), torch.tensor(1.0), 3)
    assert torch.allclose(log_p.exp().sum(1), torch.ones(2, 12), atol=1e-5)
    # converged rows: each cluster takes mass 1, the dustbin n - m
    rows = log_sinkhorn(torch.randn(2, 3, 12), torch.tensor(1.0), 200).exp().sum(2)
    assert torch.allclose(rows, torch.tensor([[1.0, 1.0, 1.0, 9.0]] * 2), atol=1e-3)
    with pytest.raises(ValueError, match="more features than clusters"):
        agg(torch.randn(1, 16, 1, 3), torch.randn(1, 16))
    with pytest.raises(ValueError, match="CLS"):
        agg(x)


def test_salad_dropout_only_in_training():
    agg = SALAD(num_channels=16, num_clusters=3, cluster_dim=5, token_dim=7, dropout=0.5)
    x, t = torch.randn(2, 16, 3, 4), torch.randn(2, 16)
    assert not torch.allclose(agg.train()(x, t), agg(x, t))
    assert torch.equal(agg.eval()(x, t), agg(x, t))


def test_inputs_are_derived_from_features_and_checked():
    feats = FeatureShape(channels=64, height=5, width=6, has_cls_token=False)
    agg = create_aggregator("mixvpr", feats, out_channels=8, out_rows=2)
    assert agg.in_hw == (5, 6) and agg.channel_proj.in_features == 64
    assert create_aggregator("cosplace", feats, out_dim=16).fc.in_features == 64
    assert create_aggregator("gem", feats).descriptor_dim == 64
    assert create_aggregator("mixvpr", feats, in_channels=64, out_channels=8).descriptor_dim == 32
    with pytest.raises(ValueError, match="in_channels=32 but the backbone gives channels=64"):
        create_aggregator("mixvpr", feats, in_channels=32)
    with pytest.raises(ValueError, match="needs a CLS token"):
        create_aggregator("salad", feats)
    with pytest.raises(ValueError, match="needs in_dim"):
        create_aggregator("cosplace", out_dim=4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: create_aggregator("mixvrp"), "did you mean 'mixvpr'"),
        (lambda: create_aggregator("gem", q=3), "unknown key 'q'"),
        (lambda: create_aggregator("mixvpr", out_chanels=4), "did you mean 'out_channels'"),
    ],
)
def test_registry_errors_are_one_line(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
