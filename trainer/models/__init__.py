"""Encoders for retrieval: backbones, aggregators, presets and the saved-encoder format.

``build_model(cfg)`` builds from a ``ModelConfig`` or dict; ``model_preset(name)`` gives the
published recipes; ``save_encoder``/``load_encoder`` are the hand-off to ``retrieval``.
"""
from .aggregators import FeatureShape, create_aggregator, list_aggregators, register_aggregator
from .backbones import BACKBONES, DinoV2Backbone, ResNetBackbone, build_backbone
from .config import ModelConfig
from .io import load_encoder, save_encoder
from .model import LocalizationModel, build_model
from .presets import PRESETS, list_presets, model_preset

__all__ = [
    "BACKBONES", "DinoV2Backbone", "ResNetBackbone", "build_backbone",
    "FeatureShape", "create_aggregator", "list_aggregators", "register_aggregator",
    "ModelConfig", "LocalizationModel", "build_model",
    "PRESETS", "list_presets", "model_preset",
    "save_encoder", "load_encoder",
]
