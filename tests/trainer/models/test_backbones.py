"""Backbones: shapes, cropping, freezing, gradient flow and loading local weight files."""
from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from trainer.models.backbones import DinoV2Backbone, ResNetBackbone, build_backbone


def trainable_prefixes(module: torch.nn.Module) -> set[str]:
    return {name.split(".")[0] for name, p in module.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------- ResNet

@pytest.mark.parametrize(
    "name, crop, channels, stride",
    [
        ("resnet18", [], 512, 32), ("resnet18", [4], 256, 16), ("resnet34", [4], 256, 16),
        ("resnet50", [], 2048, 32), ("resnet50", [4], 1024, 16), ("resnet50", [3, 4], 512, 8),
        ("resnet101", [4], 1024, 16),
    ],
)
def test_resnet_channels_and_map_size(name, crop, channels, stride):
    bb = build_backbone(name, layers_to_crop=crop).eval()
    assert bb.out_channels == channels and bb.stride == stride
    assert not hasattr(bb, "fc") and all(not hasattr(bb, f"layer{i}") for i in crop)
    with torch.no_grad():
        for size in [(64, 64), (70, 45)]:
            fmap, cls = bb(torch.randn(1, 3, *size))
            assert cls is None
            assert fmap.shape == (1, channels, *bb.feature_hw(size))
    assert bb.feature_hw(320) == (320 // stride, 320 // stride)


def test_resnet_320_gives_20x20_at_layer3():
    assert build_backbone("resnet50", layers_to_crop=[4]).feature_hw(320) == (20, 20)
    assert build_backbone("resnet18", layers_to_crop=[4]).feature_hw(320) == (20, 20)


@pytest.mark.parametrize(
    "n, frozen",
    [(-1, set()), (0, {"conv1", "bn1"}), (2, {"conv1", "bn1", "layer1", "layer2"}),
     (3, {"conv1", "bn1", "layer1", "layer2", "layer3"})],
)
def test_resnet_freezing(n, frozen):
    bb = build_backbone("resnet18", layers_to_crop=[4], layers_to_freeze=n)
    assert trainable_prefixes(bb) == {"conv1", "bn1", "layer1", "layer2", "layer3"} - frozen


def test_resnet_gradient_flows_only_where_unfrozen():
    bb = build_backbone("resnet18", layers_to_crop=[4], layers_to_freeze=2)
    fmap, _ = bb(torch.randn(2, 3, 64, 64))
    fmap.square().mean().backward()
    for name, p in bb.named_parameters():
        if name.startswith(("conv1", "bn1", "layer1", "layer2")):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_resnet_bad_options():
    with pytest.raises(ValueError, match="layers_to_crop"):
        build_backbone("resnet50", layers_to_crop=[3])
    with pytest.raises(ValueError, match="layers_to_freeze"):
        build_backbone("resnet50", layers_to_freeze=5)
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        build_backbone("resnet5O")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet_loads_a_local_torchvision_file(tmp_path, suffix):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    path = tmp_path / f"r18{suffix}"
    state = ref.state_dict()
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style checkpoint
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    bb = build_backbone("resnet18", pretrained=str(path), layers_to_crop=[4])
    fresh = build_backbone("resnet18", layers_to_crop=[4])
    for name, p in bb.state_dict().items():
        assert torch.equal(p, state[name]), name
    assert not torch.equal(fresh.conv1.weight, bb.conv1.weight)


def test_resnet_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found") as info:
        build_backbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    assert "\n" not in str(info.value)
    wrong = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), wrong)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        build_backbone("resnet18", pretrained=str(wrong))


