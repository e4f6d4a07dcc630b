"""The checkpoint format, shared by the trainer (writes) and evaluation (reads).

One file per step, `RUN_DIR/checkpoint_{step:06d}.pt`, a plain dict loadable with
`torch.load(weights_only=True)` (tensors, numbers, strings, lists, dicts only):

    {"format": "lejepa-ckpt/1", "step", "epoch", "step_in_epoch", "world_size",
     "config": TrainConfig as a plain dict (arch, proj_dim, hidden_dim, patch_size, preset, spec, ...),
     "model": Encoder state_dict (unwrapped), "optimizer", "scheduler", "scaler", "probe",
     "rng": one dict of RNG states per rank, "code_version"}
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from common.io import atomic_open, fsync_dir
from models.encoder import Encoder, build_encoder
from models.registry import ARCHS

FORMAT = "lejepa-ckpt/1"
_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")
_TEMP = re.compile(r"^\.checkpoint_\d+\.pt\..+\.tmp$")  # atomic_open's temp file of a checkpoint


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:06d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, sorted by step (oldest first). Temp files are ignored."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep: int = 3, keep_every: int | None = None) -> Path:
    """Write `state` atomically (temp file in the same dir + fsync + rename) and keep the last `keep` files,
    plus every file whose step is a multiple of `keep_every` (the checkpoints evaluation/watch.py reads, so a
    watcher that runs late, e.g. a SLURM job after the training, still finds them).

    A crash mid-write leaves at most a stray temp file, never a half-written `checkpoint_*.pt`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(run_dir, step)
    with atomic_open(final) as f:  # a failed write removes its temp file
        try:
            torch.save(dict(state, format=FORMAT, step=step), f)
        except RuntimeError as e:  # torch reports a failed f.write as "unexpected pos ...": say what failed
            if isinstance(e.__context__, OSError):
                raise e.__context__ from e
            raise
    fsync_dir(run_dir)  # make the rename itself durable
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if not (keep_every and int(_NAME.match(old.name).group(1)) % keep_every == 0):
                old.unlink(missing_ok=True)
    return final


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that were killed mid-way (a failed write removes its own).
    Call it only while no write to `run_dir` is under way."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.iterdir() if _TEMP.match(p.name)] if run_dir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _load_file(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, disallowed pickle content
        raise ValueError(f"checkpoint {path} is truncated or corrupt, or holds objects that "
                         f"torch.load(weights_only=True) refuses: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path} is not a {FORMAT} file (format: {got!r})")
    arch = ckpt.get("config", {}).get("arch")
    if arch not in ARCHS:
        raise ValueError(f"checkpoint {path} has unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    return ckpt


def load_checkpoint(path_or_run_dir: str | Path) -> dict:
    """Load one checkpoint file, or the latest valid one of a run dir.

    For a run dir, a truncated/corrupt latest file is reported with a warning and the previous one is
    used (this is what a crash during a non-atomic copy or a full disk leaves behind).
    """
    path = Path(path_or_run_dir)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if path.is_file():
        return _load_file(path)
    files = list_checkpoints(path)
    if not files:
        raise FileNotFoundError(f"no checkpoint_*.pt files in run dir {path}")
    errors = []
    for f in reversed(files):
        try:
            ckpt = _load_file(f)
        except ValueError as e:
            if "truncated or corrupt" not in str(e):
                raise
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
            errors.append(str(e))
            continue
        ckpt["path"] = str(f)
        return ckpt
    raise ValueError(f"every checkpoint in {path} is unreadable:\n  " + "\n  ".join(errors))


def encoder_from_checkpoint(ckpt_or_path: dict | str | Path) -> tuple[Encoder, dict]:
    """Rebuild the trained Encoder (eval mode, on CPU) and return it with the run's config dict."""
    ckpt = ckpt_or_path if isinstance(ckpt_or_path, dict) else load_checkpoint(ckpt_or_path)
    cfg = ckpt["config"]
    encoder = build_encoder(
        cfg["arch"], proj_dim=cfg["proj_dim"], hidden_dim=cfg.get("hidden_dim", 2048),
        patch_size=cfg.get("patch_size"), img_size=cfg["spec"]["global_size"],
    )
    encoder.load_state_dict(ckpt["model"])
    return encoder.eval(), cfg
