"""Train on this machine: one process, or N DDP processes (torchrun-style env vars), each calling
`trainer.run(cfg)`.

    python launchers/local.py --preset cpu-small --out runs/demo                  # embedded Fashion-MNIST
    python launchers/local.py --arch vit_s --data DIR_OR_BETON --backend auto --out runs/x --nproc 8 --epochs 100

Every flag of `trainer.config.add_config_args` is accepted (the SLURM launcher takes the same ones). The
preset defaults to `seed` where CUDA is present and `cpu-small` otherwise; --nproc to one process per
visible GPU (1 without CUDA). The config is validated and the run's plan (trainer.plan) printed before any
process starts; --dry-run stops there.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python launchers/local.py` from a checkout: make the repo importable
    sys.path.insert(0, str(REPO))

import torch
import torch.multiprocessing as mp

from trainer import add_config_args, config_from_args, run, validate_config
from trainer.config import DEMO_PRESET
from trainer.plan import build_plan, format_plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_preset() -> str:
    """The paper's recipe where CUDA is present, the CPU demo otherwise (--preset overrides both)."""
    return "seed" if torch.cuda.is_available() else DEMO_PRESET


def uses_cuda(device: str | None) -> bool:
    return device == "cuda" or (device in (None, "auto") and torch.cuda.is_available())


def threads_per_process(nproc: int) -> int:
    """This process's CPUs (its affinity mask: what taskset/cgroups/SLURM allow, not the machine's count)
    shared by the N processes."""
    return max(1, len(os.sched_getaffinity(0)) // nproc)


def _worker(rank: int, world: int, port: int, threads: int, cfg) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)  # N processes share the cores instead of each taking all of them
    summary = run(cfg)
    if rank == 0:
        print(json.dumps(summary), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int,
                        help="DDP processes on this machine (default: one per visible GPU with CUDA, else 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the run's plan and start nothing")
    add_config_args(parser)
    parser.set_defaults(preset=default_preset())
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = uses_cuda(args.device)
    nproc = args.nproc if args.nproc is not None else torch.cuda.device_count() if cuda else 1
    try:
        if cuda and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        if nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {nproc}")
        cfg = config_from_args(args, world_size=nproc)
        validate_config(cfg)
        if nproc > 1 and cuda and nproc > torch.cuda.device_count():
            raise ValueError(f"--nproc {nproc} > {torch.cuda.device_count()} visible GPUs")
        threads = threads_per_process(nproc) if nproc > 1 else torch.get_num_threads()
        plan = build_plan(cfg, world_size=nproc, device="cuda" if cuda else "cpu", threads_per_rank=threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan), flush=True)
    if args.dry_run:
        return 0
    watcher = start_watcher(cfg, cuda) if cfg.eval_every else None
    try:
        if nproc == 1:
            summary = run(cfg)
            print(json.dumps(summary), flush=True)
        else:
            mp.spawn(_worker, args=(nproc, free_port(), threads, cfg), nprocs=nproc, join=True)
            summary = {"status": "see rank 0 output"}
    finally:
        if watcher is not None:  # it evaluates what is left (the final checkpoint), then exits
            print(f"waiting for the k-shot watcher to finish (log: {Path(cfg.out) / 'eval' / 'watch.log'})", flush=True)
            watcher.wait()
    return 0 if summary.get("status") in ("done", "preempted", "see rank 0 output") else 1


def start_watcher(cfg, cuda: bool) -> subprocess.Popen:
    """--eval-every: evaluation/watch.py in the background, polling the run dir for the checkpoints to evaluate
    (all-shot k-shot on --eval-data), results into the run's TensorBoard (eval/<dataset>/all) and OUT/eval/.
    On a CPU it takes one thread beside the training; it stops after the final checkpoint or when we exit."""
    out = Path(cfg.out)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    log_path = out / "eval" / "watch.log"
    cmd = [sys.executable, str(REPO / "evaluation" / "watch.py"), "--run", str(out), "--every", str(cfg.eval_every),
           "--eval-data", *cfg.eval_data, "--follow", "--poll", "10", *([] if cuda else ["--threads", "1"])]
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    log.close()
    print(f"k-shot watcher started: every {cfg.eval_every} steps on {', '.join(cfg.eval_data)}; log {log_path}",
          flush=True)
    return proc


if __name__ == "__main__":
    sys.exit(main())
