"""Training throughput: this trainer's loop against a seeds-style loop, measured in the same run.

Same model, same images, same augmentation, same loss and miner, same number of
DataLoader workers:

- (a) streamloc: ``trainer.train.Trainer`` on place shards (streaming, reduced-size
  JPEG decode, pinned memory and non-blocking copies, bf16 + channels_last on a GPU);
- (b) seeds: a map-style Dataset over the image files (one file per image, full-size
  decode, then the augmentation), a DataLoader with ``batch_size=P`` places, blocking
  copies, fp16 autocast with a GradScaler on a GPU (fp32 on the CPU), no channels_last.

Both report images/s and the fraction of step time spent waiting for data over the
last ``--steps`` updates (the first ``--steps`` warm up). Presets: ``small`` (CPU:
ResNet-18 cropped + GeM at 128 px); on a GPU ``earthloc`` (R50 + MixVPR, 320 px) and
``earthloc2`` (DINOv2-B + SALAD, 518 px), both bf16. Prints a table and one JSON line
with "speedup" (a/b), "data_wait_fraction" (of a) and "device".

    python benchmarks/train_throughput.py                      # CPU: small
    python benchmarks/train_throughput.py --preset earthloc    # GPU
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data_throughput import YEARS, make_places  # noqa: E402
from shard_tools.convert import ConvertConfig, convert  # noqa: E402
from trainer.augment import build_augmentation, normalize  # noqa: E402
from trainer.losses import build_criterion  # noqa: E402
from trainer.models import build_model, model_preset  # noqa: E402
from trainer.recipe import Recipe  # noqa: E402
from trainer.train import Trainer, set_train_mode  # noqa: E402

PRESETS = {   # name -> (model config, image side of the generated JPEGs, places per batch)
    "small": (dict(backbone="resnet18", pretrained=None, image_size=128, layers_to_crop=[4],
                   aggregator={"name": "gem"}), 256, 8),
    "earthloc": (model_preset("earthloc", pretrained=None).to_dict(), 1024, 32),
    "earthloc2": (model_preset("earthloc2-dinov2-b-salad", pretrained=None).to_dict(), 1024, 16),
}
LOSS = {"loss": {"name": "MultiSimilarityLoss"}, "miner": {"name": "MultiSimilarityMiner"}}


class PlaceFiles(Dataset):
    """(b) GSV-Cities style: item i is place i's K images, each opened and decoded in full."""

    def __init__(self, places: list[list[Path]], aug) -> None:
        self.places, self.aug = places, aug

    def __len__(self) -> int:
        return len(self.places)

    def __getitem__(self, i):
        images = []
        for path in self.places[i]:
            with Image.open(path) as im:
                # float32 normalised in the worker, as the seeds' ToTensor + Normalize do
                images.append(normalize(self.aug(im.convert("RGB"))))
        return torch.stack(images), torch.full((len(images),), i, dtype=torch.long)


def seeds_loop(model_cfg: dict, places: list[list[Path]], aug, P: int, workers: int,
               steps: int, device: torch.device) -> tuple[float, float]:
    """(images/s, data-wait fraction) over ``steps`` updates after ``steps`` of warm-up."""
    torch.manual_seed(0)
    model = build_model(model_cfg).to(device)
    set_train_mode(model)
    criterion = build_criterion(LOSS).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    loader = DataLoader(PlaceFiles(places, aug), batch_size=P, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)
    it, done, images, wait = None, 0, 0, 0.0
    t0 = None
    while done < 2 * steps:
        if it is None:
            it = iter(loader)
        tw = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            it = None
            continue
        if done == steps:
            if cuda:
                torch.cuda.synchronize()
            t0, images, wait = time.perf_counter(), 0, 0.0
            tw = t0
        wait += time.perf_counter() - tw
        x, y = x.flatten(0, 1).to(device), y.flatten().to(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            desc = model(x)
        loss, _ = criterion(desc, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss.item()             # the seeds log the loss every step (a sync)
        images += x.shape[0]
        done += 1
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return images / elapsed, wait / elapsed


def streamloc_loop(model_cfg: dict, shards: Path, run: Path, P: int, workers: int, steps: int,
                   gpu: bool) -> tuple[float, float]:
    """(images/s, data-wait fraction) of the trainer's last logging window of ``steps`` updates."""
    shutil.rmtree(run, ignore_errors=True)
    recipe = Recipe.from_dict({
        "model": model_cfg, "loss": LOSS,
        "data": {"train_shards": str(shards), "places_per_batch": P, "images_per_place": 4,
                 "augment": "earthloc", "workers": workers, "shuffle_buffer": 4 * P,
                 "resample": True, "steps_per_epoch": 2 * steps},
        "optim": {"optimizer": "adam", "lr": 1e-4},
        "train": {"run_dir": str(run), "epochs": 1, "max_steps": 2 * steps,
                  "precision": "bf16" if gpu else "fp32", "channels_last": gpu, "seed": 0},
        "log": {"every_steps": steps, "tensorboard": False, "image_grid": False, "progress": False},
    }, name="bench")
    trainer = Trainer(recipe, progress=False)
    try:
        trainer.setup()
        summary = trainer.fit()
    finally:
        trainer.close()
    return summary["images_per_s"], summary["data_wait_fraction"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="default: small on the CPU, earthloc on a GPU")
    ap.add_argument("--steps", type=int, default=6, help="timed updates (after as many warm-up)")
    ap.add_argument("--places", type=int, help="places x 4 years to generate (default: enough)")
    ap.add_argument("--places-per-batch", type=int)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workdir", help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    preset = args.preset or ("earthloc" if gpu else "small")
    model_cfg, side, P = PRESETS[preset]
    P = args.places_per_batch or P
    n_places = args.places or P * (2 * args.steps + 2)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="streamloc-train-bench-"))
    t0 = time.perf_counter()
    paths = make_places(work, n_places, side)
    shards = work / "places"
    shutil.rmtree(shards, ignore_errors=True)
    convert(ConvertConfig(format="csv", kind="places", input=str(work / "table.csv"),
                          output=str(shards), shard_size=max(1, n_places // (4 * args.workers)),
                          progress=False))
    by_place = [paths[i:i + len(YEARS)] for i in range(0, len(paths), len(YEARS))]
    print(f"made {n_places} places x {len(YEARS)} images of {side} px and their shards in "
          f"{time.perf_counter() - t0:.1f}s under {work}", flush=True)

    size = tuple(model_cfg["image_size"]) if isinstance(model_cfg["image_size"], (list, tuple)) \
        else (model_cfg["image_size"],) * 2
    aug = build_augmentation("earthloc", size)
    a = streamloc_loop(model_cfg, shards, work / "run", P, args.workers, args.steps, gpu)
    print(f"a streamloc {a[0]:8.1f} images/s  data wait {100 * a[1]:5.1f}%", flush=True)
    b = seeds_loop(model_cfg, by_place, aug, P, args.workers, args.steps, device)
    print(f"b seeds     {b[0]:8.1f} images/s  data wait {100 * b[1]:5.1f}%", flush=True)
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    out = {"benchmark": "train_throughput", "preset": preset, "device": name,
           "batch": f"{P}x4", "image_size": list(size), "workers": args.workers,
           "steps": args.steps,
           "images_per_s": {"streamloc": round(a[0], 2), "seeds": round(b[0], 2)},
           "data_wait_fraction": round(a[1], 4), "seeds_data_wait_fraction": round(b[1], 4),
           "speedup": round(a[0] / b[0], 3),
           "goals": {"data_wait_fraction": "< 0.05", "speedup": ">= 1.3 on a GPU"}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
