"""End-to-end training runs on tiny place shards made by the real converter.

Real parts only: ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo),
a real SIGKILL, a moto S3 server, TensorBoard event files read back with
tensorboard's EventAccumulator, and ``python -m retrieval evaluate`` on ``RUN/best``.
"""
from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml
from PIL import Image

from conftest import PYTHON, REPO, earthloc_query_name, earthloc_tile_path, free_port, run_env
from shard_tools.__main__ import main as shard_main

# 24 places 6 tiles apart (no footprint overlap), 4 years each
TILES = [f"08_{r:04d}_{c:04d}" for r in range(100, 124, 6) for c in range(60, 96, 6)]
YEARS = (2018, 2019, 2020, 2021)


def place_jpeg(place: int, variant: int, side: int = 48) -> bytes:
    """A place's own coarse colour layout plus per-image noise: learnable, not identical."""
    base = np.random.default_rng(place).uniform(0, 255, (4, 4, 3))
    big = np.kron(base, np.ones((side // 4, side // 4, 1)))
    noise = np.random.default_rng(10_000 + 97 * place + variant).normal(0, 25, big.shape)
    im = Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def _convert(src: Path, dst: Path, kind: str, size: int) -> Path:
    assert shard_main(["convert", "--no-progress", "--format", "earthloc", "--kind", kind,
                       "--input", str(src), "--output", str(dst), "--shard-size", str(size)]) == 0
    return dst


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """Training places (8 shards of 3), the same with mined queries (every other place paired
    with a query of its own), validation database (2021 tiles) and queries."""
    root = tmp_path_factory.mktemp("train-data")
    pairs = {}
    for p, tile in enumerate(TILES):
        for y, year in enumerate(YEARS):
            _write(root / "db", earthloc_tile_path(tile, year), place_jpeg(p, y))
        _write(root / "q", earthloc_query_name(tile, p, shift=0.05), place_jpeg(p, 50))
        if p % 2 == 0:
            mined = earthloc_query_name(tile, 100 + p, shift=0.03)
            _write(root / "mined", mined, place_jpeg(p, 60))
            pairs[earthloc_tile_path(tile, YEARS[-1])] = [mined]
    (root / "pairs.json").write_text(json.dumps(pairs))
    assert shard_main(["convert", "--no-progress", "--format", "earthloc", "--kind", "places",
                       "--input", str(root / "db"), "--output", str(root / "places-q"),
                       "--shard-size", "3", "--queries", str(root / "mined"),
                       "--query-pairs", str(root / "pairs.json")]) == 0
    db2021 = root / "db2021"
    for path in (root / "db").rglob("*.jpg"):
        if "/2021_" in str(path):
            _write(db2021, str(path.relative_to(root / "db")), path.read_bytes())
    return {"places": _convert(root / "db", root / "places", "places", 3),
            "places_q": root / "places-q",
            "database": _convert(db2021, root / "val-db", "images", 6),
            "queries": _convert(root / "q", root / "val-q", "images", 6)}


def recipe(shards: dict[str, Path], run_dir, **sections) -> dict:
    """A tiny full recipe: resnet18 at 32 px, 4 places x 4 images, 3 batches per epoch."""
    out = {
        "model": {"backbone": "resnet18", "pretrained": None, "image_size": 32,
                  "layers_to_crop": [4], "layers_to_freeze": 0,
                  "aggregator": {"name": "gem"}, "projection_dim": 16},
        "loss": {"loss": {"name": "MultiSimilarityLoss"}, "miner": {"name": "MultiSimilarityMiner"},
                 "overlap_aware": True},
        "data": {"train_shards": str(shards["places"]), "places_per_batch": 4,
                 "images_per_place": 4, "augment": "none", "workers": 0, "shuffle_buffer": 12,
                 "seed": 1},
        "optim": {"optimizer": "adam", "lr": 3.0e-3, "schedule": "cosine", "warmup_steps": 2,
                  "end_factor": 0.1},
        "train": {"run_dir": str(run_dir), "epochs": 3, "seed": 5, "checkpoint_every": 2,
                  "keep_checkpoints": 2},
        "eval": {"database_shards": str(shards["database"]),
                 "query_shards": str(shards["queries"]),
                 "protocol": "apl", "rotations": [0, 90], "ks": [1, 5, 10], "metric": "R@5",
                 "batch_size": 16, "workers": 1},
        "log": {"every_steps": 1, "progress": False},
    }
    for section, values in sections.items():
        out[section].update(values)
    return out


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            out.setdefault("image:" + tag, []).append((0, 1.0))
    return out


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))



def _env() -> dict:
    env = run_env()
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


# ---------------------------------------------------------------- two processes

@pytest.mark.slow
def test_two_process_ddp_learns_stays_in_step_and_logs(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", recipe(tiny_data, run, data={"workers": 1}))
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "trainer", "--config", str(cfg)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 9   # 3 epochs x 3 batches
    digests = summary["param_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]            # DDP kept ranks in step

    tb = scalars(run)
    for tag in ("train/loss", "train/lr", "train/batch_acc", "train/mined_pos", "train/mined_neg",
                "train/removed_neg", "perf/images_per_s", "perf/data_wait_fraction",
                "data/skipped", "data/mined_queries", "val/R@1", "val/R@5", "val/R@10", "val/best_R@5"):
        assert tag in tb, f"{tag} missing from the event files ({sorted(tb)})"
    assert "image:data/batch" in tb
    loss = [v for _, v in sorted(tb["train/loss"])]
    assert len(loss) == 9
    assert np.mean(loss[-3:]) < np.mean(loss[:3])                    # it learns
    lr = dict(tb["train/lr"])
    assert lr[1] < lr[2] and lr[9] < lr[3]                           # warm-up, then decay
    assert [s for s, _ in sorted(tb["val/R@5"])] == [3, 6, 9]        # every epoch

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["run_dir"] == str(run) and saved["optim"]["lr"] == 3.0e-3
    best = json.loads((run / "best" / "config.json").read_text())
    assert best["extra"]["metric"] == "R@5"
    assert best["extra"]["value"] == max(v for _, v in tb["val/R@5"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest.json", "step-000000008", "step-000000009"]

    # the best encoder is what `python -m retrieval evaluate --model` takes
    ev = subprocess.run([PYTHON, "-m", "retrieval", "evaluate", "--model", str(run / "best"),
                         "--database", str(tiny_data["database"]), "--queries",
                         str(tiny_data["queries"]), "--protocol", "apl", "--regions", "all",
                         "--rotations", "0,90", "--k", "1,5,10", "--cache", str(tmp_path / "c"),
                         "--output", str(tmp_path / "report.json"), "--no-progress"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["average"]["5"] == pytest.approx(best["extra"]["value"], abs=1e-6)


# ---------------------------------------------------------------- kill and resume

def _train_cmd(cfg: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "trainer", "--config", str(cfg), "--no-progress", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_latest_gives_the_uninterrupted_weights(tiny_data, tmp_path):
    # no validation here: only the training state matters
    base = recipe(tiny_data, None, train={"epochs": 4}, eval={"database_shards": None,
                                                               "query_shards": None})
    base["loss"]["miner"] = {"name": "BatchHardMiner"}
    # mined queries in the batches: the run's mined-query total must also survive the kill
    base["data"].update(train_shards=str(tiny_data["places_q"]), mine_queries=True)
    a, b = tmp_path / "a", tmp_path / "b"
    cfg_a = write_recipe(tmp_path / "a.yaml", {**base, "train": {**base["train"], "run_dir": str(a)}})
    cfg_b = write_recipe(tmp_path / "b.yaml", {**base, "train": {**base["train"], "run_dir": str(b)}})

    done = subprocess.run(_train_cmd(cfg_a), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_train_cmd(cfg_b), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = b / "checkpoints" / "latest.json"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if latest.exists():
            step = json.loads(latest.read_text())["step"]
            if step >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(30)
    assert killed_at is not None, "the run ended before it could be killed"
    assert not (b / "final").exists()

    resumed = subprocess.run(_train_cmd(cfg_b, "--resume", "latest"), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    wa, wb = load_weights(a / "final"), load_weights(b / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sb["updates"] == 24   # 4 epochs x 6 batches on one rank
    assert sa["mined_queries"] == sb["mined_queries"] == 4 * 12   # 12 paired places, 4 epochs


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown key 'lrr' in section 'optim'; did you mean 'lr'?"),
    ("train.epochs=many", "train.epochs must be int, got 'many'"),
    ("loss.query_aware=true", "loss.query_aware needs data.mine_queries"),
    ("evl.metric=R@1", "unknown key 'evl' in the recipe (sections); did you mean 'eval'?"),
])
def test_config_errors_are_one_line_exit_2_before_any_work(tiny_data, tmp_path, capsys,
                                                            override, message):
    from trainer.train import main

    run = tmp_path / "run"
    cfg = write_recipe(tmp_path / "r.yaml", recipe(tiny_data, run))
    assert main(["--config", str(cfg), override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not run.exists()                              # nothing was built or written


def test_config_error_exit_status_of_the_command(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("model: {backbone: resnet18, image_sise: 32}\n")
    proc = subprocess.run([PYTHON, "-m", "trainer", "--config", str(cfg)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: unknown key 'image_sise' in section 'model'; "
                                   "did you mean 'image_size'?")


def test_missing_shards_is_a_one_line_error(tiny_data, tmp_path, capsys):
    from trainer.train import main

    cfg = write_recipe(tmp_path / "r.yaml", recipe(tiny_data, tmp_path / "run"))
    assert main(["--config", str(cfg), f"data.train_shards={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0]
    assert main(["--config", str(cfg), "data.train_shards=null"]) == 2
    assert "data.train_shards is not set" in capsys.readouterr().err
    assert main(["--config", str(cfg), "--resume", str(tmp_path / "no-ckpt")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err



@pytest.mark.parametrize("workers", [0, 1])
def test_no_usable_place_while_streaming_is_one_line_exit_2(tiny_data, tmp_path, workers):
    """Found only while streaming (every place has 4 images, the recipe asks 50), inline or
    in a DataLoader worker, whose re-raised error carries the worker's traceback."""
    cfg = write_recipe(tmp_path / "r.yaml", recipe(tiny_data, tmp_path / "run"))
    proc = subprocess.run([PYTHON, "-m", "trainer", "--config", str(cfg), "--no-progress",
                           "data.images_per_place=50", f"data.workers={workers}"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [errors[0]] and errors[0].startswith("error: no usable place in the shards "
                                                          "of rank 0"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- S3 run folder



@pytest.mark.s3
@pytest.mark.slow
def test_s3_run_folder(tiny_data, tmp_path, s3_env):
    from shard_tools import storage
    from trainer.recipe import Recipe
    from trainer.train import Trainer

    run = "s3://streamloc-test/runs/tiny"
    data = recipe(tiny_data, run, train={"epochs": 1, "checkpoint_every": 1},
                  data={"steps_per_epoch": 3},
                  log={"local_dir": str(tmp_path / "tb")})
    trainer = Trainer(Recipe.from_dict(data, name="tiny"), progress=False)
    try:
        trainer.setup()
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["updates"] == 3
    for rel in ("config.yaml", "checkpoints/latest.json", "best/model.safetensors",
                "best/config.json", "final/model.safetensors", "summary.json",
                "eval/update-000000003.json"):
        assert storage.exists(f"{run}/{rel}"), rel
    latest = storage.read_json(f"{run}/checkpoints/latest.json")
    assert latest["step"] == 3
    fs, _ = storage.filesystem(run)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("streamloc-test/runs/tiny/checkpoints",
                                                         refresh=True))
    assert names == ["latest.json", "step-000000002", "step-000000003"]     # kept 2
    assert [p for p in fs.ls("streamloc-test/runs/tiny/tensorboard", refresh=True)
            if "tfevents" in p]

    # resuming from the S3 folder picks up where it stopped (nothing left to do)
    again = Trainer(Recipe.from_dict(data, name="tiny"), progress=False)
    try:
        again.setup("latest")
        assert again.state.update == 3 and again.state.epoch == 1
        assert again.fit()["updates"] == 3
    finally:
        again.close()


def test_grad_accumulation_clipping_and_frozen_parts(tiny_data, tmp_path):
    """Updates of 2 batches (the epoch's last takes the odd one), clipped; conv1 stays frozen."""
    from trainer.recipe import Recipe
    from trainer.train import Trainer

    data = recipe(tiny_data, tmp_path / "run", data={"steps_per_epoch": 3},
                  train={"epochs": 2, "grad_accum": 2, "clip_grad_norm": 0.5,
                         "checkpoint_every": None, "save_init": True},
                  eval={"database_shards": None, "query_shards": None},
                  log={"tensorboard": False})
    trainer = Trainer(Recipe.from_dict(data, name="accum"), progress=False)
    try:
        trainer.setup()
        model = trainer.acc.unwrap_model(trainer.model)
        conv1 = model.backbone.conv1.weight.detach().clone()
        layer1 = model.backbone.layer1[0].conv1.weight.detach().clone()
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["updates"] == 4 and summary["epochs"] == 2          # 2 x ceil(3 / 2)
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == [
        "latest.json", "step-000000002", "step-000000004"]                # epoch ends
    assert torch.equal(model.backbone.conv1.weight, conv1)              # layers_to_freeze: 0
    assert not torch.equal(model.backbone.layer1[0].conv1.weight, layer1)
    # RUN/init holds the starting weights (the untrained baseline), RUN/final the trained ones
    init, final = load_weights(tmp_path / "run" / "init"), load_weights(tmp_path / "run" / "final")
    key = "backbone.layer1.0.conv1.weight"
    assert np.array_equal(init[key], layer1.numpy())
    assert not np.array_equal(init[key], final[key])
