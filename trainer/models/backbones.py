"""Backbones: torchvision ResNets (cropped/frozen by stage) and timm DINOv2 with registers.

Every backbone returns ``(feature_map [B, C, h, w], cls_token [B, C] or None)`` so that
aggregators see one interface whatever produced the features.
"""
from __future__ import annotations

import difflib
import logging
import os
from typing import Any, Iterable, Sequence

from torch import Tensor, nn

from .config import image_hw
from .weights import (fetch_or_fail, guard_timm_download, guard_url_download, is_weights_file,
                      load_checked, read_state_dict, select_prefix)

__all__ = [
    "BACKBONES",
    "ResNetBackbone",
    "DinoV2Backbone",
    "build_backbone",
    "canonical_backbone_name",
    "check_pretrained",
    "check_input_size",
]

_log = logging.getLogger(__name__)

# name -> (family, architecture, per-stage channels or embed dim)
_RESNET_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
_DINOV2_ARCH = {
    "dinov2_small": "vit_small_patch14_reg4_dinov2",
    "dinov2_base": "vit_base_patch14_reg4_dinov2",
    "dinov2_large": "vit_large_patch14_reg4_dinov2",
}
_ALIASES = {
    **{arch: name for name, arch in _DINOV2_ARCH.items()},
    "dinov2_vits14_reg": "dinov2_small",
    "dinov2_vitb14_reg": "dinov2_base",
    "dinov2_vitl14_reg": "dinov2_large",
}
BACKBONES: tuple[str, ...] = tuple(_RESNET_STAGE_CHANNELS) + tuple(_DINOV2_ARCH)
PATCH_SIZE = 14


def canonical_backbone_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in BACKBONES:
        close = difflib.get_close_matches(key, list(BACKBONES) + list(_ALIASES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)}){hint}")
    return key


def _resnet_weights_tag(name: str, pretrained: bool | str) -> str:
    """The torchvision weights tag that ``pretrained`` names for ResNet ``name``."""
    from torchvision.models import get_model_weights

    tag = "IMAGENET1K_V1" if pretrained is True or str(pretrained).lower() == "imagenet" else str(pretrained)
    enum = get_model_weights(name)
    if tag not in enum.__members__:
        raise ValueError(
            f"unknown pretrained weights '{pretrained}' for {name} "
            f"(use true, one of {', '.join(enum.__members__)}, or a local file)"
        )
    return tag


def _timm_model_name(name: str, pretrained: bool | str) -> str:
    """The timm model name (``arch.tag`` or ``hf-hub:...``) that ``pretrained`` names."""
    arch, hub = _DINOV2_ARCH[name], str(pretrained)
    return arch if pretrained is True else (hub if hub.startswith("hf-hub:") else f"{arch}.{hub}")


def check_pretrained(name: str, pretrained: bool | str | None) -> None:
    """Refuse a ``pretrained`` value that building would refuse, without reading or fetching
    weights: a local file must exist, a torchvision or timm tag must be known (hub
    repositories can only be checked by fetching them)."""
    if not pretrained:
        return
    key = canonical_backbone_name(name)
    if is_weights_file(pretrained):
        if not os.path.isfile(os.fspath(pretrained)):
            # a resume takes its weights from the checkpoint: the starting file may be gone
            raise FileNotFoundError(f"pretrained weights file not found: {os.fspath(pretrained)} "
                                    "(to resume a run whose starting weights are gone, pass "
                                    "model.pretrained=null: the weights come from the "
                                    "checkpoint)")
        return
    if key in _RESNET_STAGE_CHANNELS:
        _resnet_weights_tag(key, pretrained)
        return
    model_name = _timm_model_name(key, pretrained)
    if not model_name.startswith("hf-hub:"):
        from timm.models import get_pretrained_cfg

        try:
            get_pretrained_cfg(model_name)
        except RuntimeError:
            import timm

            tags = [n.partition(".")[2] for n in timm.list_pretrained(_DINOV2_ARCH[key] + ".*")]
            raise ValueError(f"unknown pretrained weights '{pretrained}' for {key} (use true, "
                             f"one of {', '.join(tags)}, hf-hub:REPO, or a local file)") from None


