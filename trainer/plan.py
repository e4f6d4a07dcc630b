"""The run's plan: what a launch is about to do, stated before anything heavy starts.

    plan = build_plan(cfg, world_size=32, device="cuda", devices="4 nodes x 8 GPUs", threads_per_rank=10)
    print(format_plan(plan))

`build_plan` returns a plain dict (YAML-safe: the trainer writes it into OUT/config.yaml under `plan:` and
to TensorBoard as text); `format_plan` renders it for a terminal. Nothing here is heavy: the parameter count
comes from a model built on the meta device (no memory, no init cost, even for ViT-H), the data source is
described from what is cheap to read (files of an ImageFolder, the number of tar shards, a .beton header,
a streamed source's pattern and shard index: no shard is read), and a --data that the submitting host
cannot see is reported as such instead of failing.
"""

from __future__ import annotations

import inspect
import socket
from pathlib import Path

import torch

import pipelines
from models import build_encoder, list_checkpoints
from pipelines import sources
from pipelines.streaming import expand_shards, index_url, load_index
from trainer.config import LR_RULE, TrainConfig, scale_lr, warmup_steps
from trainer.schedule import CALIBRATION_STEPS


# ------------------------------------------------------------------------------------------ the pieces
def count_parameters(cfg: TrainConfig) -> dict:
    """Parameters of the backbone and projector that `cfg` trains, and the ViT patch size in effect.
    Built on the meta device: shapes only, so ViT-H costs a fraction of a second and no memory."""
    with torch.device("meta"):
        encoder = build_encoder(cfg.arch, proj_dim=cfg.proj_dim, hidden_dim=cfg.hidden_dim,
                                patch_size=cfg.patch_size, img_size=cfg.spec.global_size)
    backbone = sum(p.numel() for p in encoder.backbone.parameters())
    projector = sum(p.numel() for p in encoder.projector.parameters())
    patch = getattr(getattr(encoder.backbone, "patch_embed", None), "patch_size", None)
    return {"backbone": backbone, "projector": projector, "total": backbone + projector,
            "patch_size": int(patch[0]) if patch is not None else None}


def data_visible(data: str | None) -> bool:
    """Whether this host sees --data (a submit host may not mount the cluster's filesystem)."""
    if data is None:
        return True
    return Path(sources.expand_braces(str(data))[0] if "{" in str(data) else data).exists()


def describe_stream(pattern: str, samples_per_shard: int | None = None, timeout: float = 10.0) -> dict:
    """kind / samples / shards / classes of streamed shards without reading a shard: the pattern's
    expansion and the writer's index beside the shards (one small file), or --samples-per-shard."""
    shards = expand_shards(pattern)  # ValueError naming the pattern: unknown scheme, zero shards
    how = ("through `pipe:` commands" if pattern.startswith("pipe:")
           else "over HTTP" if pipelines.is_remote(pattern) else "from local files")
    info = {"path": pattern, "kind": f"webdataset tar shards streamed {how}", "samples": None,
            "shards": len(shards), "classes": None, "note": None}
    if samples_per_shard is not None:
        return dict(info, samples=samples_per_shard * len(shards), note="samples from --samples-per-shard")
    index = load_index(pattern, shards, timeout)
    if index is None:
        return dict(info, note=f"no index {index_url(pattern) or '(no brace pattern)'} read from here: each rank "
                               "counts the first shard at start for the epoch length")
    counts, classes = index
    return dict(info, samples=int(counts.sum()), classes=len(classes) or None,
                note=f"counts from {index_url(pattern)}")


