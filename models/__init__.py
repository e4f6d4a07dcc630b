"""Backbones (timm), the LeJEPA projector and encoder, the probe features evaluation reads, and the shared
checkpoint reader. `models.export` (not imported here) writes and reads timm / Hugging Face export folders."""

from models.checkpoint import encoder_from_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from models.encoder import Encoder, EncoderOutput, build_encoder
from models.probe import DEFAULT_PROBE, PROBES, FrozenFeatures, patch_features, probe_features
from models.registry import ARCHS, build_backbone, check_arch, is_vit, timm_args

__all__ = [
    "ARCHS", "Encoder", "EncoderOutput", "build_backbone", "build_encoder", "check_arch", "is_vit", "timm_args",
    "encoder_from_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint",
    "DEFAULT_PROBE", "PROBES", "FrozenFeatures", "patch_features", "probe_features",
]
