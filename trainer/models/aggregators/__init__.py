"""Aggregators by name: ``create_aggregator("mixvpr", features, out_channels=1024, ...)``.

Every aggregator takes ``forward(feature_map, cls_token=None)``, returns an L2-normalised
``[B, descriptor_dim]`` tensor and exposes ``descriptor_dim``.
"""
from . import convap, mixvpr, pooling, salad  # noqa: F401  (registration side effects)
from .convap import ConvAP
from .mixvpr import FeatureMixerLayer, MixVPR
from .pooling import AvgPool, ClsToken, CosPlace, GeM, GeMPool
from .registry import (
    AggregatorSpec,
    FeatureShape,
    create_aggregator,
    get_aggregator_spec,
    list_aggregators,
    register_aggregator,
)
from .salad import SALAD, log_sinkhorn

__all__ = [
    "AggregatorSpec", "FeatureShape", "create_aggregator", "get_aggregator_spec",
    "list_aggregators", "register_aggregator",
    "AvgPool", "GeMPool", "GeM", "CosPlace", "ClsToken", "ConvAP", "MixVPR", "FeatureMixerLayer",
    "SALAD", "log_sinkhorn",
]
