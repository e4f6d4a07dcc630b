"""How many CPU threads a loader may use: the one rule every backend follows."""

from __future__ import annotations

import os


def cpus_per_rank() -> int:
    """CPUs this process may use for its input pipeline.

    The affinity mask (what taskset, cgroups and SLURM's task binding allow), never `os.cpu_count()`, which
    counts the whole node: eight ranks each taking 128 "cores" would run 1024 threads on them. Under SLURM
    it is capped by `SLURM_CPUS_PER_TASK` (a step launched without binding sees the node's mask). Without
    SLURM, the ranks that `launchers/local.py` or torchrun start on one machine share one mask: it is split
    by `LOCAL_WORLD_SIZE`.
    """
    cpus = len(os.sched_getaffinity(0))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return max(1, min(cpus, int(slurm)))
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, cpus // int(local)) if local.isdigit() and int(local) > 0 else max(1, cpus)


__all__ = ["cpus_per_rank"]