def describe_source(data: str | None, stream: bool = False, samples_per_shard: int | None = None) -> dict:
    """kind / samples / shards / classes of --data, from what is cheap to read. A bad source raises the
    same ValueError the loader would; one this host cannot see gets a note instead. A streamed source
    (URLs, pipe:, `stream`) is described without reading any shard (`describe_stream`)."""
    info = {"path": data, "kind": None, "samples": None, "shards": None, "classes": None, "note": None}
    if data is not None and pipelines.streamed(data):  # URLs and pipe: (a local --stream: below)
        return describe_stream(str(data), samples_per_shard)
    if data is None:
        from pipelines.embedded import CLASSES, materialise

        per_class = inspect.signature(materialise).parameters["per_class"].default
        return dict(info, kind="embedded Fashion-MNIST (JPEG ImageFolder)", samples=per_class * len(CLASSES),
                    classes=len(CLASSES), note="the CPU demo set: 28-px images of clothes")
    text = str(data)
    path = Path(text)
    if not data_visible(text):
        kind = ("FFCV .beton" if path.suffix == ".beton" else "webdataset tar shards"
                if "{" in text or path.suffix == ".tar" else "a folder (ImageFolder or tar shards)")
        return dict(info, kind=kind,
                    note=f"not visible from {socket.gethostname()}: the nodes check it when the job starts")
    if stream:
        return describe_stream(text, samples_per_shard)
    if "{" in text:
        shards = sources.expand_braces(text)
    elif path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))  # a folder of shards, as open_source reads it
    else:
        shards = [text] if path.suffix == ".tar" else []
    kind = "FFCV .beton" if path.suffix == ".beton" else "webdataset tar shards" if shards else "ImageFolder"
    info["kind"] = kind
    if shards:  # counting samples means reading every shard's index: the loader does that on the nodes
        return dict(info, shards=len(shards), note="samples counted when the job indexes the shards")
    if kind == "FFCV .beton":
        if not pipelines.available("ffcv"):
            return dict(info, note="FFCV is not installed on this host: samples unknown")
        from pipelines.ffcv_backend import LABEL_FIELD, open_beton

        reader = open_beton(path)
        labels = reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"]
        return dict(info, samples=int(reader.num_samples), classes=int(labels.max()) + 1)
    source = sources.open_source(path)
    return dict(info, samples=len(source), classes=source.num_classes)


def describe_backend(backend: str, data: str | None, device: torch.device, stream: bool = False) -> str:
    """'auto -> dali (why)': the backend the loader will use on `device`, and why."""
    return pipelines.describe_backend(backend, data or "", device, stream)


# ------------------------------------------------------------------------------------------- the plan
def build_plan(cfg: TrainConfig, world_size: int, device: str | torch.device, source_info: dict | None = None,
               backend_choice: str | None = None, devices: str | None = None,
               threads_per_rank: int | None = None, steps_per_epoch: int | None = None) -> dict:
    """What a run of `cfg` on `world_size` ranks of `device` will do (see the module docstring).

    source_info: `describe_source(data)` when the caller already has it; backend_choice: the backend line
    when the caller already knows it; devices: free text for the hardware ("4 nodes x 8 GPUs");
    steps_per_epoch: optimizer steps per epoch when the caller has the loader (the trainer: exact for tar
    shards too), else estimated from the number of samples.
    """
    device = torch.device(device)
    params = count_parameters(cfg)
    data = source_info if source_info is not None else describe_source(cfg.data, cfg.stream, cfg.samples_per_shard)
    global_batch = cfg.global_batch(world_size)

    per_epoch = steps_per_epoch
    if per_epoch is None and data.get("samples") is not None:
        per_epoch = sources.steps_per_epoch(data["samples"], cfg.batch_size, world_size) // cfg.accum_steps
    if cfg.time_budget is not None:  # the trainer fixes the step count after warmup
        total = epochs = None
    else:
        total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch if per_epoch is not None else None
        epochs = cfg.epochs if cfg.epochs is not None else float(f"{total / per_epoch:.3g}") if per_epoch else None

    lr_note = None
    if cfg.base_batch is not None:
        here = scale_lr(cfg.base_lr, global_batch, cfg.base_batch)
        if abs(here - cfg.lr) > 1e-9 * cfg.lr:  # resumed on another world size, or run(cfg) by hand
            launched = round(cfg.lr / cfg.base_lr * cfg.base_batch)
            lr_note = (f"resolved at launch for a global batch of {launched}; kept for this run "
                       f"(global batch {global_batch} would give {here:.3g})")

    if devices is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
        devices = f"{world_size} x {name or 'GPU'}" if device.type == "cuda" else f"{world_size} CPU process(es)"
    checkpoints = list_checkpoints(cfg.out)
    spec = cfg.spec
    return {
        "preset": cfg.preset,
        "arch": cfg.arch,
        "patch_size": params["patch_size"],
        "parameters": {k: params[k] for k in ("backbone", "projector", "total")},
        "views": {"global": {"count": spec.global_views, "size": spec.global_size, "scale": list(spec.global_scale)},
                  "local": {"count": spec.local_views, "size": spec.local_size, "scale": list(spec.local_scale)}},
        "batch": {"per_rank": cfg.batch_size, "world_size": world_size, "accum_steps": cfg.accum_steps,
                  "global": global_batch},
        "steps": total,
        "time_budget_minutes": cfg.time_budget,
        "epochs": epochs,
        "steps_per_epoch": per_epoch,
        "warmup_steps": warmup_steps(cfg, total) if total is not None else cfg.warmup,
        "lr": {"peak": cfg.lr, "base": cfg.base_lr, "base_batch": cfg.base_batch,
               "rule": LR_RULE if cfg.base_batch is not None else "none (--lr given)", "note": lr_note},
        "weight_decay": cfg.effective_weight_decay,
        "lambd": cfg.lambd,
        "num_slices": cfg.num_slices,
        "data": data,
        "backend": backend_choice or describe_backend(cfg.backend, cfg.data, device, cfg.stream),
        "device": device.type,
        "devices": devices,
        "world_size": world_size,
        "threads_per_rank": threads_per_rank,
        "out": cfg.out,
        "resume": f"from {checkpoints[-1].name} (latest of {len(checkpoints)} in out)" if checkpoints else None,
    }


