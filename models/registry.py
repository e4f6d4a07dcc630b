"""One registry of `--arch` names -> timm constructors (timm's `create_model(name, **kw)` is the whole API)."""

from __future__ import annotations

import timm
from torch import nn

# name -> (timm model name, extra kwargs). ViTs use patch 14 (as LeJEPA's ViT-L/14, ViT-H/14): both seed
# view sizes tile exactly (224 px -> 16x16 tokens, 98 px -> 7x7), where patch 16 would have to pad 98 px.
# `build_backbone(..., patch_size=8)` gives the small-view CPU variant (64 px -> 8x8, 32 px -> 4x4).
ARCHS: dict[str, tuple[str, dict]] = {
    "vit_t": ("vit_tiny_patch16_224", {"patch_size": 14}),
    "vit_s": ("vit_small_patch16_224", {"patch_size": 14}),
    "vit_b": ("vit_base_patch16_224", {"patch_size": 14}),
    "vit_l": ("vit_large_patch16_224", {"patch_size": 14}),
    "vit_h": ("vit_huge_patch14_224", {}),
    "convnextv2_atto": ("convnextv2_atto", {}),
    "convnextv2_nano": ("convnextv2_nano", {}),
    "convnextv2_tiny": ("convnextv2_tiny", {}),
    "convnextv2_base": ("convnextv2_base", {}),
    "convnextv2_large": ("convnextv2_large", {}),
    "resnet18": ("resnet18", {}),
    "resnet50": ("resnet50", {}),
}


def is_vit(arch: str) -> bool:
    return arch.startswith("vit_")


def check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")


def timm_args(arch: str, patch_size: int | None = None, img_size: int = 224) -> tuple[str, dict]:
    """(timm model name, `create_model` kwargs) of a backbone: the one recipe that `build_backbone` and the
    export's `config.json` (`architecture`, `model_args`) both use, so timm rebuilds exactly our network."""
    check_arch(arch)
    name, kwargs = ARCHS[arch]
    kwargs = dict(kwargs)
    if is_vit(arch):
        # dynamic_img_size: the same ViT takes 224-px global and 98-px local views (pos-embed interpolated).
        # dynamic_img_pad: a view size that is not a multiple of the patch is padded instead of rejected.
        kwargs.update(dynamic_img_size=True, dynamic_img_pad=True, img_size=img_size)
        if patch_size is not None:
            kwargs["patch_size"] = patch_size
    elif patch_size is not None:
        raise ValueError(f"patch_size={patch_size} only applies to ViT archs, not {arch!r}")
    return name, kwargs


def build_backbone(arch: str, patch_size: int | None = None, img_size: int = 224) -> nn.Module:
    """A randomly initialised timm backbone returning pooled features (`num_classes=0`)."""
    name, kwargs = timm_args(arch, patch_size, img_size)
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
