"""Shared helpers for benchmark scripts: machine description, JSON lines, BENCHMARKS.md rows."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    # the cores this process may use (taskset, cgroups, SLURM), not the machine's count
    return f"{len(os.sched_getaffinity(0))} cores ({cpu}), {gpu}, torch {torch.__version__}"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def emit(record: dict) -> None:
    """One JSON line per result on stdout."""
    print(json.dumps(record), flush=True)


def append_rows(section: str, header: list[str], rows: list[list], note: str = "") -> None:
    """Append a dated table to BENCHMARKS.md under `## section` (machine and command recorded)."""
    lines = [
        f"\n### {section} — {datetime.date.today().isoformat()}\n",
        f"Machine: {machine()}  \nCommand: `{command()}`\n",
    ]
    if note:
        lines.append(f"{note}\n")
    lines.append("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
    lines += ["| " + " | ".join(str(c) for c in row) + " |\n" for row in rows]
    with open(BENCHMARKS_MD, "a") as f:
        f.writelines(lines)
