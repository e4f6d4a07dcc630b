"""Input pipelines: one `MultiCropSpec`, several backends, one `build_loader` entry.

A loader returned by `build_loader` is an iterable of `Batch` on `device` with
  - `len(loader)`: steps per epoch for this rank (drop_last),
  - `loader.set_epoch(epoch, start_step=0)`: reshuffle for `epoch` and start at `start_step` (exact resume),
  - `loader.num_classes`: number of labels in the source (0 when unlabelled).
Ranks see disjoint shards of each epoch. The order depends only on (seed, epoch).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from pipelines.batch import Batch
from pipelines.spec import SPEC_PRESETS, MultiCropSpec

BACKENDS = ("auto", "dali", "ffcv", "torchvision")


def available(backend: str) -> bool:
    module = {"dali": "nvidia.dali", "ffcv": "ffcv", "torchvision": "torchvision"}[backend]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def resolve_backend(backend: str, source: str | Path, device: torch.device) -> str:
    """`auto`: FFCV for a `.beton`; DALI (GPU decode when `device` is CUDA, its CPU graph otherwise)
    when installed; the torchvision reference as the fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        if not available(backend):
            raise ValueError(f"backend {backend!r} is not installed (pip install -r requirements.txt)")
        return backend
    if str(source).endswith(".beton"):
        return "ffcv"
    return "dali" if available("dali") else "torchvision"


def build_loader(
    source: str | Path,
    spec: MultiCropSpec,
    backend: str = "auto",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    num_workers: int | None = None,
    drop_last: bool = True,
):
    """Build the multi-crop loader for `source` (ImageFolder dir, webdataset tar(s), or `.beton`)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    name = resolve_backend(backend, source, device)
    module = importlib.import_module(f"pipelines.{name}_backend")
    return module.build(
        source, spec, batch_size=batch_size, device=device, rank=rank, world_size=world_size,
        seed=seed, epoch=epoch, num_workers=num_workers, drop_last=drop_last,
    )


__all__ = ["Batch", "MultiCropSpec", "SPEC_PRESETS", "BACKENDS", "build_loader", "resolve_backend", "available"]
