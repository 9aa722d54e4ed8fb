"""Augmentation presets: output, decode sizes, shared parameters per group, the fused geometry."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shard_tools.jpeg import decode_jpeg
from torchvision.transforms import v2

from trainer.augment import (IMAGENET_MEAN, IMAGENET_STD, PerspectiveCropBorder, apply_grouped,
                             build_augmentation, list_augmentations, normalize)


def textured(size=(512, 512), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]] / max(size)
    base = np.stack([np.sin(xx * 17), np.cos(yy * 13), np.sin((xx + yy) * 9)], -1)
    arr = (base + rng.normal(0, 0.05, base.shape) + 1) * 110 + 10
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def test_presets_are_listed_and_unknown_names_suggest():
    assert {"earthloc", "earthloc-query", "gsv", "none"} <= set(list_augmentations())
    with pytest.raises(ValueError, match="did you mean 'gsv'"):
        build_augmentation("gvs", 64)


@pytest.mark.parametrize("name", ["earthloc", "earthloc-query", "gsv", "none"])
def test_presets_give_uint8_tensors_of_the_model_size(name):
    aug = build_augmentation(name, (48, 64))
    out = aug(textured((200, 150)))
    assert out.shape == (3, 48, 64) and out.dtype == torch.uint8   # normalised after Batch.to()
    assert normalize(out).dtype == torch.float32
    assert aug.decode_side >= 64


def test_normalize_equals_torchvisions_to_dtype_then_normalize():
    x = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8)
    old = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    want = torch.stack([old(im) for im in x])
    got = normalize(x)
    assert got.dtype == torch.float32 and (got - want).abs().max().item() <= 1e-6
    assert normalize(got) is got                  # float input is already normalised


def test_none_is_resize_then_imagenet_normalisation():
    im = Image.new("RGB", (40, 30), (255, 0, 128))
    out = normalize(build_augmentation("none", 16)(im))
    want = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[:, 8, 8], want.float(), atol=1e-4)


@pytest.mark.parametrize("source, decoded", [((1024, 1024), (512, 512)),   # 1/4 would be 256 < 366
                                             ((1600, 1200), (800, 600)),
                                             ((1464, 1464), (366, 366)),   # 1/4 covers it exactly
                                             ((3000, 2000), (750, 500)),
                                             ((400, 300), (400, 300))])    # too small to scale
def test_earthloc_decode_side_allows_a_draft_decode(source, decoded):
    aug = build_augmentation("earthloc", 320)
    assert aug.decode_side == round(320 * 800 / 700) == 366
    buf = io.BytesIO()
    textured(source).save(buf, format="JPEG", quality=90)
    im = decode_jpeg(buf.getvalue(), aug.decode_side)
    assert im.size == decoded            # the smallest DCT scale whose short side keeps >= 366 px


def test_grouped_images_share_random_parameters():
    aug = build_augmentation("earthloc", 64)
    im = textured((300, 300))
    a, b, c = apply_grouped(aug, [im, im, im], [2019, 2019, 2020], seed=5)
    assert torch.equal(a, b)              # same year in a batch: the same rotation, crop, jitter
    assert not torch.equal(a, c)
    again = apply_grouped(aug, [im, im, im], [2019, 2019, 2020], seed=5)
    assert all(torch.equal(x, y) for x, y in zip((a, b, c), again))
    state = torch.random.get_rng_state()
    apply_grouped(aug, [im], [None], seed=6)
    assert torch.equal(state, torch.random.get_rng_state())     # the caller's RNG is untouched
    gsv = build_augmentation("gsv", 64)
    x, y = apply_grouped(gsv, [im, im], [1, 1], seed=5)
    assert not torch.equal(x, y)          # gsv is per image


def test_fused_earthloc_geometry_equals_the_five_steps():
    im = textured((366, 366), seed=1)
    fused, steps = build_augmentation("earthloc", 320), build_augmentation("earthloc-steps", 320)
    same, other = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        x = normalize(fused(im))
        torch.manual_seed(seed)
        y = normalize(steps(im))
        torch.manual_seed(seed + 50)
        z = normalize(steps(im))
        same.append((x - y).abs().mean().item())
        other.append((x - z).abs().mean().item())
    assert max(same) < 0.1 < min(other) / 2


def test_perspective_border_is_cropped_away():
    white = Image.new("RGB", (200, 200), (255, 255, 255))
    t = PerspectiveCropBorder(0.5)
    for seed in range(10):
        torch.manual_seed(seed)
        out = np.asarray(t(white))
        assert out.min() > 200, "a black corner survived"
