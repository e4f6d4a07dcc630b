"""The contract between the input pipeline and everything after it."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Batch(NamedTuple):
    global_views: Tensor  # [B, G, 3, H, W] float, normalised, on the training device
    local_views: Tensor  # [B, L, 3, h, w] float, normalised (L may be 0)
    labels: Tensor  # [B] int64 class index, -1 where the source has no label


def batch_device(device: str | torch.device | None) -> torch.device:
    """The device a loader delivers its batches to, with an index: None means CUDA when present, and "cuda"
    alone the current CUDA device (a loader's threads must name it: a new thread starts on device 0)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
