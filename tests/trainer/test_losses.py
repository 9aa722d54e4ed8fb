"""Loss/miner factories and the criterion's overlap- and query-aware negative filtering."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from conftest import diamond, square
from trainer.losses import (
    LOSSES,
    MINERS,
    CriterionConfig,
    MetricLearningCriterion,
    build_criterion,
    build_loss,
    build_miner,
)
from trainer.mining import footprint_overlap_matrix


# ----------------------------------------------------------------------------- factories

def test_loss_defaults_follow_the_papers():
    ms = build_loss("MultiSimilarityLoss")
    assert isinstance(ms, losses.MultiSimilarityLoss)
    assert (ms.alpha, ms.beta, ms.base) == (1.0, 50.0, 0.0)
    assert isinstance(ms.distance, distances.DotProductSimilarity)
    tm = build_loss("TripletMarginLoss")
    assert tm.margin == 0.1 and tm.triplets_per_anchor == "all"
    assert build_loss("FastAP").num_bins == 30
    assert build_loss("NTXentLoss").temperature == 0.07
    assert build_loss("AngularLoss").alpha == pytest.approx(torch.deg2rad(torch.tensor(40.0)).item())
    assert isinstance(build_loss("Contrastive"), losses.ContrastiveLoss)
    assert isinstance(build_loss("circle"), losses.CircleLoss)


def test_miner_defaults_follow_the_papers():
    ms = build_miner("MultiSimilarityMiner")
    assert isinstance(ms, miners.MultiSimilarityMiner) and ms.epsilon == 0.1
    assert isinstance(ms.distance, distances.CosineSimilarity)
    uh = build_miner("UniformHistogramMiner")
    assert (uh.num_bins, uh.pos_per_bin, uh.neg_per_bin) == (100, 10, 10)
    assert build_miner("AngularMiner").angle == pytest.approx(torch.deg2rad(torch.tensor(20.0)).item())
    assert isinstance(build_miner("BatchHardMiner"), miners.BatchHardMiner)
    assert isinstance(build_miner("BatchEasyHardMiner"), miners.BatchEasyHardMiner)
    assert isinstance(build_miner("TripletMarginMiner"), miners.TripletMarginMiner)
    assert isinstance(build_miner("PairMarginMiner"), miners.PairMarginMiner)
    assert build_miner("none") is None and build_miner(None) is None


def test_names_aliases_and_params():
    for name in ("multi_similarity", "MultiSimilarity", "multisimilarity-loss", "ms"):
        assert isinstance(build_loss(name), losses.MultiSimilarityLoss)
    loss = build_loss("MultiSimilarityLoss", alpha=2, beta=40, base=0.5, distance="cosine")
    assert (loss.alpha, loss.beta, loss.base) == (2, 40, 0.5)
    assert isinstance(loss.distance, distances.CosineSimilarity)
    assert build_miner("ms", epsilon=0.2).epsilon == 0.2
    assert len(LOSSES) == 7 and len(MINERS) == 7


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_loss("MultiSimilartyLoss"), "did you mean 'multisimilarity'"),
        (lambda: build_loss("MultiSimilarityLoss", alpah=1), "unknown key 'alpah'.*did you mean 'alpha'"),
        (lambda: build_miner("BatchHardest"), "unknown miner"),
        (lambda: build_miner("MultiSimilarityMiner", distance="manhattan"), "unknown key 'manhattan'"),
        (lambda: build_miner("none", epsilon=0.1), "takes no parameters"),
        (lambda: build_criterion({"loss": "ms", "overlap_awre": True}), "did you mean 'overlap_aware'"),
    ],
)
def test_bad_names_and_params_raise_one_line(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- criterion

def clustered_batch(places: int = 4, per_place: int = 4, noise: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(places, 64, generator=g), dim=-1)
    desc = centres.repeat_interleave(per_place, 0) + noise * torch.randn(places * per_place, 64, generator=g)
    labels = torch.arange(places).repeat_interleave(per_place)
    return F.normalize(desc, dim=-1), labels


def overlapping_batch():
    """Places 0 and 1 overlap on the ground; place 2 is far; place 3's diamond only shares a bbox with 2."""
    # place 2: lat -1..2, lon 19..22; place 3: a diamond whose bbox (lat 1.6..3.6, lon 21.6..23.6)
    # overlaps place 2's but whose nearest edge passes 0.2 deg (L1) beyond place 2's corner (2, 22).
    fps = [square(0, 0)] * 2 + [square(0, 1.5)] * 2 + [square(0.5, 20.5, 1.5)] * 2 + [diamond(2.6, 22.6, 1.0)] * 2
    return torch.tensor(fps), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def test_batch_geometry_is_what_the_filter_tests_assume():
    fps, _ = overlapping_batch()
    m = footprint_overlap_matrix(fps)
    assert m[0, 2] and not m[0, 4] and not m[2, 4]
    # places 2 and 3: boxes overlap, rotated polygons do not
    lo4, hi4 = fps[4].amin(0), fps[4].amax(0)
    lo6, hi6 = fps[6].amin(0), fps[6].amax(0)
    assert bool(((lo4 <= hi6) & (lo6 <= hi4)).all())
    assert not m[4, 6]


