"""Backbones (timm), the LeJEPA projector and encoder, and the shared checkpoint reader."""

from models.checkpoint import encoder_from_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from models.encoder import Encoder, EncoderOutput, build_encoder
from models.registry import ARCHS, build_backbone, check_arch, is_vit

__all__ = [
    "ARCHS", "Encoder", "EncoderOutput", "build_backbone", "build_encoder", "check_arch", "is_vit",
    "encoder_from_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint",
]
