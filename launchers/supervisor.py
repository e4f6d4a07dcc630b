"""Between the attempts of a SLURM job: a failed attempt is counted and the job requeued, or stopped with a
message that says why. launchers/slurm.py puts two commands around srun in the sbatch script; both run on the
batch host, once per attempt:

    python -m launchers.supervisor begin FOLDER      # before srun
    python -m launchers.supervisor end FOLDER RC     # after srun; RC is srun's exit status

An attempt *failed* when srun ends non-zero and no rank reported a preemption or time limit (those are
SLURM's requeues, bounded by --max-timeouts; a job that `scancel` stops is never resubmitted). `end` then

1. reads what the ranks reported (FOLDER/JOB_RANK_exit.json, written by launchers.slurm.TrainTask: the step,
   the operation under way, why; trainer/faults.py) and names the rank that failed: the one whose own error
   ended it, else one that ended without a report (killed, crashed, out of memory, stopped: srun's lines in
   rank 0's log say how), as seen by the ranks that timed out waiting for it or lost it;
2. appends the failure, with the latest checkpoint step at that moment, to the job's ledger
   (FOLDER/JOB_faults.json, atomic writes: it survives the requeue);
3. requeues the job (`scontrol requeue`: same job id and log files; the trainer resumes from the latest
   readable checkpoint), unless
   - the failure is at the same step as the previous one with no new checkpoint in between: a bug, not bad
     luck; or
   - it is failure number --max-failures + 1; or
   - the run ended itself (diverged, or the time limit once more than --max-timeouts);
   then it prints why (step, rank, log path), leaves that as rank 0's submitit result (what `--wait` and
   `job.result()` report) and exits 1: the job ends FAILED.

`begin` counts the attempts that ended without an `end`: when the batch host's node fails, SLURM requeues
the job itself (sbatch --requeue) and `sacct --duplicates` lists that attempt as NODE_FAIL.

Only the standard library is imported up front: an attempt that ends well costs no torch import.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REQUEUE, FAILED, STOP = "requeue", "failed", "stop"  # how a rank's attempt ended (its report's `outcome`)
NODE_LOST = ("NODE_FAIL", "BOOT_FAIL")  # sacct states of attempts SLURM requeued after losing a node


def current_job_id(env=os.environ) -> str:
    """The job id as submitit names it: JOB, or ARRAYJOB_INDEX for an array member."""
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def current_attempt(env=os.environ) -> int:
    return int(env.get("SLURM_RESTART_COUNT") or 0)


def report_path(folder: Path, job: str, rank: int) -> Path:
    return Path(folder) / f"{job}_{rank}_exit.json"


def ledger_path(folder: Path, job: str) -> Path:
    return Path(folder) / f"{job}_faults.json"


def log_path(folder: Path, job: str, rank: int) -> Path:
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job, task_id=rank).stderr


def _write_json(path: Path, data: dict) -> None:
    from common.io import atomic_open

    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=1)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class RankReport:
    """How one rank's attempt ended, for `end`: written by TrainTask (and by the trainer's watchdog through
    `failed`) before the rank exits."""

    def __init__(self, folder: Path, job: str, rank: int):
        self.path, self.rank, self.attempt = report_path(folder, job, rank), rank, current_attempt()

    def failed(self, failure) -> None:
        """`trainer.run(cfg, on_failure=...)`: a trainer.faults.Failure."""
        self.write(FAILED, **failure.to_dict())

    def ended(self, outcome: str, message: str, step: int | None = None) -> None:
        self.write(outcome, rank=self.rank, step=step, phase=None, kind=outcome, message=message)

    def write(self, outcome: str, **fields) -> None:
        _write_json(self.path, dict(fields, attempt=self.attempt, outcome=outcome, host=socket.gethostname(),
                                    time=time.time()))


def read_reports(folder: Path, job: str, world: int, attempt: int) -> list[dict]:
    found = (_read_json(report_path(folder, job, rank)) for rank in range(world))
    return [r for r in found if r is not None and r.get("attempt") == attempt]


def describe_failure(reports: list[dict], world: int) -> dict:
    """The rank that failed, at which step, doing what, and why, from the reports of one failed attempt."""
    from trainer.faults import SEEN_FROM_PEER

    own = [r for r in reports if r["outcome"] in (FAILED, STOP) and r["kind"] not in SEEN_FROM_PEER]
    silent = sorted(set(range(world)) - {r["rank"] for r in reports})
    witness = reports[0] if reports else None
    if own:
        r = own[0]
        return {"rank": r["rank"], "step": r["step"], "phase": r["phase"], "kind": r["kind"], "why": r["message"]}
    if silent:
        why = ("ended without a report (killed, crashed, out of memory or stopped: srun's lines in rank 0's log say "
               "how)")
        if witness is not None:
            why += f"; rank {witness['rank']} saw {witness['kind']}: {witness['message']}"
            return {"rank": silent[0], "step": witness["step"], "phase": witness["phase"], "kind": witness["kind"],
                    "why": why}
        return {"rank": silent[0], "step": None, "phase": None, "kind": "no report", "why": why}
    r = witness  # every rank saw another one fail: a network fault, say
    return {"rank": r["rank"], "step": r["step"], "phase": r["phase"], "kind": r["kind"], "why": r["message"]}


def stop_reason(failures: list[dict], max_failures: int) -> str | None:
    """Why the job must not come back after the last of `failures` (all failures so far), or None."""
    last = failures[-1]
    if len(failures) >= 2:
        prev = failures[-2]
        if last["step"] is not None and last["step"] == prev["step"] and last["checkpoint"] == prev["checkpoint"]:
            return (f"attempt {last['attempt'] + 1} failed at step {last['step']} exactly as attempt "
                    f"{prev['attempt'] + 1} did, with no checkpoint written in between: a failure that repeats at "
                    "the same step is a bug, not bad luck, so the job is not resubmitted")
    if len(failures) > max_failures:
        return f"{len(failures)} failure(s), more than --max-failures {max_failures}"
    return None


def failure_line(job: str, f: dict) -> str:
    where = f"step {f['step']}" if f["step"] is not None else "an unknown step"
    doing = f", {f['phase']}" if f.get("phase") else ""
    rank = f["rank"] if f["rank"] is not None else "unknown"
    return f"job {job} attempt {f['attempt'] + 1} failed at {where} (rank {rank}{doing}): {f['why']}"


class Supervisor:
    """The job's ledger and what `begin` / `end` do with it (module docstring)."""

    def __init__(self, folder: Path, job: str):
        self.folder, self.job, self.attempt = Path(folder), job, current_attempt()
        self.path = ledger_path(self.folder, job)
        self.ledger = _read_json(self.path) or {"job": job, "failures": [], "node_failures_seen": 0, "stopped": None}

    def task(self):
        """The submitted TrainTask (config, --max-failures), from submitit's pickle."""
        from submitit.core.utils import DelayedSubmission, JobPaths

        return DelayedSubmission.load(JobPaths(self.folder, job_id=self.job, task_id=0).submitted_pickle).function

    def latest_checkpoint(self, out: str) -> int | None:
        from models.checkpoint import list_checkpoints

        files = list_checkpoints(out)
        return int(files[-1].stem.split("_")[1]) if files else None

    def record(self, failure: dict, requeue: bool = True) -> int:
        """Add `failure` to the ledger, then requeue the job (0; `requeue=False`: SLURM did already) or stop it
        with the reason (1)."""
        task = self.task()
        failure = dict(failure, attempt=failure.get("attempt", self.attempt), time=time.time(),
                       checkpoint=self.latest_checkpoint(task.cfg.out),
                       log=str(log_path(self.folder, self.job, failure["rank"] if failure["rank"] is not None else 0)))
        failures = self.ledger["failures"] = [*self.ledger["failures"], failure]
        reason = failure.pop("stop", None) or stop_reason(failures, task.max_failures)
        line = failure_line(self.job, failure)
        if reason is None:
            _write_json(self.path, self.ledger)
            resume = f"checkpoint step {failure['checkpoint']}" if failure["checkpoint"] is not None else "the start"
            print(f"\n{line}; resubmitted (failure {len(failures)} of at most {task.max_failures}), resuming from "
                  f"{resume}. log: {failure['log']}", file=sys.stderr, flush=True)
            if requeue:
                self.requeue()
            return 0
        message = f"{line}. Stopped: {reason}. log: {failure['log']}"
        self.ledger["stopped"] = message
        _write_json(self.path, self.ledger)
        self.leave_result(message)
        print(f"\n{message}", file=sys.stderr, flush=True)
        return 1

    def requeue(self) -> None:
        """Back to the queue, same job id. Result files of ranks that finished would tell submitit (and
        `--wait`) the job is over: they go."""
        from submitit.core.utils import JobPaths

        for rank in range(int(os.environ.get("SLURM_NTASKS", 1))):
            JobPaths(self.folder, job_id=self.job, task_id=rank).result_pickle.unlink(missing_ok=True)
        subprocess.run(["scontrol", "requeue", self.job], check=True, capture_output=True, timeout=120)

    def leave_result(self, message: str) -> None:
        """Rank 0's submitit result: ("error", message), what job.result() raises and `--wait` prints."""
        from submitit.core import utils

        with utils.temporary_save_path(utils.JobPaths(self.folder, job_id=self.job, task_id=0).result_pickle) as tmp:
            utils.cloudpickle_dump(("error", message), tmp)

    def end(self, rc: int) -> int:
        if rc == 0:
            return 0
        world = int(os.environ.get("SLURM_NTASKS", 1))
        reports = read_reports(self.folder, self.job, world, self.attempt)
        stopped = any(r["outcome"] == STOP for r in reports)
        if not stopped and any(r["outcome"] == REQUEUE for r in reports):
            return rc  # preempted, time limit or scancel: SLURM already has the job (it kills this script)
        failure = describe_failure(reports, world)
        if stopped:  # diverged, or out of --max-timeouts
            failure["stop"] = "the run ended itself; resubmitting would not change that"
        return self.record(failure)

    def begin(self) -> int:
        """Count attempts SLURM requeued after losing a node (no `end` ran for them)."""
        if self.attempt == 0:
            return 0
        out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", self.job], capture_output=True,
                             text=True, timeout=120).stdout
        lost = sum(1 for line in out.splitlines() if line.split(" ")[0] in NODE_LOST)
        new, self.ledger["node_failures_seen"] = lost - self.ledger["node_failures_seen"], lost
        for _ in range(max(0, new)):
            failure = {"attempt": self.attempt - 1, "rank": None, "step": None, "phase": None, "kind": "node failure",
                       "why": "a node of the job failed (sacct: NODE_FAIL) and SLURM requeued it"}
            if self.record(failure, requeue=False):
                return 1
        return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("begin", "end") or (argv[0] == "end" and len(argv) != 3):
        print("usage: python -m launchers.supervisor begin FOLDER | end FOLDER SRUN_EXIT_STATUS", file=sys.stderr)
        return 2
    supervisor = Supervisor(Path(argv[1]), current_job_id())
    return supervisor.begin() if argv[0] == "begin" else supervisor.end(int(argv[2]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
