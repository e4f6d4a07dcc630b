"""The trainer: `run(cfg)` is the one entry every launcher calls."""

from trainer.config import PRESETS, TrainConfig, add_config_args, config_from_args, validate_config
from trainer.train import run

__all__ = ["PRESETS", "TrainConfig", "add_config_args", "config_from_args", "run", "validate_config"]
