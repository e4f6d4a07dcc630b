"""Input pipelines: one `MultiCropSpec` (the recipe), one sampler of per-view random parameters
(`pipelines.params`), several backends that render them (torchvision reference, DALI, FFCV), one
`build_loader` entry. `describe_backend` says which backend `auto` picks and why.

A loader returned by `build_loader` is an iterable of `Batch` on `device` with
  - `len(loader)`: steps per epoch for this rank (drop_last),
  - `loader.set_epoch(epoch, start_step=0)`: reshuffle for `epoch` and start at `start_step` (exact resume),
  - `loader.num_classes`: number of labels in the source (0 when unlabelled),
  - `loader.counters()`: cumulative fault counters as TensorBoard tags (`data/bad_samples`, and for a
    stream `data/skipped_shards`, `data/shard_retries`, `data/laps`).
Ranks see disjoint shards of each epoch. The order depends only on (seed, epoch).

Sources are indexed (ImageFolder, local tar shards, `.beton`: random access, `sources.ShardedLoader`) or
streamed (http(s):// URLs and `pipe:COMMAND` always, local shards with `stream=StreamOptions()`:
`sources.StreamedLoader` over `streaming.ShardStream`). A streamed loader also has `state_dict()` /
`load_state_dict()`: the position a checkpoint holds (the trainer's Checkpointer gathers it from every
rank), and `close()`. Which backends read streams: `STREAMING_BACKENDS`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from pipelines.batch import Batch, batch_device
from pipelines.spec import SPEC_PRESETS, MultiCropSpec
from pipelines.streaming import StreamOptions, is_remote

BACKENDS = ("auto", "dali", "ffcv", "torchvision")
# Backends whose `build` accepts a `streaming.ShardStream` as its source. FFCV never will (a .beton is read
# with random access); DALI's feed of a stream is pending (its `build` does not take one yet).
STREAMING_BACKENDS = ("dali", "torchvision")


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


def streamed(source: str | Path, stream: bool = False) -> bool:
    """Whether `source` is read as a stream: URLs (any `scheme://`: an unknown scheme is then refused by
    name) and `pipe:` always, local shards when asked (--stream)."""
    return stream or is_remote(source) or re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", str(source)) is not None


def _choose(backend: str, source: str | Path, device: str | torch.device, stream: bool = False) -> tuple[str, str]:
    """(backend to use, why): the one place `auto` is decided."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    beton = str(source).endswith(".beton")
    cuda = torch.device(device).type == "cuda"
    if streamed(source, stream):
        if beton:
            raise ValueError(f"data source {str(source)!r}: an FFCV .beton is read locally with random access "
                             "(--backend ffcv, without --stream), it cannot be streamed")
        if backend == "ffcv":
            raise ValueError(f"backend 'ffcv' reads .beton files only, not the streamed shards {str(source)!r}: "
                             f"use --backend {' or '.join(STREAMING_BACKENDS)} (or auto)")
        if backend not in ("auto", *STREAMING_BACKENDS):
            raise ValueError(f"backend {backend!r} cannot read streamed shards ({str(source)!r}) yet: use "
                             f"--backend {' or '.join(STREAMING_BACKENDS)} (or auto)")
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


def resolve_backend(backend: str, source: str | Path, device: str | torch.device, stream: bool = False) -> str:
    """The backend `build_loader` uses. `auto`: FFCV for a `.beton`; for a stream the first of
    STREAMING_BACKENDS; else DALI when installed (GPU decode when `device` is CUDA, its CPU graph
    otherwise); else the torchvision reference. `stream`: local shards are to be streamed (--stream)."""
    return _choose(backend, source, device, stream)[0]


def describe_backend(backend: str, source: str | Path, device: str | torch.device, stream: bool = False) -> str:
    """One line saying which backend runs, why and how, e.g. "auto -> dali (CUDA device: mixed nvJPEG
    decode, every view made on the GPU)", "auto -> ffcv (.beton source: fused numba decoder)", "auto ->
    torchvision (DALI not installed: reference recipe, ...)"."""
    name, why = _choose(backend, source, device, stream)
    how = _HOW[name, "cuda" if torch.device(device).type == "cuda" else "cpu"]
    if streamed(source, stream):
        how += "; shards read front to back by reader threads"
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
    stream: StreamOptions | None = None,
    **options,
):
    """Build the multi-crop loader for `source`: an ImageFolder dir, webdataset tar(s) or a `.beton`
    (indexed), or shards to stream: http(s):// URLs and `pipe:COMMAND` always, local shards when `stream`
    is given (its options; URLs without it get the defaults). A streamed source is opened here, once per
    rank (a ValueError naming it when it cannot be read), and handed to the backend as a `ShardStream`.
    `options` go to the chosen backend's `build` (DALI: `decoder=DecoderOptions(...)`, `pipelines`; FFCV: `order`,
    `colour_ops`); `num_workers` defaults to this rank's CPUs (`pipelines.threads.cpus_per_rank`)."""
    device = batch_device(device)
    name = resolve_backend(backend, source, device, stream is not None)
    module = importlib.import_module(f"pipelines.{name}_backend")
    if streamed(source, stream is not None):
        if not drop_last:
            raise ValueError(f"data source {str(source)!r}: a stream has no short last batch (drop_last=False)")
        stream = stream or StreamOptions()
        source = stream.stream(stream.open(source), batch_size, rank, world_size, seed, epoch)
    return module.build(
        source, spec, batch_size=batch_size, device=device, rank=rank, world_size=world_size,
        seed=seed, epoch=epoch, num_workers=num_workers, drop_last=drop_last, **options,
    )


__all__ = ["Batch", "MultiCropSpec", "SPEC_PRESETS", "BACKENDS", "STREAMING_BACKENDS", "StreamOptions", "build_loader",
           "resolve_backend", "describe_backend", "available", "streamed", "is_remote"]