def test_resnet_failed_download_is_one_line(monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(self, *args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="could not fetch pretrained weights for resnet18") as info:
        build_backbone("resnet18", pretrained=True)
    assert "\n" not in str(info.value) and "local" in str(info.value)
    with pytest.raises(ValueError, match="unknown pretrained weights"):
        build_backbone("resnet18", pretrained="IMAGENET9K")


# --------------------------------------------------------------------------------- DINOv2

@pytest.fixture(scope="module")
def dino_small() -> DinoV2Backbone:
    torch.manual_seed(0)
    return build_backbone("dinov2_small", image_size=98, unfreeze_last_blocks=1)


def test_dinov2_tokens_at_any_multiple_of_14(dino_small):
    assert dino_small.out_channels == 384 and dino_small.num_prefix_tokens == 5  # CLS + 4 registers
    with torch.no_grad():
        for size in [(56, 56), (98, 70)]:
            fmap, cls = dino_small(torch.randn(2, 3, *size))
            assert fmap.shape == (2, 384, size[0] // 14, size[1] // 14)
            assert cls.shape == (2, 384)
        tokens = dino_small.model.forward_features(torch.randn(1, 3, 56, 56))
        fmap, cls = dino_small(torch.randn(1, 3, 56, 56))
    assert tokens.shape[1] == 5 + 16
    with pytest.raises(ValueError, match="multiple of 14"):
        dino_small(torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match="multiple of 14"):
        build_backbone("dinov2_small", image_size=500)


def test_dinov2_patch_map_layout(dino_small):
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        tokens = dino_small.model.forward_features(x)
        fmap, cls = dino_small(x)
    assert torch.equal(cls, tokens[:, 0])
    # patch (row 1, col 2) of a 3x4 grid is token 5 + 1*4 + 2
    assert torch.equal(fmap[0, :, 1, 2], tokens[0, 5 + 6])


def test_dinov2_only_last_blocks_and_norm_train(dino_small):
    trainable = {n for n, p in dino_small.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.blocks.11.", "model.norm.")) for n in trainable)
    assert any(n.startswith("model.norm.") for n in trainable)
    fmap, cls = dino_small(torch.randn(1, 3, 56, 56))
    (fmap.mean() + cls.mean()).backward()
    for name, p in dino_small.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    dino_small.zero_grad(set_to_none=True)


@pytest.mark.parametrize("n, blocks", [(0, set()), (3, {9, 10, 11}), (-1, set(range(12)))])
def test_dinov2_unfreeze_counts(dino_small, n, blocks):
    try:
        dino_small.model.requires_grad_(True)
        dino_small._freeze(n)
        got = {int(name.split(".")[2]) for name, p in dino_small.named_parameters()
               if p.requires_grad and name.startswith("model.blocks.")}
        assert got == blocks
        assert dino_small.model.norm.weight.requires_grad
        assert dino_small.model.patch_embed.proj.weight.requires_grad == (n < 0)
    finally:  # the fixture is shared: restore the default (last block + norm)
        dino_small.model.requires_grad_(True)
        dino_small._freeze(1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dinov2_loads_a_local_file(tmp_path, dino_small, suffix):
    state = dino_small.model.state_dict()  # timm layout at a 7x7 grid
    path = tmp_path / f"dino{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(1)
    same = build_backbone("dinov2_small", pretrained=str(path), image_size=98)
    for name, p in same.model.state_dict().items():
        assert torch.equal(p, state[name]), name
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(same(x)[0], dino_small(x)[0], atol=1e-5)
    bigger = build_backbone("dinov2_small", pretrained=str(path), image_size=140)  # pos-embed resampled
    assert bigger.model.pos_embed.shape[1] == 100
    assert torch.equal(bigger.model.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])


def test_dinov2_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_backbone("dinov2_small", pretrained=str(tmp_path / "nope.safetensors"), image_size=56)
    wrong = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(ValueError, match="dinov2_small") as info:
        build_backbone("dinov2_small", pretrained=str(wrong), image_size=56)
    assert "\n" not in str(info.value)
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("Max retries exceeded with url: huggingface.co\nTraceback...")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="could not fetch pretrained weights for vit_small") as info:
        build_backbone("dinov2_small", pretrained=True, image_size=56)
    assert "\n" not in str(info.value)


def test_family_specific_options_are_rejected():
    with pytest.raises(ValueError, match="apply to ResNets"):
        build_backbone("dinov2_small", layers_to_crop=[4], image_size=56)
    assert isinstance(build_backbone("vit_small_patch14_reg4_dinov2", image_size=56), DinoV2Backbone)
    assert isinstance(build_backbone("ResNet18"), ResNetBackbone)
