"""BatchNorm whose training statistics cover the whole DDP batch, without a host sync.

`nn.SyncBatchNorm` all-gathers per-rank counts and synchronises with the host in every forward (and
breaks `torch.compile` graphs); it is also GPU-only. Here the per-channel moments (mean, mean of squares)
go through one autograd-aware functional all-reduce: value and gradients equal one process on the
concatenated batch (ranks hold equal batch sizes, which a drop_last loader guarantees), on CPU (gloo) and
GPU (NCCL), traceable by `torch.compile`. Without a process group, or in eval mode, it is plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GlobalStats:
    """Mixin for nn.BatchNorm{1,2}d: training statistics all-reduced over ranks."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        world = dist.get_world_size()
        dims = [0] + list(range(2, x.dim()))  # every dim but the channels
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # moments in fp32 under autocast
        moments = torch.stack([xf.mean(dims), xf.square().mean(dims)])
        moments = funcol.all_reduce(moments, "sum", dist.group.WORLD) / world
        mean, var = moments[0], (moments[1] - moments[0].square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                n = x.numel() // x.shape[1] * world
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                unbiased = var.detach() * n / max(n - 1, 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class GlobalBatchNorm1d(_GlobalStats, nn.BatchNorm1d):
    """BatchNorm1d over the global batch (the projector's BN)."""


class GlobalBatchNorm2d(_GlobalStats, nn.BatchNorm2d):
    """BatchNorm2d over the global batch (conv-net backbones under DDP)."""


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d}


def globalise_batchnorm(module: nn.Module) -> nn.Module:
    """Make every plain BatchNorm1d/2d in `module` (in place) its global version: the class is swapped, so
    parameters, running statistics, dtype and device stay as they are. Used under DDP, so every BN layer
    normalises over the global batch."""
    for child in module.modules():
        target = _GLOBAL.get(type(child))
        if target is not None:
            child.__class__ = target  # the subclass adds behaviour, no state
    return module