def check_input_size(name: str, size: int | Iterable[int]) -> None:
    """Refuse an input size backbone ``name`` cannot take (DINOv2: multiples of 14)."""
    hw = image_hw(size)
    if canonical_backbone_name(name) in _DINOV2_ARCH:
        _check_multiple(hw)


def _ceil_half(n: int) -> int:
    return (n + 1) // 2


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc, optionally without its last stage(s).

    The stem and stages keep torchvision's attribute names, so torchvision state dicts
    load directly.
    """

    has_cls_token = False

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: bool | str | None = None,
        layers_to_crop: Sequence[int] = (),
        layers_to_freeze: int = -1,
    ) -> None:
        super().__init__()
        import torchvision

        if name not in _RESNET_STAGE_CHANNELS:
            raise ValueError(f"unknown ResNet '{name}'")
        crop = sorted(set(int(v) for v in layers_to_crop))
        if any(v not in (3, 4) for v in crop) or (3 in crop and 4 not in crop):
            raise ValueError(f"layers_to_crop must be [], [4] or [3, 4], got {list(layers_to_crop)}")
        if not -1 <= int(layers_to_freeze) <= 4:
            raise ValueError(f"layers_to_freeze must be in -1..4, got {layers_to_freeze}")
        self.name = name
        net = getattr(torchvision.models, name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.stages = [f"layer{i}" for i in range(1, 5) if i not in crop]
        for stage in self.stages:
            setattr(self, stage, getattr(net, stage))
        self.out_channels = _RESNET_STAGE_CHANNELS[name][len(self.stages) - 1]
        self.stride = 2 ** (len(self.stages) + 1)
        if pretrained:
            self._load_pretrained(pretrained)
        self.layers_to_freeze = int(layers_to_freeze)
        self._freeze(self.layers_to_freeze)

    def _load_pretrained(self, pretrained: bool | str) -> None:
        if is_weights_file(pretrained):
            state = self._drop_unused(select_prefix(read_state_dict(pretrained), "backbone."))
            load_checked(self, state, self.name, str(pretrained))
            _log.info("loaded %s weights from %s", self.name, pretrained)
            return
        from torchvision.models import get_model_weights

        tag = _resnet_weights_tag(self.name, pretrained)
        enum = get_model_weights(self.name)
        guard_url_download(enum[tag].url, f"{self.name} ({tag})")
        state = fetch_or_fail(f"{self.name} ({tag})", lambda: enum[tag].get_state_dict(progress=False))
        self.load_state_dict(self._drop_unused(state), strict=True)

    def _drop_unused(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Ignore the classifier and cropped stages of a full ResNet state dict."""
        unused = {"fc", "layer3", "layer4"} - set(self.stages)
        return {k: v for k, v in state.items() if k.split(".")[0] not in unused}

    def _freeze(self, n: int) -> None:
        """-1: nothing; 0: conv1/bn1; n: conv1/bn1 and layer1..n (as GSV-Cities/EarthLoc)."""
        if n < 0:
            return
        frozen: list[nn.Module] = [self.conv1, self.bn1]
        frozen += [getattr(self, f"layer{i}") for i in range(1, n + 1) if f"layer{i}" in self.stages]
        for module in frozen:
            module.requires_grad_(False)

    def feature_hw(self, size: int | Iterable[int]) -> tuple[int, int]:
        h, w = image_hw(size)
        for _ in range(len(self.stages) + 1):  # conv1, maxpool, layer2.. each halve (ceil)
            h, w = _ceil_half(h), _ceil_half(w)
        return h, w

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            x = getattr(self, stage)(x)
        return x, None


