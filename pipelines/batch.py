"""The contract between the input pipeline and everything after it."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Batch(NamedTuple):
    global_views: Tensor  # [B, G, 3, H, W] float, normalised, on the training device
    local_views: Tensor  # [B, L, 3, h, w] float, normalised (L may be 0)
    labels: Tensor  # [B] int64 class index, -1 where the source has no label
