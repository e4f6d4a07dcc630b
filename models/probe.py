"""Which features evaluation reads from a frozen network: one function for our encoder, exported folders and
any timm model, so a run, its export and a timm baseline are probed the same way.

Probes (`--probe` of the evaluation scripts):
- `seed` (default): ViTs: the CLS tokens of the last two blocks, concatenated, then LayerNorm without affine
  (the seed's linear-probe recipe); networks without a CLS token (ResNet, ConvNeXt): the pooled features.
- `pooled`: the backbone's own pooled output (`num_classes=0`): a ViT's CLS token after the final norm, a
  conv net's global average pool. This is what the trainer's online probe and the projector read.
- `projector`: the LeJEPA projector's output (the embedding SIGReg shapes); needs the projector, so only a
  training checkpoint has it (an export holds the backbone only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROBES = ("seed", "pooled", "projector")
DEFAULT_PROBE = "seed"


def check_probe(probe: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")


def has_cls_token(backbone: nn.Module) -> bool:
    """A timm ViT-like model with a class token and `get_intermediate_layers` (the seed probe reads it)."""
    return getattr(backbone, "cls_token", None) is not None and hasattr(backbone, "get_intermediate_layers")


def probe_features(backbone: nn.Module, x: Tensor, probe: str = DEFAULT_PROBE,
                   projector: nn.Module | None = None) -> Tensor:
    """Frozen features [B, D] of images `x` [B, 3, H, W] for linear evaluation (see the module docstring)."""
    check_probe(probe)
    if probe == "projector":
        if projector is None:
            raise ValueError("probe 'projector' needs the LeJEPA projector, which only a training checkpoint holds")
        return projector(backbone(x))
    if probe == "seed" and has_cls_token(backbone):
        layers = backbone.get_intermediate_layers(x, n=2, return_prefix_tokens=True, norm=False)
        cls = torch.cat([prefix[:, 0] for _, prefix in layers], dim=-1)
        return F.layer_norm(cls, (cls.shape[-1],))
    return backbone(x)  # "pooled", and "seed" on a network without a CLS token


def patch_features(backbone: nn.Module, x: Tensor) -> Tensor:
    """Spatial features [B, h, w, C]: a ViT's patch tokens of the last block (after the final norm), or the
    last feature map of a conv net."""
    feats = backbone.forward_features(x)
    if feats.ndim == 4:  # conv nets: [B, C, h, w]
        return feats.permute(0, 2, 3, 1)
    if getattr(backbone, "dynamic_img_size", False):
        h, w = backbone.patch_embed.dynamic_feat_size(x.shape[-2:])
    else:
        h, w = backbone.patch_embed.grid_size
    return feats[:, backbone.num_prefix_tokens:].reshape(x.shape[0], h, w, -1)


class FrozenFeatures(nn.Module):
    """A backbone (plus the projector for `probe='projector'`) behind evaluation's feature API:
    `probe_features(x) -> [B, D]` and `patch_features(x) -> [B, h, w, C]`. Holds nothing else, so the
    same weights give the same module state whether they came from a checkpoint, an export or timm."""

    def __init__(self, backbone: nn.Module, probe: str = DEFAULT_PROBE, projector: nn.Module | None = None):
        super().__init__()
        check_probe(probe)
        if probe == "projector" and projector is None:
            raise ValueError("probe 'projector' needs the LeJEPA projector, which only a training checkpoint holds "
                             "(an export has the backbone only)")
        self.backbone = backbone
        self.projector = projector if probe == "projector" else None
        self.probe = probe

    def probe_features(self, x: Tensor) -> Tensor:
        return probe_features(self.backbone, x, self.probe, self.projector)

    def patch_features(self, x: Tensor) -> Tensor:
        return patch_features(self.backbone, x)

    def extra_repr(self) -> str:
        return f"probe={self.probe!r}"
