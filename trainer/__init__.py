"""The trainer: `run(cfg)` is the one entry every launcher calls."""

from trainer.config import PRESETS, TrainConfig, add_config_args, config_from_args, validate_config

__all__ = ["PRESETS", "TrainConfig", "add_config_args", "config_from_args", "validate_config"]
