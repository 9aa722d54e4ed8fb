"""Every recipe in configs/ is a full, valid recipe that states what it should reach."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO, run_env
from trainer.recipe import Recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
EXPECTED = {"earthloc.yaml", "earthloc2-dinov2-b-salad-queries.yaml", "earthloc2-dinov2-s-salad.yaml",
            "earthloc2-dinov2-l-salad.yaml", "gsv-cities-r18-cosplace512.yaml",
            "gsv-cities-convap-r50.yaml", "gsv-cities-mixvpr-r50.yaml",
            "gsv-cities-dinov2-b-salad.yaml", "demo-bluemarble.yaml"}
# recipe -> (optimizer, lr, precision, epochs, steps per epoch, metric)
PAPERS = {
    "earthloc.yaml": ("adam", 1e-4, "bf16", 20, 500, "R@5"),
    "earthloc2-dinov2-b-salad-queries.yaml": ("adam", 1e-4, "fp16", 20, 250, "R@5"),
    "gsv-cities-r18-cosplace512.yaml": ("adam", 2e-4, "fp32", 8, None, "R@1"),
    "gsv-cities-dinov2-b-salad.yaml": ("adamw", 6e-5, "bf16", 4, None, "R@1"),
}


def test_every_recipe_is_there():
    assert {p.name for p in RECIPES} >= EXPECTED


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_full_valid_and_states_its_reference(path):
    raw = yaml.safe_load(path.read_text())
    assert {"model", "loss", "data", "optim", "train", "eval"} <= set(raw)
    recipe = Recipe.load(path)                 # strict: keys, types, combinations
    assert recipe.name == path.stem
    assert "REFERENCE" in path.read_text()     # what it should reach, in a comment
    assert recipe.eval.protocol in ("apl", "vpr")


@pytest.mark.parametrize("name, expected", sorted(PAPERS.items()))
def test_paper_schedules(name, expected):
    r = Recipe.load(CONFIGS / name)
    assert (r.optim.optimizer, r.optim.lr, r.train.precision, r.train.epochs,
            r.data.steps_per_epoch, r.eval.metric) == expected


def test_gsv_schedule_and_salad_decay():
    r = Recipe.load(CONFIGS / "gsv-cities-convap-r50.yaml")
    assert (r.optim.warmup_steps, r.optim.milestones, r.optim.gamma) == (600, [5, 10, 15, 25], 0.3)
    s = Recipe.load(CONFIGS / "gsv-cities-dinov2-b-salad.yaml")
    assert (s.optim.schedule, s.optim.end_factor, s.optim.decay_steps) == ("linear", 0.2, 4000)
    assert s.model.image_hw == (224, 224) and s.eval_image_size == (322, 322)
    assert s.model.unfreeze_last_blocks == 4


def test_apl_recipes_embed_the_database_at_four_rotations():
    for name in ("earthloc.yaml", "earthloc2-dinov2-b-salad-queries.yaml"):
        r = Recipe.load(CONFIGS / name)
        assert r.eval.rotations == [0, 90, 180, 270] and r.eval.regions


def test_check_prints_the_resolved_recipe():
    proc = subprocess.run([PYTHON, "-m", "trainer", "--config", str(CONFIGS / "earthloc.yaml"),
                           "--check", "train.epochs=2", "data.train_shards=s3://b/places"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    assert out["train"]["epochs"] == 2 and out["data"]["train_shards"] == "s3://b/places"
    assert out["model"]["aggregator"]["name"] == "mixvpr"
