"""Images to encoder input: reduced-size JPEG decode, rotation, resize, ImageNet normalisation.

Evaluation sees images the way training does: decoded at reduced DCT scale
(``shard_tools.jpeg.decode_jpeg`` in draft mode), resized to the encoder's
``(H, W)`` and normalised with the ImageNet mean and std that every backbone
in ``trainer.models`` was pre-trained with. Rotations are counter-clockwise
multiples of 90 degrees (EarthLoc embeds each database tile at 0/90/180/270).

Photographs given to ``localize`` come from cameras, not from shards: they are
turned upright by their EXIF orientation (as ``shard_tools convert --max-side``
does) and decoded at reduced DCT scale, so a 12000 x 12000 JPEG costs a few MB.
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from shard_tools.jpeg import decode_jpeg, exif_orientation

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


def decode_photo(data: bytes, min_side: int, name: str = "image") -> Image.Image:
    """An upright RGB photograph whose shorter side is at least ``min_side`` (when the file
    is that large), decoded at reduced DCT scale; ``ValueError`` naming ``name`` otherwise.

    JPEGs are decoded in draft mode (1/2, 1/4 or 1/8 scale), so Pillow's
    decompression-bomb warning, meant for full-size decodes, does not apply; a file
    that would still decode above ``Image.MAX_IMAGE_PIXELS`` (a huge PNG) is refused.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        orientation = exif_orientation(image)
        image.draft("RGB", (min_side, min_side))
        _check_decoded_size(image, name)
        image.load()
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        return image.convert("RGB") if image.mode != "RGB" else image
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{name}: too large to decode ({exc})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image Pillow can read") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{name}: cannot decode image ({exc})") from None


def _check_decoded_size(image: Image.Image, name: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    w, h = image.size
    if limit and w * h > limit:
        raise ValueError(f"{name}: {image.format or 'image'} of {w}x{h} pixels is too large to "
                         f"decode (more than {limit:,}); give a JPEG or a smaller image")


def load_photo(path: str, min_side: int) -> Image.Image:
    """``decode_photo`` of a local file (a missing file is an ``OSError`` naming it)."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_photo(data, min_side, path)
