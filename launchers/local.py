"""Train on this machine: one process, or N DDP processes (torchrun-style env vars), each calling
`trainer.run(cfg)`.

    python launchers/local.py --preset cpu-small --out runs/demo                  # embedded Fashion-MNIST
    python launchers/local.py --arch vit_s --data DIR_OR_BETON --backend auto --out runs/x --nproc 8 --epochs 100

Every flag of `trainer.config.add_config_args` is accepted (the SLURM launcher takes the same ones).
The config is validated before any process starts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launchers/local.py` from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.multiprocessing as mp

from trainer import add_config_args, config_from_args, run, validate_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, cfg) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)  # N CPU processes share the cores instead of oversubscribing them
    summary = run(cfg)
    if rank == 0:
        print(json.dumps(summary), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1,
                        help="DDP processes on this machine (default 1; one per GPU when CUDA is present)")
    add_config_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    nproc = args.nproc
    try:
        if nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {nproc}")
        cfg = config_from_args(args)
        validate_config(cfg)
        if nproc > 1 and torch.cuda.is_available() and nproc > torch.cuda.device_count():
            raise ValueError(f"--nproc {nproc} > {torch.cuda.device_count()} visible GPUs")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if nproc == 1:
        summary = run(cfg)
        print(json.dumps(summary), flush=True)
    else:
        threads = max(1, (os.cpu_count() or 1) // nproc)
        mp.spawn(_worker, args=(nproc, free_port(), threads, cfg), nprocs=nproc, join=True)
        summary = {"status": "see rank 0 output"}
    return 0 if summary.get("status") in ("done", "preempted", "see rank 0 output") else 1


if __name__ == "__main__":
    sys.exit(main())
