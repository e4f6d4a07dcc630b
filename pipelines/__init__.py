"""Input pipelines: one `MultiCropSpec` (the recipe), one sampler of per-view random parameters
(`pipelines.params`), several backends that render them (torchvision reference, DALI, FFCV), one
`build_loader` entry. `describe_backend` says which backend `auto` picks and why.

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

from pipelines.batch import Batch, batch_device
from pipelines.spec import SPEC_PRESETS, MultiCropSpec

BACKENDS = ("auto", "dali", "ffcv", "torchvision")


def available(backend: str) -> bool:
    module = {"dali": "nvidia.dali", "ffcv": "ffcv", "torchvision": "torchvision"}[backend]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# How each backend runs on each kind of device (for `describe_backend`).
_HOW = {
    ("dali", "cuda"): "mixed nvJPEG decode, every view made on the GPU",
    ("dali", "cpu"): "DALI's CPU graph",
    ("ffcv", "cuda"): "fused decoder crops on the CPU, colour ops on the GPU",
    ("ffcv", "cpu"): "fused numba decoder",
    ("torchvision", "cuda"): "reference recipe, PIL in DataLoader workers, batches copied to the GPU",
    ("torchvision", "cpu"): "reference recipe, PIL in DataLoader workers",
}


def _choose(backend: str, source: str | Path, device: str | torch.device) -> tuple[str, str]:
    """(backend to use, why): the one place `auto` is decided."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    beton = str(source).endswith(".beton")
    cuda = torch.device(device).type == "cuda"
    if backend != "auto":
        if not available(backend):
            raise ValueError(f"backend {backend!r} is not installed (pip install -r requirements.txt)")
        if beton and backend != "ffcv":
            raise ValueError(f"backend {backend!r} cannot read the FFCV file {str(source)!r}: "
                             "use --backend ffcv or auto")
        return backend, "requested"
    if beton:
        if not available("ffcv"):
            raise ValueError(f"data source {str(source)!r} is a .beton but ffcv is not installed")
        return "ffcv", ".beton source"
    if available("dali"):
        return "dali", "CUDA device" if cuda else "no CUDA device"
    return "torchvision", "DALI not installed"


def resolve_backend(backend: str, source: str | Path, device: str | torch.device) -> str:
    """The backend `build_loader` uses. `auto`: FFCV for a `.beton`; else DALI when installed (GPU decode
    when `device` is CUDA, its CPU graph otherwise); else the torchvision reference."""
    return _choose(backend, source, device)[0]


def describe_backend(backend: str, source: str | Path, device: str | torch.device) -> str:
    """One line saying which backend runs, why and how, e.g. "auto -> dali (CUDA device: mixed nvJPEG
    decode, every view made on the GPU)", "auto -> ffcv (.beton source: fused numba decoder)", "auto ->
    torchvision (DALI not installed: reference recipe, ...)"."""
    name, why = _choose(backend, source, device)
    how = _HOW[name, "cuda" if torch.device(device).type == "cuda" else "cpu"]
    return f"{backend} -> {name} ({why}: {how})"


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
    **options,
):
    """Build the multi-crop loader for `source` (ImageFolder dir, webdataset tar(s), or `.beton`). `options`
    go to the chosen backend's `build` (DALI: `decoder=DecoderOptions(...)`; FFCV: `order`, `colour_ops`);
    `num_workers` defaults to this rank's CPUs (`pipelines.threads.cpus_per_rank`)."""
    device = batch_device(device)
    name = resolve_backend(backend, source, device)
    module = importlib.import_module(f"pipelines.{name}_backend")
    return module.build(
        source, spec, batch_size=batch_size, device=device, rank=rank, world_size=world_size,
        seed=seed, epoch=epoch, num_workers=num_workers, drop_last=drop_last, **options,
    )


__all__ = ["Batch", "MultiCropSpec", "SPEC_PRESETS", "BACKENDS", "build_loader", "resolve_backend", "describe_backend",
           "available"]