def _n(x: int) -> str:
    """309744768 -> '309.7M' (parameter counts)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return str(x)


def _range(scale) -> str:
    return f"{scale[0]:g}-{scale[1]:g}"


def format_plan(plan: dict) -> str:
    """The plan as the few lines a launcher prints before it starts anything heavy."""
    p, v, b, lr, d = plan["parameters"], plan["views"], plan["batch"], plan["lr"], plan["data"]
    arch = plan["arch"] + (f" (patch {plan['patch_size']})" if plan["patch_size"] else "")
    views = (f"{v['global']['count']} global x {v['global']['size']} px (scale {_range(v['global']['scale'])}) + "
             f"{v['local']['count']} local x {v['local']['size']} px (scale {_range(v['local']['scale'])})")
    if plan.get("time_budget_minutes") is not None:
        length = (f"{plan['time_budget_minutes']:g} min of wall clock (--time-budget): the step count is fixed "
                  "after warmup from the measured step time")
    elif plan["steps"] is None:
        length = f"{plan['epochs']} epochs (steps per epoch known once the job has indexed the data)"
    elif plan["steps_per_epoch"] is None:
        length = f"{plan['steps']:,} steps"
    elif plan["steps_per_epoch"] == 0:
        length = (f"{plan['steps']:,} steps; ! the data holds fewer images than one global batch "
                  f"({b['global']:,}): the trainer will refuse this")
    else:
        length = f"{plan['steps']:,} steps = {plan['epochs']:g} epochs of {plan['steps_per_epoch']:,} steps"
    length += f", warmup {plan['warmup_steps']:,}" if plan["warmup_steps"] is not None else ", warmup 10 % of the run"
    if plan.get("time_budget_minutes") is not None:
        length += f" (after {CALIBRATION_STEPS} steps at LR 0 that time the step)"
    if lr["base_batch"] is None:
        lr_line = f"{lr['peak']:.3g} (--lr as given, not scaled)"
    else:
        lr_line = (f"{lr['peak']:.3g} = {lr['base']:.3g} x {b['global']:,} / {lr['base_batch']:,} ({lr['rule']} "
                   f"scaling of the preset's LR, stated for a global batch of {lr['base_batch']:,})")
        if lr["note"]:
            lr_line = f"{lr['peak']:.3g} (base {lr['base']:.3g} at {lr['base_batch']:,}; {lr['note']})"
    counts = [f"{d['samples']:,} images" if d["samples"] is not None else None,
              f"{d['shards']:,} shards" if d["shards"] is not None else None,
              f"{d['classes']:,} classes" if d["classes"] is not None else None]
    data = ", ".join(x for x in [d["kind"], *counts, d["note"]] if x)
    devices = f"{plan['devices']}, world size {plan['world_size']}"
    if plan["threads_per_rank"]:
        devices += f", {plan['threads_per_rank']} CPU thread(s) per rank"
    rows = [
        ("arch", f"{arch}: {_n(p['total'])} parameters (backbone {_n(p['backbone'])} + projector "
                 f"{_n(p['projector'])})"),
        ("views", views),
        ("batch", f"{b['per_rank']} per rank x {b['world_size']} rank(s) x {b['accum_steps']} accumulation = "
                  f"{b['global']:,} per step"),
        ("length", length),
        ("lr", lr_line),
        ("loss", f"lambda {plan['lambd']:g}, {plan['num_slices']} SIGReg slices; AdamW weight decay "
                 f"{plan['weight_decay']:g}"),
        ("data", f"{d['path'] or '(no --data)'}: {data}"),
        ("backend", plan["backend"]),
        ("devices", devices),
        ("out", plan["out"] + (f", resumes {plan['resume']}" if plan["resume"] else "")),
    ]
    return "\n".join([f"plan: preset {plan['preset']}"] + [f"  {k:<8} {text}" for k, text in rows])
