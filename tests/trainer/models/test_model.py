"""The whole encoder: presets, config validation, freezing, precision, save/load."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision

from trainer.models import (
    PRESETS,
    LocalizationModel,
    ModelConfig,
    build_model,
    list_presets,
    load_encoder,
    model_preset,
    save_encoder,
)

MIXVPR_4096 = 2_337_604
CONVAP_4096 = 2_098_176
COSPLACE_512 = 131_585
SALAD_B = 1_755_745
SALAD_S = 899_161
SALAD_L = 1024 * 512 + 512 + 512 * 1024 + 1024 + 2 * (1024 * 512 + 512) + 512 * 64 + 64 + 512 * 48 + 48 + 1
PROJ_4096 = 4096 * 4096 + 4096


def n_params(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def resnet_params(name: str, stages: int) -> int:
    with torch.device("meta"):
        net = getattr(torchvision.models, name)()
    parts = [net.conv1, net.bn1] + [getattr(net, f"layer{i}") for i in range(1, stages + 1)]
    return sum(n_params(m) for m in parts)


def vit_params(arch: str) -> int:
    with torch.device("meta"):
        return n_params(timm.create_model(arch, num_classes=0))


EXPECTED = {  # preset -> (descriptor dim, expected parameter count from independent parts)
    "earthloc": (4096, lambda: resnet_params("resnet50", 3) + MIXVPR_4096 + PROJ_4096),
    "gsv-mixvpr-r50": (4096, lambda: resnet_params("resnet50", 3) + MIXVPR_4096),
    "gsv-convap-r50": (4096, lambda: resnet_params("resnet50", 4) + CONVAP_4096),
    "r18-cosplace512": (512, lambda: resnet_params("resnet18", 3) + COSPLACE_512),
    "earthloc2-dinov2-s-salad": (2048, lambda: vit_params("vit_small_patch14_reg4_dinov2") + SALAD_S),
    "earthloc2-dinov2-b-salad": (3072, lambda: vit_params("vit_base_patch14_reg4_dinov2") + SALAD_B),
    "earthloc2-dinov2-l-salad": (4096, lambda: vit_params("vit_large_patch14_reg4_dinov2") + SALAD_L),
    "earthloc2-dinov2-s": (384, lambda: vit_params("vit_small_patch14_reg4_dinov2")),
    "earthloc2-dinov2-b": (768, lambda: vit_params("vit_base_patch14_reg4_dinov2")),
    "earthloc2-dinov2-l": (1024, lambda: vit_params("vit_large_patch14_reg4_dinov2")),
}


def test_every_preset_is_covered():
    assert set(PRESETS) == set(EXPECTED) == set(list_presets())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_dims_and_parameter_counts(name):
    dim, params = EXPECTED[name]
    cfg = model_preset(name, pretrained=None)
    with torch.device("meta"):  # structure only: no memory, no init cost
        model = build_model(cfg)
        out = model(torch.empty(2, 3, *cfg.image_hw))
    assert model.descriptor_dim == dim and out.shape == (2, dim)
    assert n_params(model) == params()


def test_preset_recipes():
    e = model_preset("earthloc")
    assert (e.backbone, e.image_hw, e.layers_to_crop, e.layers_to_freeze, e.projection_dim) == (
        "resnet50", (320, 320), [4], 2, 4096)
    assert e.aggregator == {"name": "mixvpr", "out_channels": 1024, "mix_depth": 4, "mlp_ratio": 1, "out_rows": 4}
    assert e.pretrained is True
    for size, name in zip((24, 32, 48), ("s", "b", "l")):
        cfg = model_preset(f"earthloc2-dinov2-{name}-salad")
        assert cfg.image_hw == (518, 518) and cfg.unfreeze_last_blocks == 1
        assert cfg.aggregator["num_clusters"] == size and cfg.aggregator["cluster_dim"] == 64
    c = model_preset("gsv-convap-r50")
    assert c.layers_to_crop == [] and c.aggregator["out_channels"] == 1024
    r = model_preset("r18-cosplace512")
    assert r.backbone == "resnet18" and r.layers_to_crop == [4] and r.aggregator["out_dim"] == 512
    with pytest.raises(ValueError, match="did you mean 'earthloc'"):
        model_preset("earthlock")
    # presets hand out copies
    model_preset("earthloc").aggregator["out_rows"] = 1
    assert PRESETS["earthloc"]["aggregator"]["out_rows"] == 4


@pytest.mark.parametrize("name", ["earthloc", "gsv-convap-r50", "r18-cosplace512"])
def test_resnet_presets_forward_at_their_size(name):
    torch.manual_seed(0)
    model = build_model(model_preset(name, pretrained=None)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 320, 320))
    assert out.shape == (2, EXPECTED[name][0])
    assert torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name, size", [("earthloc2-dinov2-s-salad", 98), ("earthloc2-dinov2-b-salad", 98),
                                        ("earthloc2-dinov2-l-salad", 98), ("earthloc2-dinov2-s", 56)])
def test_dinov2_presets_forward_at_a_small_size(name, size):
    torch.manual_seed(0)
    model = build_model(model_preset(name, pretrained=None, image_size=size)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, EXPECTED[name][0])
    assert torch.allclose(out.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_earthloc_trainable_set_and_gradient_flow():
    torch.manual_seed(0)
    model = build_model(model_preset("earthloc", pretrained=None, image_size=64))  # MixVPR on 4x4
    assert model.aggregator.in_hw == (4, 4)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n.split(".")[1] for n in frozen} == {"conv1", "bn1", "layer1", "layer2"}
    assert all(n.startswith("backbone.") for n in frozen)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    assert model.projection.weight.grad.abs().sum() > 0
    assert model.backbone.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_dinov2_salad_gradient_flow():
    torch.manual_seed(0)
    model = build_model(model_preset("earthloc2-dinov2-s-salad", pretrained=None, image_size=98))
    model(torch.randn(2, 3, 98, 98)).sum().backward()
    for name, p in model.named_parameters():
        should_train = name.startswith(("backbone.model.blocks.11.", "backbone.model.norm.", "aggregator."))
        assert p.requires_grad == should_train, name
        assert (p.grad is not None) == should_train, name


@pytest.fixture(scope="module")
def small_r18() -> LocalizationModel:
    torch.manual_seed(0)
    return build_model(model_preset("r18-cosplace512", pretrained=None, image_size=64)).eval()


def test_bf16_autocast_and_channels_last(small_r18):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = small_r18(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = small_r18(x)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert torch.allclose(low.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert torch.nn.functional.cosine_similarity(low, ref).min() > 0.98

    cl = build_model(model_preset("r18-cosplace512", pretrained=None, image_size=64, channels_last=True)).eval()
    cl.load_state_dict(small_r18.state_dict())
    assert cl.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not small_r18.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(cl(x), ref, atol=1e-5)


def test_bf16_autocast_dinov2_salad():
    torch.manual_seed(0)
    model = build_model(model_preset("earthloc2-dinov2-s-salad", pretrained=None, image_size=98)).eval()
    x = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert torch.nn.functional.cosine_similarity(low, ref).min() > 0.95


def test_config_validation():
    with pytest.raises(ValueError, match="unknown key 'layers_to_frezee'.*did you mean 'layers_to_freeze'") as info:
        build_model({"backbone": "resnet18", "layers_to_frezee": 2})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="did you mean 'projection_dim'"):
        model_preset("earthloc", projection_dimm=10)
    with pytest.raises(ValueError, match="unknown key 'out_dims'.*'out_dim'"):
        build_model({"backbone": "resnet18", "aggregator": {"name": "cosplace", "out_dims": 8}})
    with pytest.raises(ValueError, match="in_dim=512 but the backbone gives channels=256"):
        build_model({"backbone": "resnet18", "layers_to_crop": [4], "aggregator": {"name": "cosplace", "in_dim": 512}})
    with pytest.raises(ValueError, match="needs a CLS token"):
        build_model({"backbone": "resnet18", "aggregator": {"name": "salad"}})
    cfg = ModelConfig.from_dict({"backbone": "resnet18", "image_size": [64, 96], "aggregator": "gem"})
    assert cfg.image_hw == (64, 96) and cfg.aggregator == {"name": "gem"}
    assert json.loads(json.dumps(cfg.to_dict()))["image_size"] == [64, 96]


def test_dict_and_dataclass_build_the_same_model():
    torch.manual_seed(0)
    a = build_model({"backbone": "resnet18", "image_size": 64, "layers_to_crop": [4],
                     "aggregator": {"name": "gem", "p": 2.5}, "projection_dim": 32})
    b = build_model(ModelConfig(backbone="resnet18", image_size=64, layers_to_crop=[4],
                                aggregator={"name": "gem", "p": 2.5}, projection_dim=32))
    assert a.descriptor_dim == b.descriptor_dim == 32
    assert a.aggregator.p.item() == 2.5
    assert a.state_dict().keys() == b.state_dict().keys()


def test_compile_flag_compiles_in_place(monkeypatch):
    calls = []
    monkeypatch.setattr(LocalizationModel, "compile", lambda self, *a, **k: calls.append(self))
    model = build_model({"backbone": "resnet18", "image_size": 64, "compile": True})
    assert calls == [model]
    build_model({"backbone": "resnet18", "image_size": 64})
    assert len(calls) == 1


def test_save_and_load_encoder_roundtrip(tmp_path, small_r18):
    out = save_encoder(small_r18, tmp_path / "enc", extra={"epoch": 3})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "streamloc-encoder" and meta["descriptor_dim"] == 512
    assert meta["model"]["pretrained"] is None and meta["extra"] == {"epoch": 3}
    model, size, dim = load_encoder(out)
    assert (size, dim) == ((64, 64), 512) and not model.training
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), small_r18(x))
    assert load_encoder(out / "config.json")[2] == 512  # a file inside the directory works too


def test_save_and_load_dinov2_salad(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_preset("earthloc2-dinov2-s-salad", pretrained=None, image_size=98))
    with torch.no_grad():
        for p in model.aggregator.parameters():
            p.add_(0.01)  # not the init: the load must restore trained values
    model.eval()
    save_encoder(model, tmp_path / "dino")
    loaded, size, dim = load_encoder(tmp_path / "dino")
    assert (size, dim) == ((98, 98), 2048)
    x = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_encoder_errors(tmp_path, small_r18):
    with pytest.raises(FileNotFoundError, match="not a saved encoder"):
        load_encoder(tmp_path)
    out = save_encoder(small_r18, tmp_path / "enc")
    meta = json.loads((out / "config.json").read_text())
    meta["model"]["aggregator"] = {"name": "cosplace", "out_dim": 256}
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="other shapes") as info:
        load_encoder(out)
    assert "\n" not in str(info.value)
