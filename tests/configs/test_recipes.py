"""Every recipe in configs/ builds, and the paper recipes equal the model presets."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.losses import MetricLearningCriterion
from trainer.models import ModelConfig, model_preset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
SAME_AS_PRESET = {
    "earthloc.yaml": "earthloc",
    "earthloc2-dinov2-b-salad-queries.yaml": "earthloc2-dinov2-b-salad",
    "gsv-cities-convap-r50.yaml": "gsv-convap-r50",
    "gsv-cities-r18-cosplace512.yaml": "r18-cosplace512",
}


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= set(SAME_AS_PRESET)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_sections_parse_strictly(path):
    recipe = yaml.safe_load(path.read_text())
    model = ModelConfig.from_dict(recipe["model"])  # unknown keys would raise
    assert model.aggregator["name"]
    MetricLearningCriterion(recipe["loss"])


@pytest.mark.parametrize("name, preset", sorted(SAME_AS_PRESET.items()))
def test_paper_recipes_equal_the_presets(name, preset):
    recipe = yaml.safe_load((CONFIGS / name).read_text())
    assert ModelConfig.from_dict(recipe["model"]).to_dict() == model_preset(preset).to_dict()