class DinoV2Backbone(nn.Module):
    """DINOv2 with 4 registers (timm), returning the patch-token map and the CLS token.

    Built with ``dynamic_img_size`` so any multiple of 14 works; ``img_size`` only sets the
    native position-embedding grid.
    """

    has_cls_token = True
    stride = PATCH_SIZE

    def __init__(
        self,
        name: str = "dinov2_base",
        pretrained: bool | str | None = None,
        image_size: int | Iterable[int] = 518,
        unfreeze_last_blocks: int = 1,
    ) -> None:
        super().__init__()
        import timm

        if name not in _DINOV2_ARCH:
            raise ValueError(f"unknown DINOv2 backbone '{name}'")
        hw = image_hw(image_size)
        _check_multiple(hw)
        self.name = name
        arch = _DINOV2_ARCH[name]
        kwargs: dict[str, Any] = dict(num_classes=0, img_size=hw, dynamic_img_size=True)
        if pretrained and not is_weights_file(pretrained):
            model_name = _timm_model_name(name, pretrained)
            run = guard_timm_download(model_name)
            self.model = run(lambda: timm.create_model(model_name, pretrained=True, **kwargs))
        else:
            self.model = timm.create_model(arch, pretrained=False, **kwargs)
            if pretrained:
                self._load_file(os.fspath(pretrained))
        self.out_channels = int(self.model.embed_dim)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        self.unfreeze_last_blocks = int(unfreeze_last_blocks)
        self._freeze(self.unfreeze_last_blocks)

    def _load_file(self, path: str) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = select_prefix(read_state_dict(path), "backbone.")
        state = select_prefix(state, "model.")
        try:
            state = checkpoint_filter_fn(state, self.model)  # original DINOv2 keys, pos-embed resize
        except Exception as exc:
            raise ValueError(f"{path}: cannot convert weights for {self.name}: {exc}") from None
        load_checked(self.model, state, self.name, path)
        _log.info("loaded %s weights from %s", self.name, path)

    def _freeze(self, n: int) -> None:
        """Freeze all but the last n blocks and the final norm (EarthLoc2); n < 0 trains all."""
        if n < 0:
            return
        self.model.requires_grad_(False)
        blocks = list(self.model.blocks)
        for block in blocks[len(blocks) - min(n, len(blocks)):] if n > 0 else []:
            block.requires_grad_(True)
        self.model.norm.requires_grad_(True)

    def feature_hw(self, size: int | Iterable[int]) -> tuple[int, int]:
        h, w = image_hw(size)
        _check_multiple((h, w))
        return h // PATCH_SIZE, w // PATCH_SIZE

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        b, _, h, w = x.shape
        _check_multiple((h, w))
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        patches = tokens[:, self.num_prefix_tokens:]
        fmap = patches.transpose(1, 2).reshape(b, self.out_channels, h // PATCH_SIZE, w // PATCH_SIZE)
        return fmap, cls


def _check_multiple(hw: tuple[int, int]) -> None:
    if hw[0] % PATCH_SIZE or hw[1] % PATCH_SIZE:
        raise ValueError(f"DINOv2 input size must be a multiple of {PATCH_SIZE}, got {hw[0]}x{hw[1]}")


def build_backbone(
    name: str,
    *,
    pretrained: bool | str | None = None,
    image_size: int | Iterable[int] = 320,
    layers_to_crop: Sequence[int] = (),
    layers_to_freeze: int = -1,
    unfreeze_last_blocks: int = 1,
) -> ResNetBackbone | DinoV2Backbone:
    """Build a backbone by name; options of the other family are rejected, not ignored."""
    key = canonical_backbone_name(name)
    if key in _RESNET_STAGE_CHANNELS:
        return ResNetBackbone(key, pretrained, layers_to_crop, layers_to_freeze)
    if list(layers_to_crop) or int(layers_to_freeze) != -1:
        raise ValueError(f"layers_to_crop/layers_to_freeze apply to ResNets; use unfreeze_last_blocks for {key}")
    return DinoV2Backbone(key, pretrained, image_size, unfreeze_last_blocks)
