"""Metric-learning losses and miners by name, with overlap- and query-aware negative filtering.

``build_loss``/``build_miner`` wrap pytorch-metric-learning with the defaults of the
papers (REFERENCE.md); ``MetricLearningCriterion`` mines, drops negatives that are not
really negatives (overlapping footprints, pairs that involve a mined query), calls the
loss and reports what mining did.
"""
from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from pytorch_metric_learning import distances, losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor, nn

from .mining import negative_pair_mask
from .models.config import CheckedConfig, check_keys

__all__ = [
    "LOSSES",
    "MINERS",
    "build_loss",
    "build_miner",
    "CriterionConfig",
    "MetricLearningCriterion",
    "build_criterion",
    "filter_negatives",
]

_log = logging.getLogger(__name__)

# canonical name -> (pml class, defaults from the papers / upstream code)
LOSSES: Mapping[str, tuple[type, Mapping[str, Any]]] = {
    "multisimilarity": (losses.MultiSimilarityLoss, {"alpha": 1.0, "beta": 50.0, "base": 0.0, "distance": "dot"}),
    "tripletmargin": (losses.TripletMarginLoss, {"margin": 0.1, "triplets_per_anchor": "all"}),
    "fastap": (losses.FastAPLoss, {"num_bins": 30}),
    "ntxent": (losses.NTXentLoss, {"temperature": 0.07}),
    "angular": (losses.AngularLoss, {"alpha": 40}),
    "contrastive": (losses.ContrastiveLoss, {"pos_margin": 0.0, "neg_margin": 1.0}),
    "circle": (losses.CircleLoss, {"m": 0.4, "gamma": 80}),
}
MINERS: Mapping[str, tuple[type, Mapping[str, Any]]] = {
    "multisimilarity": (miners.MultiSimilarityMiner, {"epsilon": 0.1, "distance": "cosine"}),
    "batchhard": (miners.BatchHardMiner, {}),
    "batcheasyhard": (miners.BatchEasyHardMiner, {}),
    "uniformhistogram": (miners.UniformHistogramMiner, {"num_bins": 100, "pos_per_bin": 10, "neg_per_bin": 10}),
    "angular": (miners.AngularMiner, {"angle": 20}),
    "tripletmargin": (miners.TripletMarginMiner, {"margin": 0.1, "type_of_triplets": "semihard"}),
    "pairmargin": (miners.PairMarginMiner, {"pos_margin": 0.7, "neg_margin": 0.3, "distance": "dot"}),
}
_DISTANCES = {
    "dot": distances.DotProductSimilarity,
    "dotproduct": distances.DotProductSimilarity,
    "cosine": distances.CosineSimilarity,
    "lp": distances.LpDistance,
    "euclidean": distances.LpDistance,
    "snr": distances.SNRDistance,
}
_NO_MINER = {"none", "null", ""}


def _canonical(name: str, suffix: str) -> str:
    key = str(name).lower().replace("_", "").replace("-", "")
    return key[: -len(suffix)] if key.endswith(suffix) and key != suffix else key


