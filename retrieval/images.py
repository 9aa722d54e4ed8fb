"""Images to encoder input: reduced-size JPEG decode, rotation, resize, ImageNet normalisation.

Evaluation sees images the way training does: decoded at reduced DCT scale
(``shard_tools.jpeg.decode_jpeg`` in draft mode), resized to the encoder's
``(H, W)`` and normalised with the ImageNet mean and std that every backbone
in ``trainer.models`` was pre-trained with. Rotations are counter-clockwise
multiples of 90 degrees (EarthLoc embeds each database tile at 0/90/180/270).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from shard_tools.jpeg import decode_jpeg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_270}


def check_rotations(rotations: Sequence[int]) -> tuple[int, ...]:
    """Rotations as a tuple of distinct multiples of 90 in [0, 360); ValueError otherwise."""
    out = tuple(int(r) for r in rotations)
    if not out:
        raise ValueError("at least one rotation is needed (e.g. 0)")
    bad = [r for r in out if r not in (0, 90, 180, 270)]
    if bad:
        raise ValueError(f"rotation {bad[0]} is not one of 0, 90, 180, 270")
    if len(set(out)) != len(out):
        raise ValueError(f"repeated rotation in {list(out)}")
    return out


def rotate(image: Image.Image, degrees: int) -> Image.Image:
    """Counter-clockwise rotation by a multiple of 90 (a lossless transpose)."""
    return image if degrees == 0 else image.transpose(_TRANSPOSE[degrees])


def to_tensor(image: Image.Image, size_hw: tuple[int, int]) -> torch.Tensor:
    """A ``[3, H, W]`` float tensor, resized (bilinear, antialiased) and ImageNet-normalised."""
    h, w = size_hw
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def load_views(data: bytes, size_hw: tuple[int, int], rotations: Sequence[int]
               ) -> list[torch.Tensor]:
    """One tensor per rotation of a JPEG, decoded once at reduced size."""
    image = decode_jpeg(data, draft_side=max(size_hw))
    return [to_tensor(rotate(image, r), size_hw) for r in rotations]
