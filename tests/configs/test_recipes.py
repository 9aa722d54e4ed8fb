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


# ---------------------------------------------------------------- data sections

PAPER_BATCHES = {  # recipe -> (P, K, min images, augment, mine_queries)
    "earthloc.yaml": (96, 4, 4, "earthloc", False),                      # 96 places x 4 years
    "earthloc2-dinov2-b-salad-queries.yaml": (96, 4, 4, "earthloc", True),
    "gsv-cities-convap-r50.yaml": (100, 4, 4, "gsv", False),             # P = 100-120, K = 4
    "gsv-cities-r18-cosplace512.yaml": (100, 4, 4, "gsv", False),
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_data_sections_parse_strictly(path):
    from trainer.augment import build_augmentation
    from trainer.data import DataConfig

    recipe = yaml.safe_load(path.read_text())
    data = DataConfig.from_dict(recipe["data"])  # unknown keys would raise
    model = ModelConfig.from_dict(recipe["model"])
    aug = build_augmentation(data.augment, model.image_hw, **data.augment_options)
    assert aug.decode_side >= max(model.image_hw)


@pytest.mark.parametrize("name, expected", sorted(PAPER_BATCHES.items()))
def test_recipe_batches_match_the_papers(name, expected):
    from trainer.data import DataConfig

    data = DataConfig.from_dict(yaml.safe_load((CONFIGS / name).read_text())["data"])
    assert (data.places_per_batch, data.images_per_place, data.min_images_per_place,
            data.augment, data.mine_queries) == expected
    if data.mine_queries:
        assert data.queries_per_place == 1 and data.query_augment == "earthloc-query"


def test_data_section_typo_names_the_nearest_key():
    from trainer.data import DataConfig

    with pytest.raises(ValueError, match="did you mean 'places_per_batch'"):
        DataConfig.from_dict({"places_per_bach": 8})