@pytest.mark.parametrize("miner", [None, "MultiSimilarityMiner", "BatchHardMiner", "TripletMarginMiner"])
def test_overlapping_pairs_are_never_negatives(miner):
    fps, labels = overlapping_batch()
    # identical descriptors for the overlapping places make them the hardest negatives
    desc = F.normalize(torch.tensor([[1.0, 0, 0]] * 4 + [[0, 1.0, 0]] * 2 + [[0, 0.9, 0.1]] * 2), dim=-1)
    desc = F.normalize(desc + 0.01 * torch.randn(8, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    cfg = {"loss": "MultiSimilarityLoss", "miner": miner and {"name": miner}, "overlap_aware": True}
    crit = MetricLearningCriterion(cfg)
    plain = MetricLearningCriterion({**cfg, "overlap_aware": False})
    overlap = footprint_overlap_matrix(fps)

    tuples, removed = crit.mine(desc, labels, footprints=fps)
    a, n = (tuples[2], tuples[3]) if len(tuples) == 4 else (tuples[0], tuples[2])
    assert not overlap[a, n].any()
    assert removed > 0
    # the rotated pair (bboxes overlap, polygons do not) is still a negative
    rotated = ((a == 4) | (a == 5)) & ((n == 6) | (n == 7)) | ((a == 6) | (a == 7)) & ((n == 4) | (n == 5))
    assert rotated.any()
    # without the filter the overlapping pair is mined as a negative
    raw, _ = plain.mine(desc, labels)
    raw = raw if raw is not None else lmu.get_all_pairs_indices(labels)
    ra, rn = (raw[2], raw[3]) if len(raw) == 4 else (raw[0], raw[2])
    assert overlap[ra, rn].any()
    assert removed == int(overlap[ra, rn].sum())

    loss, stats = crit(desc, labels, footprints=fps)
    loss_plain, _ = plain(desc, labels, footprints=fps)
    assert stats["removed_neg"] == removed
    assert stats["mined_neg"] == (len(n) if len(tuples) == 4 else len(a))
    assert loss.item() != pytest.approx(loss_plain.item())


def test_no_miner_with_filters_equals_loss_on_filtered_pairs():
    fps, labels = overlapping_batch()
    desc, _ = clustered_batch(places=4, per_place=2, noise=0.5, seed=3)
    crit = MetricLearningCriterion({"loss": "MultiSimilarityLoss", "miner": None, "overlap_aware": True})
    loss, stats = crit(desc, labels, footprints=fps)
    tuples, _ = crit.mine(desc, labels, footprints=fps)
    direct = build_loss("MultiSimilarityLoss")(desc, labels, tuples)
    assert torch.allclose(loss, direct)
    # 8 samples, 2 per place: 8 positive pairs; places 0/1 overlap -> 2*2*2 ordered negatives removed
    assert stats == {"batch_acc": 0.0, "mined_pos": 8, "mined_neg": 64 - 16 - 8, "removed_neg": 8}


def test_query_aware_drops_every_negative_that_involves_a_query():
    desc, labels = clustered_batch(places=4, per_place=3, noise=0.8, seed=2)
    is_query = torch.zeros(12, dtype=torch.bool)
    is_query[2::3] = True  # the last member of every place is its mined query
    for miner in (None, "MultiSimilarityMiner", "AngularMiner"):
        crit = MetricLearningCriterion({"loss": "ms", "miner": miner and {"name": miner}, "query_aware": True})
        tuples, removed = crit.mine(desc, labels, is_query=is_query)
        a, n = (tuples[2], tuples[3]) if len(tuples) == 4 else (tuples[0], tuples[2])
        assert not (is_query[a] | is_query[n]).any()
        assert removed > 0
        if len(tuples) == 4:  # queries still form positives
            assert (is_query[tuples[0]] | is_query[tuples[1]]).any()
    crit = MetricLearningCriterion({"loss": "ms", "miner": None, "query_aware": True})
    _, stats = crit(desc, labels, is_query=is_query)
    # 12 samples, 4 queries: 144 - 4*9 = 108 negatives; 8*8 - 4*(2*2) = 48 do not touch a query
    assert (stats["mined_neg"], stats["removed_neg"]) == (48, 60)


def test_positions_with_distance_threshold():
    desc, labels = clustered_batch(places=3, per_place=2, noise=0.3)
    pos = torch.tensor([[0.0, 0.0]] * 2 + [[0.0, 0.5]] * 2 + [[0.0, 30.0]] * 2)  # ~56 km, ~3300 km
    crit = MetricLearningCriterion({"loss": "ms", "miner": None, "overlap_aware": True, "overlap_distance_km": 100})
    tuples, removed = crit.mine(desc, labels, positions=pos)
    assert removed == 8
    assert not (((labels[tuples[2]] == 0) & (labels[tuples[3]] == 1)).any())
    crit = MetricLearningCriterion({"loss": "ms", "miner": None, "overlap_aware": True, "overlap_distance_km": 10})
    assert crit.mine(desc, labels, positions=pos)[1] == 0


def test_overlap_aware_needs_geometry():
    desc, labels = clustered_batch()
    crit = MetricLearningCriterion({"loss": "ms", "overlap_aware": True})
    with pytest.raises(ValueError, match="footprints"):
        crit(desc, labels)


def test_query_aware_needs_is_query():
    desc, labels = clustered_batch()
    crit = MetricLearningCriterion({"loss": "ms", "query_aware": True})
    with pytest.raises(ValueError, match="is_query"):
        crit(desc, labels)


def test_batch_accuracy_measures_the_miner_before_the_filters():
    desc, labels = clustered_batch(places=4, per_place=4, noise=2.0, seed=3)
    is_query = torch.ones(16, dtype=torch.bool)  # every negative involves a query: all removed
    plain = MetricLearningCriterion({"loss": "TripletMarginLoss", "miner": "TripletMarginMiner"})
    filtered = MetricLearningCriterion({"loss": "TripletMarginLoss", "miner": "TripletMarginMiner",
                                        "query_aware": True})
    _, base = plain(desc, labels)
    _, stats = filtered(desc, labels, is_query=is_query)
    assert stats["mined_neg"] == 0 and stats["removed_neg"] > 0
    assert stats["batch_acc"] == base["batch_acc"] < 1.0


def test_batch_accuracy():
    desc, labels = clustered_batch(places=4, per_place=4, noise=0.0)
    crit = MetricLearningCriterion(CriterionConfig())  # MS loss + MS miner
    _, stats = crit(desc, labels)
    assert stats["batch_acc"] == 1.0 and stats["mined_pos"] == 0  # nothing is hard: every pair is trivial
    noisy, _ = clustered_batch(places=4, per_place=4, noise=2.0)
    tuples, _ = crit.mine(noisy, labels)
    _, stats = crit(noisy, labels)
    assert stats["batch_acc"] == pytest.approx(1 - torch.unique(tuples[0]).numel() / 16)
    assert stats["batch_acc"] < 1.0
    _, stats = MetricLearningCriterion({"loss": "ms", "miner": None})(noisy, labels)
    assert stats["batch_acc"] == 0.0 and stats["mined_pos"] == 48 and stats["mined_neg"] == 192


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("miner", ["MultiSimilarityMiner", "AngularMiner", "none"])
def test_every_loss_runs_with_pair_and_triplet_miners_and_filters(loss, miner):
    desc, labels = clustered_batch(places=4, per_place=4, noise=1.0, seed=5)
    desc = desc.clone().requires_grad_(True)
    is_query = torch.zeros(16, dtype=torch.bool)
    is_query[3::4] = True
    crit = MetricLearningCriterion({"loss": {"name": loss}, "miner": {"name": miner}, "query_aware": True})
    value, stats = crit(desc, labels, is_query=is_query)
    assert torch.isfinite(value)
    value.backward()
    assert desc.grad is not None and torch.isfinite(desc.grad).all()
    assert stats["removed_neg"] > 0
