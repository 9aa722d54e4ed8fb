"""Recipes: every key and type checked, combinations refused, the resolved YAML round-trips."""
from __future__ import annotations

import pytest
import yaml

from trainer.recipe import ConfigError, Recipe


def full(**sections) -> dict:
    out = {"model": {"backbone": "resnet18", "image_size": 32, "aggregator": {"name": "gem"}},
           "data": {"train_shards": "x", "places_per_batch": 4}}
    out.update(sections)
    return out


def test_yaml_exponents_are_floats_and_ints_stay_ints():
    r = Recipe.from_dict(full(optim={"lr": "1e-4", "gamma": 1}, train={"epochs": 3}))
    assert r.optim.lr == 1e-4 and isinstance(r.optim.gamma, float)
    assert r.train.epochs == 3 and isinstance(r.train.epochs, int)


@pytest.mark.parametrize("data, message", [
    (full(optim={"lr": "fast"}), "optim.lr must be float, got 'fast'"),
    (full(train={"epochs": 2.5}), "train.epochs must be int, got 2.5"),
    (full(train={"freeze_bn_stats": "yes"}), "train.freeze_bn_stats must be bool"),
    (full(eval={"ks": [1, "five"]}), "eval.ks must be list"),
    (full(data={"places_per_batch": "many"}), "data.places_per_batch must be int"),
    (full(model={"backbone": "resnet18", "image_size": "big"}), "model.image_size must be int | list"),
    (full(optim={"optimiser": "adam"}), "unknown key 'optimiser' in section 'optim'; did you mean 'optimizer'?"),
    (full(train={"precison": "bf16"}), "did you mean 'precision'?"),
    (full(optim={"optimizer": "lamb"}), "optim.optimizer must be one of adam, adamw, sgd"),
    (full(optim={"schedule": "multistep"}), "optim.schedule multistep needs optim.milestones"),
    (full(train={"precision": "fp8"}), "train.precision must be one of fp32, bf16, fp16"),
    (full(loss={"query_aware": True}), "loss.query_aware needs data.mine_queries"),
    (full(eval={"database_shards": "db"}), "eval.database_shards and eval.query_shards go together"),
    (full(eval={"metric": "R@3"}), "eval.metric R@3 needs 3 in eval.ks"),
    (full(eval={"protocol": "vpr", "regions": ["alps"]}), "eval.regions apply to protocol apl only"),
    (full(eval={"regions": ["alsp"]}), "eval.regions: unknown region 'alsp'"),
    (full(eval={"regions": ["mine:95,0,10,20"]}), "eval.regions: bad region 'mine:95,0,10,20'"),
    (full(eval={"ks": [-1, 5], "metric": "R@5"}), "eval.ks must be integers >= 1"),
    (full(model={"backbone": "resnet18", "image_size": [64, 0]}), "image_size must be positive"),
    (full(model={"backbone": "resnet18", "projection_dim": -1}), "model.projection_dim must be >= 1"),
    (full(data={"loader_timeout": -1}), "data.loader_timeout must be >= 0"),
    (full(loss={"loss": {"name": "MultiSimilarityLos"}}), "did you mean 'multisimilarity'?"),
    (full(model={"aggregator": {"name": "netvlad"}}), "model.aggregator"),
    ({"model": {}, "trian": {}}, "unknown key 'trian' in the recipe (sections); did you mean 'train'?"),
])
def test_bad_recipes_fail_with_one_line(data, message):
    with pytest.raises(ConfigError) as err:
        Recipe.from_dict(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overrides_and_resolved_yaml_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(full()))
    r = Recipe.load(path, ["optim.lr=3e-4", "train.run_dir=s3://b/run", "data.mine_queries=true",
                           "loss.query_aware=true", "eval.image_size=[48, 64]"])
    assert r.optim.lr == 3e-4 and r.run_dir == "s3://b/run" and r.eval_image_size == (48, 64)
    again = Recipe.from_dict(yaml.safe_load(r.to_yaml()))
    assert again.to_dict() == r.to_dict()
    assert Recipe.load(path).run_dir == "runs/r"        # default: runs/<recipe name>
    flat = r.flat()
    assert flat["optim.lr"] == 3e-4 and flat["model.aggregator"] == "{'name': 'gem'}"


def test_missing_file_and_bad_override_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config not found"):
        Recipe.load(tmp_path / "nope.yaml")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(full()))
    with pytest.raises(ConfigError, match="is not section.key=value"):
        Recipe.load(path, ["optim.lr"])


def test_training_needs_shards():
    r = Recipe.from_dict(full(data={"train_shards": None}))
    with pytest.raises(ConfigError, match="data.train_shards is not set"):
        r.require_training_data()


DINO = {"backbone": "dinov2_small", "image_size": 56, "aggregator": {"name": "cls"}}


