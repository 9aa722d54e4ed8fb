"""Augmentation presets by name (torchvision v2), with the decode size each one needs.

A preset knows the smallest image side it needs before its first resize, so the
loader can decode JPEGs in draft mode (DCT scaling) at a fraction of the cost of
a full decode. ``earthloc`` works at the reduced scale throughout: EarthLoc loads
at 800 px, crops 700 and resizes to 320, so the same geometry is applied at
``320 * 800 / 700`` px and nothing is computed at a resolution that is thrown away.

Randomness comes from torch's global generator. ``apply_grouped`` runs each group
of images (EarthLoc: one year of a batch) from one seed, so every image of a
group gets the same random parameters, and a batch's augmentation depends only
on its seed (exact resume), never on what was augmented before.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["AUGMENTATIONS", "Augmentation", "PerspectiveCropBorder", "build_augmentation",
           "list_augmentations", "apply_grouped", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BILINEAR = InterpolationMode.BILINEAR


class PerspectiveCropBorder(v2.Transform):
    """Random perspective, then the largest axis-aligned box inside the warped image.

    torchvision's RandomPerspective fills the area outside the warped quad with
    black; EarthLoc crops that border away so no black corner reaches the model.
    """

    def __init__(self, distortion_scale: float = 0.5, p: float = 1.0) -> None:
        super().__init__()
        self.distortion_scale = distortion_scale
        self.p = p

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.functional.get_size(flat_inputs[0])
        if torch.rand(1).item() >= self.p:
            return {"apply": False}
        d = self.distortion_scale
        hw, hh = w // 2, h // 2
        dx = lambda: int(torch.randint(0, int(d * hw) + 1, (1,)).item())  # noqa: E731
        dy = lambda: int(torch.randint(0, int(d * hh) + 1, (1,)).item())  # noqa: E731
        tl = [dx(), dy()]
        tr = [w - 1 - dx(), dy()]
        br = [w - 1 - dx(), h - 1 - dy()]
        bl = [dx(), h - 1 - dy()]
        start = [[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]]
        end = [tl, tr, br, bl]
        left, right = max(tl[0], bl[0]), min(tr[0], br[0])
        top, bottom = max(tl[1], tr[1]), min(bl[1], br[1])
        return {"apply": True, "start": start, "end": end, "box": (top, left, bottom - top + 1,
                                                                     right - left + 1)}

    # torchvision < 0.21 calls it _get_params
    def _get_params(self, flat_inputs: list) -> dict:
        return self.make_params(flat_inputs)

    def transform(self, inpt, params: dict):
        if not params["apply"]:
            return inpt
        out = F.perspective(inpt, params["start"], params["end"], interpolation=BILINEAR)
        top, left, height, width = params["box"]
        return F.crop(out, top, left, height, width)

    def _transform(self, inpt, params: dict):
        return self.transform(inpt, params)


@dataclass(frozen=True)
class Augmentation:
    """A preset built for one output size.

    ``decode_side``: the short side a JPEG must keep after draft decoding;
    ``grouped``: whether images of one group share random parameters.
    """

    name: str
    transform: Callable[[Image.Image], Tensor]
    decode_side: int
    grouped: bool = False

    def __call__(self, image: Image.Image) -> Tensor:
        return self.transform(image)


def _finish() -> list:
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def _earthloc(size: tuple[int, int], brightness: float = 0.9, contrast: float = 0.9,
              saturation: float = 0.9) -> Augmentation:
    side = max(size)
    base = round(side * 800 / 700)            # EarthLoc's 800 px load, at the output's scale
    crop = round(base * 700 / 800)            # RandomCrop(700) at the same scale
    t = v2.Compose([
        v2.Resize(base, interpolation=BILINEAR, antialias=True),
        v2.RandomRotation(45, interpolation=BILINEAR),
        v2.RandomCrop(crop, pad_if_needed=True),
        PerspectiveCropBorder(0.5),
        v2.Resize(size, interpolation=BILINEAR, antialias=True),
        v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation),
        *_finish(),
    ])
    return Augmentation("earthloc", t, base, grouped=True)


def _earthloc_query(size: tuple[int, int]) -> Augmentation:
    t = v2.Compose([v2.RandomRotation(45, interpolation=BILINEAR),
                    v2.Resize(size, interpolation=BILINEAR, antialias=True), *_finish()])
    return Augmentation("earthloc-query", t, max(size))


def _gsv(size: tuple[int, int]) -> Augmentation:
    t = v2.Compose([v2.Resize(size, interpolation=BILINEAR, antialias=True),
                    v2.RandAugment(num_ops=3, interpolation=BILINEAR), *_finish()])
    return Augmentation("gsv", t, max(size))


def _none(size: tuple[int, int]) -> Augmentation:
    t = v2.Compose([v2.Resize(size, interpolation=BILINEAR, antialias=True), *_finish()])
    return Augmentation("none", t, max(size))


AUGMENTATIONS: dict[str, Callable[..., Augmentation]] = {
    "earthloc": _earthloc,
    "earthloc-query": _earthloc_query,
    "gsv": _gsv,
    "none": _none,
}


def list_augmentations() -> list[str]:
    return sorted(AUGMENTATIONS)


def build_augmentation(name: str, image_size: int | Sequence[int], **kwargs) -> Augmentation:
    """A preset by name for an output size (int or (H, W)); keyword args go to the preset."""
    if name not in AUGMENTATIONS:
        close = difflib.get_close_matches(str(name), list(AUGMENTATIONS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown augmentation '{name}'{hint} (choose from "
                         f"{', '.join(list_augmentations())})")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return AUGMENTATIONS[name](tuple(int(v) for v in size), **kwargs)


def apply_grouped(aug: Augmentation, images: Sequence[Image.Image], groups: Sequence[object],
                  seed: int) -> list[Tensor]:
    """Augment ``images``; images whose group is equal share random parameters when the
    preset is grouped (each image gets its own otherwise). Deterministic in ``seed``; the
    caller's torch random state is left untouched."""
    out: list[Tensor] = []
    group_ids: dict[object, int] = {}
    with torch.random.fork_rng(devices=[]):
        for i, (im, g) in enumerate(zip(images, groups)):
            if aug.grouped and g is not None:
                sub = group_ids.setdefault(g, len(group_ids))
                torch.manual_seed((seed * 1_000_003 + 7919 * sub + 1) % (2 ** 63))
            else:
                torch.manual_seed((seed * 1_000_003 + 104_729 * (i + 1) + 2) % (2 ** 63))
            out.append(aug(im))
    return out
