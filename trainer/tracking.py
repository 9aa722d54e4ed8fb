"""TensorBoard through accelerate's tracker: scalars, one batch as an image grid, hparams.

Event files go to ``RUN/tensorboard``. For a remote run folder (``s3://``) they are
written to a local folder (``log.local_dir``, else a temporary one) and copied up
by ``sync()`` at every checkpoint and at the end, since TensorBoard's writer
appends to files and object stores have no append.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections import defaultdict
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from shard_tools import storage

__all__ = ["WindowMeter", "RunTracker", "batch_grid", "TB_PROJECT"]

log = logging.getLogger(__name__)

TB_PROJECT = "tensorboard"


class WindowMeter:
    """Sums over a logging window; tensors stay on the device until read (no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, name: str, value: Any, n: int = 1) -> None:
        if isinstance(value, Tensor):
            value = value.detach().float()
        self.sums[name] = self.sums[name] + value
        self.counts[name] += n

    def total(self, name: str) -> float:
        v = self.sums.get(name, 0.0)
        return float(v.item() if isinstance(v, Tensor) else v)

    def mean(self, name: str) -> float:
        n = self.counts.get(name, 0)
        return self.total(name) / n if n else math.nan

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def batch_grid(images: Tensor, labels: Tensor, is_query: Tensor, per_row: int,
               max_places: int = 8) -> Tensor:
    """``[3, H, W]`` uint8: one row per place (its database images, then its queries),
    the place's label written in the first tile; from uint8 or ImageNet-normalised input."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    labels, is_query = labels.cpu(), is_query.cpu()
    places = sorted(set(labels.tolist()))[:max_places]
    cols = per_row + int(bool(is_query.any()))
    tiles = []
    for p in places:
        rows = [i for i in range(len(labels)) if labels[i] == p and not is_query[i]][:per_row]
        rows += [i for i in range(len(labels)) if labels[i] == p and is_query[i]][:cols - len(rows)]
        for j in range(cols):
            if j < len(rows):
                x = images[rows[j]].detach().cpu()
                if x.is_floating_point():      # normalised: undo ImageNet's mean and std
                    im = (x.float() * std + mean).clamp(0, 1)
                else:                          # uint8 as the loader ships it
                    im = x.float() / 255.0
                if j == 0:
                    pil = Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype("uint8"))
                    ImageDraw.Draw(pil).text((2, 2), f"place {p}", fill=(255, 255, 0))
                    im = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1) / 255.0
                tiles.append(im)
            else:
                tiles.append(torch.zeros(images.shape[1:], dtype=torch.float32))
    grid = make_grid(torch.stack(tiles), nrow=cols, padding=2)
    return (grid * 255).round().to(torch.uint8)


class RunTracker:
    """The main process's TensorBoard writer (others do nothing)."""

    def __init__(self, accelerator, run_dir: str, logging_dir: str, enabled: bool) -> None:
        self.acc = accelerator
        self.run_dir = run_dir
        self.remote = storage.is_remote(run_dir)
        self.enabled = enabled and accelerator.is_main_process
        self.writer = None
        self.logging_dir = logging_dir
        self.tb_dir = os.path.join(logging_dir, TB_PROJECT)

    @staticmethod
    def logging_dir_for(run_dir: str, local_dir: str | None = None) -> str:
        """Where event files are written: the run folder itself, or a local stand-in."""
        if not storage.is_remote(run_dir):
            return storage.normalize(run_dir)
        if local_dir:
            return local_dir
        tag = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
        return os.path.join(tempfile.gettempdir(), f"streamloc-tb-{tag}")

    def start(self) -> None:
        if not self.enabled:
            return
        self.acc.init_trackers(TB_PROJECT)
        self.writer = self.acc.get_tracker("tensorboard", unwrap=True)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            self.acc.log({k: float(v) for k, v in values.items() if v is not None
                          and not (isinstance(v, float) and math.isnan(v))}, step=step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, global_step=step, dataformats="CHW")
            self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The recipe with the final metrics (TensorBoard's HPARAMS tab)."""
        if self.writer is not None:
            clean = {k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}
            self.writer.add_hparams(dict(hparams), clean, run_name=".")
            self.writer.flush()

    def sync(self) -> None:
        """Copy the event files to a remote run folder (a no-op for local runs)."""
        if self.writer is None or not self.remote:
            return
        self.writer.flush()
        for root, _, files in os.walk(self.tb_dir):
            for name in files:
                local = os.path.join(root, name)
                rel = os.path.relpath(local, self.logging_dir).replace(os.sep, "/")
                with open(local, "rb") as f:
                    storage.write_bytes_atomic(storage.join(self.run_dir, rel), f.read())

    def finish(self) -> None:
        """Close the event files. Not ``Accelerator.end_training``: that also destroys
        the process group, here on the main process only, and the other ranks' final
        barrier (``leave_process_group``) would then fail."""
        if self.writer is not None:
            self.sync()
            for tracker in self.acc.trackers:
                tracker.finish()
            self.writer = None