@pytest.mark.parametrize("data, message", [
    (full(model={"backbone": "resnet19"}),
     "model.backbone: unknown backbone 'resnet19'"),
    (full(model={**DINO, "image_size": 64}),
     "model.image_size: DINOv2 input size must be a multiple of 14, got 64x64"),
    (full(model=DINO, eval={"image_size": 100}),
     "eval.image_size: DINOv2 input size must be a multiple of 14, got 100x100"),
    (full(model={"backbone": "resnet18", "image_size": 32, "aggregator": {"name": "gem", "p": "abc"}}),
     "model.aggregator.p must be float, got 'abc'"),
    (full(model={"backbone": "resnet18", "image_size": 32, "aggregator": {"name": "gem", "pp": 3}}),
     "model.aggregator: unknown key 'pp' in aggregator 'gem'"),
    (full(model={"backbone": "resnet18", "image_size": 32, "aggregator": {"name": "cls"}}),
     "aggregator 'cls' needs a CLS token"),
    (full(model={**DINO, "aggregator": {"name": "salad", "num_clusters": 64}}),
     "model.image_size: SALAD needs more features than clusters"),
    (full(optim={"betas": [2, 3]}), "optim.betas must be two numbers in [0, 1), got [2.0, 3.0]"),
    (full(optim={"weight_decay": -1}), "optim.weight_decay must be >= 0"),
    (full(optim={"optimizer": "sgd", "nesterov": True, "momentum": 0}),
     "optim.nesterov needs optim.momentum > 0"),
    (full(model={"backbone": "resnet18", "image_size": 32, "pretrained": "IMAGENET9"}),
     "model.pretrained: unknown pretrained weights 'IMAGENET9' for resnet18"),
])
def test_every_value_a_run_refuses_is_refused_by_the_recipe(data, message):
    with pytest.raises(ConfigError) as err:
        Recipe.from_dict(data)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_pretrained_file_is_refused_before_building(tmp_path):
    missing = tmp_path / "r18.safetensors"
    with pytest.raises(ConfigError) as err:
        Recipe.from_dict(full(model={"backbone": "resnet18", "image_size": 32,
                                     "pretrained": str(missing)}))
    assert str(err.value).startswith(
        f"model.pretrained: pretrained weights file not found: {missing} ")
    assert "model.pretrained=null" in str(err.value)      # how a resume gets past it


def test_aggregator_values_are_coerced_to_their_declared_types():
    r = Recipe.from_dict(full(model={"backbone": "resnet18", "image_size": 32,
                                     "aggregator": {"name": "gem", "p": "1e-1"}}))
    assert r.model.aggregator == {"name": "gem", "p": 0.1}


@pytest.mark.parametrize("text, message", [
    ("model: {backbone: resnet18}\ndata: {}\nmodel: {backbone: resnet50}\n",
     "duplicate key 'model' at line 3 (first at line 1)"),
    ("optim:\n  lr: 1.0e-4\n  gamma: 0.5\n  lr: 1.0e-3\n",
     "duplicate key 'lr' at line 4 (first at line 2)"),
    ("model:\n  aggregator: {name: gem, p: 3, p: 4}\n", "duplicate key 'p' at line 2"),
])
def test_duplicate_keys_at_any_level_are_refused_naming_key_and_line(tmp_path, text, message):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        Recipe.load(path)
    assert str(err.value).startswith(f"{path}: {message}") and "\n" not in str(err.value)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("model: {backbone: resnet18, image_size: 32, aggregator: {name: gem}}\n"
                    "loss:\n  loss: &ms {name: MultiSimilarityLoss, alpha: 1}\n"
                    "  miner: null\n"
                    "data: {train_shards: x, places_per_batch: 4}\n")
    assert Recipe.load(path, ["loss.loss={<<: {name: ntxent}, temperature: 0.1}"]).loss.loss == {
        "name": "ntxent", "temperature": 0.1}
    with pytest.raises(ConfigError, match="override 'loss.loss=.*': duplicate key 'name'"):
        Recipe.load(path, ["loss.loss={name: ntxent, name: fastap}"])


@pytest.mark.parametrize("override, message", [
    ("model.backbone=resnet19", "error: model.backbone: unknown backbone 'resnet19'"),
    ("model.aggregator.p=abc", "error: model.aggregator.p must be float, got 'abc'"),
    ("optim.betas=[2,3]", "error: optim.betas must be two numbers in [0, 1)"),
])
def test_check_refuses_what_a_run_would_refuse(tmp_path, capsys, override, message):
    from trainer.train import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(full()))
    assert main(["--config", str(path), "--check"]) == 0
    capsys.readouterr()
    assert main(["--config", str(path), "--check", override]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
    assert captured.out == ""
