"""The loop's parts: schedules, optimizers, frozen BatchNorm, checkpoints and RNG state."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from trainer.checkpoint import CheckpointStore, rng_state, set_rng_state
from trainer.optim import build_optimizer, build_scheduler, lr_factor
from trainer.recipe import OptimConfig
from trainer.train import param_digest, set_train_mode


def test_warmup_then_multistep_at_epoch_milestones():
    cfg = OptimConfig(lr=2e-4, schedule="multistep", warmup_steps=4, milestones=[2, 3], gamma=0.3)
    f = lr_factor(cfg, total_steps=50, steps_per_epoch=10)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(19) == 1.0 and f(20) == pytest.approx(0.3) and f(30) == pytest.approx(0.09)


def test_linear_decay_to_end_factor_then_flat_and_cosine_ends_at_end_factor():
    lin = lr_factor(OptimConfig(schedule="linear", end_factor=0.2, decay_steps=100), 1000, 10)
    assert lin(0) == 1.0 and lin(50) == pytest.approx(0.6) and lin(100) == lin(500) == pytest.approx(0.2)
    cos = lr_factor(OptimConfig(schedule="cosine", end_factor=0.1, warmup_steps=10), 110, 10)
    assert cos(9) == 1.0 and cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)


def test_scheduler_steps_per_update_and_resumes_from_its_state():
    model = nn.Linear(2, 2)
    cfg = OptimConfig(optimizer="sgd", lr=1.0, schedule="linear", decay_steps=10)
    opt = build_optimizer(model.parameters(), cfg)
    sched = build_scheduler(opt, cfg, 10, 5)
    for _ in range(4):
        opt.step()
        sched.step()
    opt2 = build_optimizer(model.parameters(), cfg)
    sched2 = build_scheduler(opt2, cfg, 10, 5)
    sched2.load_state_dict(sched.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.6)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert isinstance(build_optimizer(model.parameters(), OptimConfig(optimizer="adamw")),
                      torch.optim.AdamW)


def test_frozen_batchnorm_stays_in_eval_and_keeps_its_statistics():
    from trainer.models import build_model

    model = build_model({"backbone": "resnet18", "image_size": 32, "layers_to_crop": [4],
                         "layers_to_freeze": 1, "aggregator": {"name": "gem"}})
    set_train_mode(model, freeze_bn_stats=True)
    frozen, trained = model.backbone.bn1, model.backbone.layer2[0].bn1
    assert not frozen.training and trained.training
    before = frozen.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(frozen.running_mean, before)
    set_train_mode(model, freeze_bn_stats=False)          # the upstream behaviour
    assert frozen.training
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(frozen.running_mean, before)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_rng_state_round_trip():
    set_rng_state(rng := rng_state())
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_checkpoints_are_complete_or_ignored_and_pruned(tmp_path):
    store = CheckpointStore(str(tmp_path))
    assert store.latest() is None
    for step in (2, 4, 6):
        store.save(step, {"step": step}, {"rank": 0}, 0, 1, lambda ok: ok, keep=2)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == [
        "latest.json", "step-000000004", "step-000000006"]
    # a save killed before complete.json is never "latest", and is cleaned up by the next save
    half = tmp_path / "checkpoints" / "step-000000008"
    half.mkdir()
    (half / "state.pt").write_bytes(b"partial")
    assert store.latest().endswith("step-000000006")
    shared, mine, info = CheckpointStore.load(store.latest(), 0)
    assert shared == {"step": 6} and mine == {"rank": 0} and info["world_size"] == 1
    assert CheckpointStore.load(store.latest(), 1)[1] is None      # no such rank
    # a stale pointer falls back to the newest complete checkpoint
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step-000000002"}))
    assert store.latest().endswith("step-000000006")
    assert CheckpointStore.resolve(str(tmp_path), "elsewhere").endswith("step-000000006")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        CheckpointStore.resolve(str(half), str(tmp_path))
    store.save(10, {"step": 10}, {"rank": 0}, 0, 1, lambda ok: ok, keep=2)
    assert not half.exists()


def test_param_digest_sees_one_changed_value():
    m = nn.Linear(3, 2)
    d = param_digest(m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-6
    assert param_digest(m) != d
