"""Checkpoints of a run: what goes in (model, optimizer, scheduler, scaler, every rank's RNG and loader
state, the position in the data), the resume checks, and the exact restore.

Format and atomic writes: models/checkpoint.py (shared with evaluation). Resume is exact: on CPU the losses
after a kill -9 equal an uninterrupted run's. A write that fails (full disk, I/O error) leaves the previous
checkpoint the latest readable one and no temp file; the run goes on and writes at the next checkpoint step,
and `--max-ckpt-failures` failures in a row stop it (CheckpointError).
"""

from __future__ import annotations

import random
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tqdm import tqdm

from models import list_checkpoints, load_checkpoint, save_checkpoint
from models.checkpoint import remove_temp_files
from trainer.config import RESUME_MUST_MATCH, TrainConfig


@dataclass
class Progress:
    """Where the run is: completed optimizer steps, the loader's epoch and batches consumed in it."""

    step: int = 0
    epoch: int = 0
    pos: int = 0


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def code_version() -> str:
    try:
        repo = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _comparable(cfg: dict, name: str):
    if name == "weight_decay":
        return TrainConfig.from_dict(cfg).effective_weight_decay
    value = cfg.get(name)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()} if name == "spec" else value


def find_resume_checkpoint(cfg: TrainConfig) -> dict | None:
    """The checkpoint to resume from (latest valid in `out`), after checking it matches `cfg`."""
    if not list_checkpoints(cfg.out):
        return None
    if not cfg.resume:
        raise ValueError(f"--out {cfg.out} already holds checkpoints and --no-resume was given: "
                         "choose an empty --out or drop --no-resume to continue that run")
    ckpt = load_checkpoint(cfg.out)  # warns and falls back when the latest file is truncated
    saved, now = ckpt["config"], cfg.to_dict()
    for name in RESUME_MUST_MATCH:
        if _comparable(saved, name) != _comparable(now, name):
            raise ValueError(
                f"checkpoint {ckpt['path']} was trained with {name}={_comparable(saved, name)!r} but this run "
                f"has {name}={_comparable(now, name)!r}; use another --out (or the same settings) to resume"
            )
    return ckpt


def _gather(obj, world: int) -> list:
    """Every rank's `obj` on every rank (a list indexed by rank)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


class CheckpointError(RuntimeError):
    """`--max-ckpt-failures` checkpoint writes in a row failed (or the final one did)."""


class Checkpointer:
    """Saves the run's state: every rank contributes its RNG (and loader) state, rank 0 writes the file
    atomically and keeps the last `cfg.keep_ckpts`. Rank 0 first removes temp files that a killed write left."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, module, optimizer, scheduler, scaler, loader,
                 version: str):
        self.cfg, self.rank, self.world, self.version = cfg, rank, world, version
        self.module, self.optimizer, self.scheduler, self.scaler, self.loader = (
            module, optimizer, scheduler, scaler, loader)
        self.failures = 0  # failed writes in a row
        if rank == 0 and (stale := remove_temp_files(cfg.out)):
            print(f"removed {len(stale)} temp file(s) of an interrupted checkpoint write from {cfg.out}", flush=True)

    def save(self, progress: Progress, extra: dict | None = None) -> bool:
        """Write a checkpoint; False when the write failed (said in one line; the run may go on).
        `extra`: run facts fixed during training (e.g. the total step count of a time budget)."""
        rngs = _gather(rng_state(), self.world)
        loader_states = _gather(self.loader.state_dict(), self.world) if hasattr(self.loader, "state_dict") else None
        error = None
        if self.rank == 0:
            epoch, pos = progress.epoch, progress.pos
            if pos >= len(self.loader):  # the epoch is used up: resume at the start of the next
                epoch, pos = epoch + 1, 0
            probe = self.module.probe
            state = {"epoch": epoch, "step_in_epoch": pos, "world_size": self.world, "config": self.cfg.to_dict(),
                     "model": self.module.encoder.state_dict(),
                     "probe": probe.state_dict() if probe is not None else None,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rngs, "loader": loader_states,
                     "code_version": self.version, **(extra or {})}
            try:
                # the checkpoints --eval-every evaluates are spared from rotation (a late watcher still finds them)
                save_checkpoint(state, self.cfg.out, progress.step, keep=self.cfg.keep_ckpts,
                                keep_every=self.cfg.eval_every)
            except OSError as e:  # full disk, quota, I/O error: the temp file is gone, the previous file stands
                error = f"{type(e).__name__}: {e}"
        error = _gather(error, self.world)[0]  # rank 0's outcome on every rank (and the barrier after the write)
        if error is None:
            self.failures = 0
            return True
        self.failures += 1
        if self.rank == 0:
            latest = list_checkpoints(self.cfg.out)
            tqdm.write(f"checkpoint at step {progress.step} not written ({error}); the latest readable is "
                       f"{latest[-1] if latest else 'none'}; training goes on and retries at the next checkpoint "
                       f"step ({self.failures} failure(s) in a row, limit --max-ckpt-failures "
                       f"{self.cfg.max_ckpt_failures})")
        if self.failures >= self.cfg.max_ckpt_failures:
            raise CheckpointError(f"{self.failures} checkpoint writes in a row failed (limit --max-ckpt-failures "
                                  f"{self.cfg.max_ckpt_failures}), the last at step {progress.step}: {error}")
        return False


def restore(ckpt: dict, module, optimizer, scheduler, scaler, loader, rank: int, world: int) -> Progress:
    """Load a checkpoint into the run's objects; returns where to continue."""
    module.encoder.load_state_dict(ckpt["model"])
    if module.probe is not None and ckpt["probe"] is not None:
        module.probe.load_state_dict(ckpt["probe"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    progress = Progress(ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"])
    same_world = ckpt["world_size"] == world
    if same_world:
        set_rng_state(ckpt["rng"][rank])
    else:  # same data, other sharding: continue at the same fraction of the epoch (not bit-exact)
        warnings.warn(f"resuming a {ckpt['world_size']}-rank checkpoint on {world} ranks: not bit-exact")
        progress.pos = progress.pos * ckpt["world_size"] // world
        set_rng_state(ckpt["rng"][0])
    states = ckpt.get("loader")
    if states and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(states[rank] if same_world else None)
    return progress