def _accepted_params(cls: type) -> set[str]:
    """Keyword names accepted by a pml class, following **kwargs up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass in (nn.Module, object):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _make(kind: str, table: Mapping[str, tuple[type, Mapping[str, Any]]], name: str, params: Mapping[str, Any]):
    key = _canonical(name, kind)
    if key not in table:
        close = difflib.get_close_matches(key, list(table), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(sorted(table))}"
        raise ValueError(f"unknown {kind} '{name}'{hint}")
    cls, defaults = table[key]
    check_keys(params, _accepted_params(cls), f"{kind} '{cls.__name__}'")
    kwargs = {**defaults, **params}
    dist = kwargs.get("distance")
    if isinstance(dist, str):
        if dist.lower() not in _DISTANCES:
            check_keys([dist.lower()], _DISTANCES, f"{kind} distance names")
        kwargs["distance"] = _DISTANCES[dist.lower()]()
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot build {cls.__name__}({kwargs}): {exc}") from None


def build_loss(name: str, **params: Any) -> losses.BaseMetricLossFunction:
    """A pml loss by name ("MultiSimilarityLoss", "multi_similarity", "ms"...); params override defaults."""
    name = {"ms": "multisimilarity"}.get(str(name).lower(), name)
    return _make("loss", LOSSES, name, params)


def build_miner(name: str | None, **params: Any) -> miners.BaseMiner | None:
    """A pml miner by name, or None for "none"/None (every pair is used)."""
    if name is None or str(name).lower() in _NO_MINER:
        if params:
            raise ValueError(f"miner 'none' takes no parameters, got {', '.join(params)}")
        return None
    name = {"ms": "multisimilarity"}.get(str(name).lower(), name)
    return _make("miner", MINERS, name, params)


def _named(spec: Mapping[str, Any] | str | None, what: str) -> tuple[str | None, dict[str, Any]]:
    if spec is None or isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"{what} must be a name or a mapping with a 'name' key, got {spec!r}")
    params = dict(spec)
    return params.pop("name"), params


@dataclass
class CriterionConfig(CheckedConfig):
    """``loss``/``miner``: ``{name, <params>}``; the filters drop negatives before the loss.

    - ``overlap_aware``: negatives whose footprints intersect (or, given positions, lie
      closer than ``overlap_distance_km``) are removed (EarthLoc);
    - ``query_aware``: negatives that involve a mined query are removed (EarthLoc2).
    """

    loss: dict[str, Any] = field(default_factory=lambda: {"name": "MultiSimilarityLoss"})
    miner: dict[str, Any] | None = field(default_factory=lambda: {"name": "MultiSimilarityMiner"})
    overlap_aware: bool = False
    query_aware: bool = False
    overlap_distance_km: float | None = None

    CONFIG_NAME = "loss config"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CriterionConfig":
        data = {k: ({"name": v} if k in ("loss", "miner") and isinstance(v, str) else v)
                for k, v in data.items()}
        return super().from_dict(data)


def filter_negatives(tuples: tuple[Tensor, ...], keep_neg: Tensor) -> tuple[Tensor, ...]:
    """Drop negatives from pair (a1, p, a2, n) or triplet (a, p, n) indices, keeping the form."""
    if len(tuples) == 4:
        a1, p, a2, n = tuples
        return a1, p, a2[keep_neg], n[keep_neg]
    a, p, n = tuples
    return a[keep_neg], p[keep_neg], n[keep_neg]


def _negatives(tuples: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    return (tuples[2], tuples[3]) if len(tuples) == 4 else (tuples[0], tuples[2])


class MetricLearningCriterion(nn.Module):
    """loss(descriptors, labels) with mining and negative filtering; returns ``(loss, stats)``.

    ``stats``: ``batch_acc`` (1 - unique mined anchors / batch size; 0 without a miner, as
    upstream), ``mined_pos``/``mined_neg`` (pairs, or triplets for triplet miners, after
    filtering) and ``removed_neg`` (negatives the filters dropped).
    """

    def __init__(self, config: CriterionConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config = CriterionConfig.coerce(config or {})
        loss_name, loss_params = _named(self.config.loss, "loss")
        miner_name, miner_params = _named(self.config.miner, "miner")
        if loss_name is None:
            raise ValueError("loss needs a name")
        self.loss_fn = build_loss(loss_name, **loss_params)
        self.miner = build_miner(miner_name, **miner_params)
        self.filtering = self.config.overlap_aware or self.config.query_aware
        if self.filtering and isinstance(self.loss_fn, losses.FastAPLoss):
            _log.warning("FastAPLoss ranks against all samples: filtered negatives only change its weights")

    def forward(
        self,
        descriptors: Tensor,
        labels: Tensor,
        footprints: Tensor | None = None,
        is_query: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        descriptors = descriptors.float()
        labels = labels.to(descriptors.device)
        mined = self._run_miner(descriptors, labels)
        tuples, removed = self._filter(mined, labels, footprints, is_query, positions)
        loss = self.loss_fn(descriptors, labels, tuples)
        return loss, self._stats(mined, tuples, labels, descriptors.shape[0], removed)

    @torch.no_grad()
    def mine(
        self,
        descriptors: Tensor,
        labels: Tensor,
        footprints: Tensor | None = None,
        is_query: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[tuple[Tensor, ...] | None, int]:
        """Mined (and filtered) index tuples, or None for "all pairs"; plus negatives removed."""
        return self._filter(self._run_miner(descriptors, labels), labels, footprints, is_query,
                            positions)

    @torch.no_grad()
    def _run_miner(self, descriptors: Tensor, labels: Tensor) -> tuple[Tensor, ...] | None:
        return self.miner(descriptors, labels) if self.miner is not None else None

    def _filter(self, tuples, labels: Tensor, footprints, is_query, positions
                ) -> tuple[tuple[Tensor, ...] | None, int]:
        if not self.filtering:
            return tuples, 0
        if tuples is None:
            tuples = lmu.get_all_pairs_indices(labels)
        keep = self._keep_negatives(tuples, footprints, is_query, positions)
        return filter_negatives(tuples, keep), int((~keep).sum())

    def _keep_negatives(self, tuples, footprints, is_query, positions) -> Tensor:
        cfg = self.config
        if cfg.overlap_aware and footprints is None and positions is None:
            raise ValueError("overlap_aware mining needs footprints [B, 4, 2] or positions [B, 2]")
        if cfg.query_aware and is_query is None:
            raise ValueError("query_aware mining needs is_query [B] (which samples are mined queries)")
        anchors, negatives = _negatives(tuples)
        return negative_pair_mask(
            anchors, negatives,
            footprints=footprints if cfg.overlap_aware else None,
            positions=positions if cfg.overlap_aware else None,
            distance_km=cfg.overlap_distance_km,
            is_query=is_query if cfg.query_aware else None,
        )

    def _stats(self, mined, tuples, labels: Tensor, batch: int, removed: int) -> dict[str, float]:
        """Counts of what reaches the loss; batch accuracy from the miner's own output,
        since the geometric filters would inflate it."""
        if tuples is None:  # pml used every pair
            same = int((labels.unsqueeze(0) == labels.unsqueeze(1)).sum())
            pos, neg = same - batch, batch * batch - same
        elif len(tuples) == 4:
            pos, neg = int(tuples[0].numel()), int(tuples[2].numel())
        else:
            pos = neg = int(tuples[0].numel())
        return {"batch_acc": self._batch_acc(mined, batch), "mined_pos": pos, "mined_neg": neg,
                "removed_neg": removed}

    def _batch_acc(self, tuples, batch: int) -> float:
        """1 - unique mined anchors / batch size (GSV-Cities' "batch accuracy")."""
        if self.miner is None or tuples is None or not batch:
            return 0.0
        return 1.0 - torch.unique(tuples[0]).numel() / batch


def build_criterion(cfg: CriterionConfig | Mapping[str, Any] | None = None) -> MetricLearningCriterion:
    return MetricLearningCriterion(cfg)
