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
    assert type(out) is torch.Tensor and out.is_contiguous()      # the batch stack is a plain copy
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


def _without_cv2(monkeypatch, fn):
    """Run ``fn`` on the Pillow fallback (what a machine without OpenCV runs)."""
    import trainer.augment as augment
    with monkeypatch.context() as m:
        m.setattr(augment, "cv2", None)
        return fn()


def test_opencv_warp_matches_pillows_on_the_same_map(monkeypatch):
    pytest.importorskip("cv2")
    im = textured((512, 512), seed=2)
    geo = build_augmentation("earthloc", 320).transform.transforms[0]
    means = []
    for seed in range(8):
        torch.manual_seed(seed)
        params = geo.make_params([im])
        fast = geo.transform(im, params)
        slow = _without_cv2(monkeypatch, lambda: geo.transform(im, params))
        assert isinstance(slow, Image.Image) and fast.dtype == torch.uint8
        d = np.abs(fast.permute(1, 2, 0).numpy().astype(int) - np.asarray(slow).astype(int))
        means.append(d.mean())
        assert np.percentile(d, 99) <= 2      # rounding, and the rim of the rotation's black corners
    # about 0.5 grey level with the half-pixel shift between the two pixel conventions;
    # without it this image gives 1.0-2.8
    assert max(means) < 0.7


def test_opencv_color_jitter_matches_torchvisions_on_pil():
    pytest.importorskip("cv2")
    from trainer.augment import UInt8ColorJitter
    pil = textured((320, 320), seed=4)
    ours, theirs = UInt8ColorJitter(0.9, 0.9, 0.9), v2.ColorJitter(0.9, 0.9, 0.9)
    for seed in range(30):
        torch.manual_seed(seed)
        params = ours.make_params([pil])
        torch.manual_seed(seed)
        assert repr(theirs.make_params([pil])) == repr(params)      # the same draws, the same order
        want = np.asarray(theirs.transform(pil, params)).astype(int)
        got = ours.transform(pil, params)
        assert got.dtype == torch.uint8 and got.shape == (3, 320, 320)
        d = np.abs(got.permute(1, 2, 0).numpy().astype(int) - want)
        # equal but for the luma's rounding (OpenCV vs Pillow, 1 level on ~0.1% of pixels),
        # which a later step with a factor up to 1.9 can stretch
        assert d.mean() < 0.1 and np.percentile(d, 99.9) <= 2 and d.max() <= 6


def test_earthloc_without_opencv_draws_the_same_parameters(monkeypatch):
    pytest.importorskip("cv2")
    im = textured((400, 400), seed=5)
    fast = apply_grouped(build_augmentation("earthloc", 64), [im, im], [1, 2], seed=3)
    slow = _without_cv2(monkeypatch, lambda: apply_grouped(build_augmentation("earthloc", 64),
                                                           [im, im], [1, 2], seed=3))
    for a, b in zip(fast, slow):
        assert type(a) is torch.Tensor and type(b) is torch.Tensor and a.shape == b.shape == (3, 64, 64)
        assert (a.int() - b.int()).abs().float().mean() < 1.5
    assert (fast[0].int() - slow[1].int()).abs().float().mean() > 10     # another group differs
