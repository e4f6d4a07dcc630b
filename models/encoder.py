"""Encoder = timm backbone + LeJEPA projector, mapping a multi-crop batch to embeddings [V, B, K]."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from models.batchnorm import GlobalBatchNorm1d
from models.probe import DEFAULT_PROBE, patch_features, probe_features
from models.registry import build_backbone, is_vit


class EncoderOutput(NamedTuple):
    global_emb: Tensor  # [G, B, K] embeddings of the global views (all views for non-ViT archs)
    all_emb: Tensor  # [V, B, K] embeddings of every view, globals first
    features: Tensor  # [V, B, D] pooled backbone features (input of the online probe)


def build_projector(in_dim: int, hidden_dim: int = 2048, proj_dim: int = 128) -> nn.Sequential:
    """The LeJEPA recipe: (Linear-BN-GELU) x2 -> Linear to the projection dim."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), GlobalBatchNorm1d(hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim), GlobalBatchNorm1d(hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, proj_dim),
    )


class Encoder(nn.Module):
    def __init__(self, arch: str, proj_dim: int = 128, hidden_dim: int = 2048, patch_size: int | None = None,
                 img_size: int = 224):
        super().__init__()
        self.arch = arch
        self.is_vit = is_vit(arch)
        self.backbone = build_backbone(arch, patch_size=patch_size, img_size=img_size)
        self.feature_dim = self.backbone.num_features
        self.probe_dim = 2 * self.feature_dim if self.is_vit else self.feature_dim
        self.projector = build_projector(self.feature_dim, hidden_dim, proj_dim)
        self.channels_last = False

    def use_channels_last(self) -> "Encoder":
        """Conv nets: weights and inputs in NHWC (cuDNN's and oneDNN's fast layout); a no-op for ViTs."""
        if not self.is_vit:
            self.channels_last = True
            self.backbone.to(memory_format=torch.channels_last)
        return self

    def forward(self, global_views: Tensor, local_views: Tensor) -> EncoderOutput:
        """`global_views` [B, G, 3, H, W], `local_views` [B, L, 3, h, w] (L may be 0).

        Each resolution group goes through the backbone in one call (views folded into the batch), and the
        projector sees all views at once so its BatchNorm statistics cover the whole multi-crop batch.
        """
        B, G = global_views.shape[:2]
        groups = [global_views] + ([local_views] if local_views.numel() else [])
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        features = torch.cat(
            [self.backbone(g.flatten(0, 1).contiguous(memory_format=layout)).view(B, g.shape[1], -1).transpose(0, 1)
             for g in groups]
        )  # [V, B, D]
        V = features.shape[0]
        all_emb = self.projector(features.flatten(0, 1)).view(V, B, -1)
        # Non-ViT archs: every view counts as global (LeJEPA paper), the centre is the mean of all views.
        global_emb = all_emb[:G] if self.is_vit else all_emb
        return EncoderOutput(global_emb, all_emb, features)

    def probe_features(self, x: Tensor, probe: str = DEFAULT_PROBE) -> Tensor:
        """Frozen features for linear evaluation [B, D]; `probe` as in `models.probe` (default: ViT CLS of the
        last two blocks + LayerNorm, the seed's recipe; other archs: pooled features)."""
        return probe_features(self.backbone, x, probe, self.projector)

    def patch_features(self, x: Tensor) -> Tensor:
        """Spatial features [B, h, w, C] (ViT patch tokens after the final norm, or a conv net's last map)."""
        return patch_features(self.backbone, x)


def build_encoder(arch: str, proj_dim: int = 128, hidden_dim: int = 2048, patch_size: int | None = None,
                  img_size: int = 224) -> Encoder:
    return Encoder(arch, proj_dim=proj_dim, hidden_dim=hidden_dim, patch_size=patch_size, img_size=img_size)
