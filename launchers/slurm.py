"""Launch LeJEPA pretraining on SLURM through submitit: one task per GPU, requeue on timeout/preemption.

    python launchers/slurm.py --arch vit_l --nodes 4 --data /shared/imagenet/train --out /shared/runs/vitl
    python launchers/slurm.py --preset cpu-small --gpus-per-node 0 --nodes 2 --wait          # CPU tasks
    python launchers/slurm.py --preset cpu-small --array lambd=0.02,0.05,0.1 --gpus-per-node 0  # job array
    python launchers/slurm.py ... --dry-run         # print the sbatch script and the plan, submit nothing

Training flags are those of launchers/local.py (trainer.config.add_config_args); the preset defaults to
`seed`, the paper's recipe, and a run on it needs --data (the embedded Fashion-MNIST set is for the CPU
demo, `--preset cpu-small`). The LR is scaled to the job's global batch (trainer.config). Before submitting,
the launcher prints the run's plan (trainer.plan). Every task runs
`trainer.run(cfg)` with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT taken from SLURM by
submitit's TorchDistributedEnvironment. SLURM sends SIGUSR1 `--signal-delay` seconds before the time limit
(and a preempting scheduler sends SIGTERM or SIGUSR1): the trainer saves a checkpoint and chains to
submitit's handler, which calls `TrainTask.checkpoint()` and requeues the job; the requeued job runs the same
config with the same --out, and the trainer resumes from its latest checkpoint there.

A failed attempt (a rank killed, crashed or out of memory, a node lost, a collective or the data loader
timed out) is not a requeue SLURM makes by itself: srun gives the other ranks TASK_GRACE_S to report and
exit, then launchers/supervisor.py, run by the sbatch script after srun, requeues the job (at most
--max-failures times) or stops it with a message when the failure repeats at the same step.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The trainer catches SIGTERM and SIGUSR1 (trainer contract); submitit's own default is SIGUSR2. Set before
# submitit is imported: it reads the variable at import, both here (for `#SBATCH --signal`) and in the job.
os.environ["SUBMITIT_PREEMPT_SIGNAL"] = "USR1"
if __package__ in (None, ""):  # `python launchers/slurm.py` from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import submitit  # noqa: E402
from submitit.slurm.slurm import _make_sbatch_string  # noqa: E402  (the function submitit submits with)

from launchers import supervisor  # noqa: E402

from trainer.config import DEMO_PRESET, TrainConfig, add_config_args, config_from_args, validate_config  # noqa: E402
from trainer.plan import build_plan, data_visible, describe_source, format_plan  # noqa: E402

UP_SCRIPT = "launchers/cluster/up.sh"
NO_CLUSTER_HINT = (f"To try this launcher on one machine, start the local test cluster: sudo {UP_SCRIPT} "
                   "(see README, 'SLURM').")
# CPUs per GPU rank when --cpus-per-task is not given and sinfo cannot tell the node's CPUs and GPUs
# (a dry run off the cluster): the loader's decode threads and the main thread of one GPU.
DEFAULT_CPUS_PER_GPU = 8
REPO = Path(__file__).resolve().parents[1]
# srun --wait: once one rank has exited, the others get this long to say what they saw, then srun ends them
# (a rank stopped or hung in a collective would otherwise hold the attempt until its time limit).
TASK_GRACE_S = 60


class LaunchError(Exception):
    """Bad input or no usable cluster: printed as one line, no traceback."""


# --------------------------------------------------------------------------------------------------------
# What runs on the nodes
# --------------------------------------------------------------------------------------------------------
class TrainTask:
    """One SLURM task = one trainer rank. Submitit pickles this object into the job folder.

    How the rank's attempt ended goes to FOLDER/JOB_RANK_exit.json (launchers/supervisor.py reads it): the
    trainer's failure report (step, operation, why), a requeue (preemption, time limit) or a stop (diverged).
    A failure exits with trainer.faults.EXIT_FAILED without a submitit result file: the supervisor, not the
    first rank to fail, decides whether the job is over."""

    def __init__(self, cfg: TrainConfig, max_failures: int = 3):
        self.cfg, self.max_failures = cfg, max_failures

    def __call__(self) -> dict:
        # CUDA_VISIBLE_DEVICES stays as SLURM set it: the trainer picks cuda:LOCAL_RANK itself.
        dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        print(f"rank {dist.rank}/{dist.world_size} (local {dist.local_rank}) on {os.uname().nodename}, "
              f"master {dist.master_addr}:{dist.master_port}, restart {os.environ.get('SLURM_RESTART_COUNT', 0)}",
              flush=True)
        import traceback

        import trainer  # imported here: the submitting process does not need the training stack
        from trainer.faults import EXIT_FAILED, EXIT_REQUEUE

        paths = submitit.JobEnvironment().paths
        report = supervisor.RankReport(paths.folder, paths.job_id, dist.rank)
        try:
            summary = trainer.run(self.cfg, on_failure=report.failed)
        except SystemExit as e:  # submitit's SIGUSR1 handler requeued the job at its time limit, then exits
            if e.code == -1:
                report.ended(supervisor.REQUEUE, "time limit: requeued by submitit")
            raise
        except submitit.core.utils.UncompletedJobError as e:  # the time limit once more than --max-timeouts
            report.ended(supervisor.STOP, str(e))
            raise SystemExit(EXIT_FAILED) from None
        except Exception:
            traceback.print_exc()  # the whole story in this rank's log; the report has its one line
            raise SystemExit(EXIT_FAILED) from None
        status, step = summary.get("status"), summary.get("step")
        if status == "preempted":
            # SIGTERM from SLURM (requeue, preemption or scancel): SLURM decides whether the job comes back.
            # Returning would write submitit's result file, which tells `job.result()` the job is over.
            report.ended(supervisor.REQUEUE, "preempted: checkpoint saved", step)
            print(f"rank {dist.rank}: checkpoint saved at step {step}; leaving the rest to SLURM", flush=True)
            raise SystemExit(EXIT_REQUEUE)
        if status != "done":
            report.ended(supervisor.STOP, f"training ended with status {status!r} at step {step} (this rank's log "
                                          "says why)", step)
            raise SystemExit(EXIT_FAILED)
        return summary

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR1 (time limit near / preemption) after the trainer saved a checkpoint.

        The resubmitted task is the same config with the same --out: the trainer resumes from the latest
        checkpoint it finds there, so nothing else needs to be carried over.
        """
        return submitit.helpers.DelayedSubmission(TrainTask(self.cfg, self.max_failures))


class EvalTask:
    """--eval-every on SLURM: one task, a job that depends on the training job (`afterany`: it starts once
    the training is over for good, requeues included) and runs evaluation/watch.py's all-shot k-shot on every
    N-th checkpoint (the trainer spared them from rotation); results in the run's TensorBoard and OUT/eval/."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self) -> dict:
        from evaluation.watch import watch

        return watch(self.cfg.out, self.cfg.eval_every, list(self.cfg.eval_data))


def submit_evaluations(folder: Path, params: dict, jobs: list, configs: list[TrainConfig]) -> list:
    """One EvalTask job per training job that has --eval-every, after it (dependency afterany): the training's
    time limit, partition and account, one task with one GPU (or none) and the same CPUs per task."""
    keep = ("time", "partition", "account", "qos", "constraint", "exclude", "mem", "cpus_per_task")
    eval_params = {k: v for k, v in params.items() if k in keep}
    eval_params.update(job_name=f"{params['job_name']}-eval", nodes=1, ntasks_per_node=1,
                       setup=[p for p in params["setup"] if "supervisor" not in p])
    if params.get("gpus_per_node"):
        eval_params["gpus_per_node"] = 1
    evals = []
    for job, cfg in zip(jobs, configs):
        if not cfg.eval_every:
            continue
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(**{f"slurm_{k}": v for k, v in eval_params.items()},
                                   slurm_additional_parameters={"dependency": f"afterany:{job.job_id}"})
        evals.append(executor.submit(EvalTask(cfg)))
    return evals


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(preset="seed")  # the paper's recipe: what a cluster is for
    s = p.add_argument_group("SLURM (submitit)")
    s.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node, one task (trainer rank) per GPU (default 8; 0 = CPU tasks)")
    s.add_argument("--tasks-per-node", type=int,
                   help="CPU jobs only: ranks per node (default 1); with GPUs it is --gpus-per-node")
    s.add_argument("--cpus-per-task", type=int,
                   help="CPUs per rank (data loading + main thread); default for GPU ranks: the node's CPUs / "
                        f"GPUs as sinfo lists them, else {DEFAULT_CPUS_PER_GPU}; for CPU tasks SLURM's (1)")
    s.add_argument("--partition", help="partition (default: the cluster's default partition)")
    s.add_argument("--account", help="account to charge")
    s.add_argument("--qos", help="quality of service")
    s.add_argument("--time", default="24:00:00",
                   help="time limit per attempt, SLURM format: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS "
                        "(default 24:00:00; the job requeues itself when it hits it)")
    s.add_argument("--mem", help="memory per node, e.g. 64G, 500M (a plain number is MB, as in sbatch)")
    s.add_argument("--constraint", help="node features, e.g. a100")
    s.add_argument("--exclude", help="nodes to avoid, e.g. node[3-4]")
    s.add_argument("--job-name", default="lejepa", help="job name (default lejepa)")
    s.add_argument("--array", action="append", default=[], metavar="FLAG=V1,V2,...",
                   help="sweep a training flag as a job array, e.g. lambd=0.02,0.05,0.1; repeat for a grid. "
                        "Each member writes to OUT/<flag>=<value>")
    s.add_argument("--array-parallelism", type=int, default=256, help="array members running at once")
    s.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends SIGUSR1 (checkpoint + requeue); "
                        "slurmctld checks every 30 s, so it may come up to 30 s earlier (default 120)")
    s.add_argument("--max-timeouts", type=int, default=20,
                   help="requeues after hitting the time limit before giving up (preemptions do not count)")
    s.add_argument("--max-failures", type=int, default=3,
                   help="requeues after a failed attempt (a rank killed or crashed, a node lost, a collective or "
                        "the data loader timed out) before giving up; a failure that repeats at the same step "
                        "stops the job at once (default 3)")
    s.add_argument("--wait", action="store_true", help="follow the job, print its log, exit non-zero on failure")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and submit nothing")
    return p


_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"  # D-HH[:MM[:SS]]
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")  # MM | MM:SS | HH:MM:SS


def parse_time(text: str) -> int:
    """SLURM time string -> whole minutes (seconds round up). Raises LaunchError naming --time."""
    m = _TIME.match(text.strip())
    if not m:
        raise LaunchError(f"--time {text!r}: not a SLURM time; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    g = {k: int(v) if v is not None else 0 for k, v in m.groupdict().items()}
    if m.group("d") is not None:
        seconds = ((g["d"] * 24 + g["dh"]) * 60 + g["dm"]) * 60 + g["ds"]
    elif m.group("c") is not None:  # HH:MM:SS
        seconds = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    else:  # MM or MM:SS
        seconds = g["a"] * 60 + g["b"]
    if seconds <= 0:
        raise LaunchError(f"--time {text!r} must be longer than zero")
    return -(-seconds // 60)


def parse_mem_gb(text: str) -> float:
    """sbatch --mem syntax (K/M/G/T suffix, plain number = MB) -> GB for submitit."""
    m = re.match(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", text.strip(), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise LaunchError(f"--mem {text!r}: use a positive size such as 64G, 500M or 1T")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "": 1 / 1024, "G": 1.0, "T": 1024.0}[m.group(2).upper()]
    return float(m.group(1)) * scale


def parse_array(items: list[str]) -> list[list[tuple[str, str]]]:
    """['lambd=0.02,0.05', 'lr=1e-3,2e-3'] -> the grid of (flag, value) assignments, one list per member."""
    training = add_config_args(argparse.ArgumentParser(add_help=False))
    flags = {opt for action in training._actions for opt in action.option_strings}
    axes = []
    for item in items:
        name, sep, values = item.partition("=")
        flag = "--" + name.strip().lstrip("-").replace("_", "-")
        if not sep or not values.strip():
            raise LaunchError(f"--array {item!r}: expected FLAG=V1,V2,... e.g. lambd=0.02,0.05,0.1")
        if flag not in flags or flag in ("--out", "--array"):
            raise LaunchError(f"--array {item!r}: {flag} is not a training flag (see --help)")
        axes.append([(flag, v.strip()) for v in values.split(",") if v.strip()])
    return [list(combo) for combo in itertools.product(*axes)]


def member_name(assignments: list[tuple[str, str]]) -> str:
    return "_".join(f"{flag.lstrip('-').replace('-', '_')}={value}" for flag, value in assignments)


def tasks_per_node(args: argparse.Namespace) -> int:
    """Ranks per node: one per GPU, or --tasks-per-node CPU tasks. Raises LaunchError on a bad count."""
    if args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    if args.gpus_per_node > 0 and args.tasks_per_node not in (None, args.gpus_per_node):
        raise LaunchError(f"--tasks-per-node {args.tasks_per_node}: with GPUs there is one task per GPU "
                          f"(--gpus-per-node {args.gpus_per_node}); use --gpus-per-node 0 for CPU tasks")
    tasks = args.gpus_per_node or (args.tasks_per_node if args.tasks_per_node is not None else 1)
    if tasks < 1:
        raise LaunchError(f"--tasks-per-node must be >= 1, got {args.tasks_per_node}")
    return tasks


def build_configs(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser,
                  world_size: int) -> list[TrainConfig]:
    """One config per job (array member), each validated, --out made absolute (the nodes run elsewhere),
    the LR resolved for `world_size` ranks. Array values go through the flag's own parser, so they are typed
    and checked like any other flag. A --data this host cannot see is left for the nodes to check."""
    base = config_from_args(args, world_size=world_size)
    out = Path(base.out).resolve()
    if not args.array:
        configs = [dataclasses.replace(base, out=str(out))]
    else:
        configs = []
        for assignments in parse_array(args.array):
            extra = [x for pair in assignments for x in pair]
            try:
                member_args = parser.parse_args(argv + extra)
            except SystemExit as e:  # argparse already printed which value was bad
                raise LaunchError(f"--array: bad value in {' '.join(extra)}") from e
            cfg = config_from_args(member_args, world_size=world_size)
            configs.append(dataclasses.replace(cfg, out=str(out / member_name(assignments))))
    for cfg in configs:
        validate_config(cfg, check_data=data_visible(cfg.data))
    return configs


def require_data(configs: list[TrainConfig]) -> None:
    """A cluster trains on real data: only the CPU demo preset may fall back to the embedded set."""
    for cfg in configs:
        if cfg.data is None and cfg.preset != DEMO_PRESET:
            raise LaunchError(f"--data is required for a cluster run (--preset {cfg.preset}): give an ImageFolder "
                              "dir, webdataset tar shards or a .beton on a filesystem every node sees. The embedded "
                              f"Fashion-MNIST set is only for the CPU demo (--preset {DEMO_PRESET}).")


_GPU_GRES = re.compile(r"(?:^|,)gpu(?::[\w.-]+)?:(\d+)")


def cpus_per_gpu_from_sinfo(text: str, partition: str | None, gpus_per_node: int) -> int | None:
    """CPUs per GPU on the smallest node of `partition` (default: the one sinfo marks with *), from the output
    of `sinfo -h -o %P|%c|%G` (partition, CPUs per node, generic resources such as gpu:a100:8(S:0-1)).
    A node whose gres lists no GPU counts `gpus_per_node` (the request). None when no line matches."""
    fits = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 3 or not fields[1].rstrip("+").isdigit():
            continue
        name, cpus, gres = fields
        wanted = name.rstrip("*") == partition if partition is not None else name.endswith("*")
        if not wanted:
            continue
        gpus = sum(int(n) for n in _GPU_GRES.findall(gres)) or gpus_per_node
        fits.append(int(cpus.rstrip("+")) // gpus)  # "64+": nodes of 64 CPUs or more
    return max(1, min(fits)) if fits else None


def cpus_per_task(args: argparse.Namespace) -> tuple[int | None, str]:
    """(--cpus-per-task for the job, where the number comes from). GPU ranks without the flag get the node's
    CPUs / GPUs; CPU tasks without it keep SLURM's default (None: one CPU)."""
    if args.cpus_per_task is not None:
        if args.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task must be >= 1, got {args.cpus_per_task}")
        return args.cpus_per_task, "--cpus-per-task"
    if not args.gpus_per_node:
        return None, "SLURM's default for CPU tasks"
    try:
        out = _run(["sinfo", "-h", "-o", "%P|%c|%G"], timeout=10).stdout if shutil.which("sinfo") else ""
    except (OSError, subprocess.SubprocessError):
        out = ""
    found = cpus_per_gpu_from_sinfo(out, args.partition, args.gpus_per_node)
    where = f"partition {args.partition}" if args.partition else "the default partition"
    if found is None:
        return DEFAULT_CPUS_PER_GPU, f"default {DEFAULT_CPUS_PER_GPU} per GPU: sinfo does not list {where} here"
    return found, f"sinfo: the node's CPUs / GPUs in {where}"


def slurm_parameters(args: argparse.Namespace, num_jobs: int, cpus: int | None = None,
                     folder: Path = Path("slurm")) -> dict:
    """sbatch parameters in submitit's SlurmExecutor vocabulary (also what --dry-run renders). `folder`:
    submitit's, where the supervisor keeps the job's ledger."""
    tasks = tasks_per_node(args)
    for name in ("signal_delay", "max_timeouts", "max_failures"):
        if getattr(args, name) < 0:
            raise LaunchError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.array_parallelism < 1:
        raise LaunchError(f"--array-parallelism must be >= 1, got {args.array_parallelism}")
    minutes = parse_time(args.time)
    if args.signal_delay >= minutes * 60:
        raise LaunchError(f"--signal-delay {args.signal_delay} s must be shorter than --time {args.time!r}")
    params = dict(
        job_name=args.job_name,
        nodes=args.nodes,
        ntasks_per_node=tasks,
        time=minutes,
        signal_delay_s=args.signal_delay,
        # Threads per rank follow the CPUs SLURM gave it; the job must use the trainer's signal (see top); the
        # nodes import this checkout whatever the submit directory; the supervisor counts node failures.
        setup=[f"export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{cpus or 1}}}", "export SUBMITIT_PREEMPT_SIGNAL=USR1",
               f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
               f"{supervisor_command('begin', folder)} || exit 1"],
        # A failed rank does not end the step at once (TASK_GRACE_S); the supervisor then requeues or stops.
        srun_args=["--kill-on-bad-exit=0", f"--wait={TASK_GRACE_S}"],
        teardown=[f"{supervisor_command('end', folder)} $?"],
        # Requeueable even where the cluster's JobRequeue default is 0 (preemption, node failure, requeue).
        additional_parameters={"requeue": True},
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    optional = dict(cpus_per_task=cpus, partition=args.partition, account=args.account, qos=args.qos,
                    constraint=args.constraint, exclude=args.exclude)
    params.update({k: v for k, v in optional.items() if v is not None})
    if args.mem is not None:
        gb = parse_mem_gb(args.mem)
        params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{max(1, round(gb * 1024))}MB"
    if num_jobs > 1:
        params["array_parallelism"] = args.array_parallelism
    return params


def supervisor_command(action: str, folder: Path) -> str:
    return " ".join([shlex.quote(sys.executable), "-m launchers.supervisor", action, shlex.quote(str(folder))])


# --------------------------------------------------------------------------------------------------------
# Talking to the cluster
# --------------------------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_cluster(partition: str | None) -> None:
    """sbatch present, controller answering, partition known: else one clear LaunchError."""
    for tool in ("sbatch", "srun", "sinfo", "sacct"):
        if shutil.which(tool) is None:
            raise LaunchError(f"no `{tool}` on PATH: this machine is not a SLURM submit host. {NO_CLUSTER_HINT}")
    try:
        ping = _run(["scontrol", "ping"])
    except subprocess.TimeoutExpired:
        ping = None
    if ping is None or ping.returncode != 0 or " is UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines()[0] if ping is not None else "no answer within 30 s"
        raise LaunchError(f"no SLURM controller reachable (`scontrol ping`: {said or 'no output'}). {NO_CLUSTER_HINT}")
    if partition is not None:
        names = _run(["sinfo", "-h", "-o", "%R"]).stdout.split()
        if partition not in names:
            raise LaunchError(f"--partition {partition!r} is not a partition of this cluster; "
                              f"sinfo lists: {', '.join(sorted(set(names))) or 'none'}")


def sbatch_script(folder: Path, params: dict, num_jobs: int) -> str:
    """Exactly the text submitit writes to its submission file (same function, same parameters)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=num_jobs if num_jobs > 1 else None,
                               **params)


def make_executor(folder: Path, params: dict, max_timeouts: int) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_timeouts)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    return executor


def log_paths(job: submitit.Job) -> tuple[Path, Path]:
    return job.paths.stdout, job.paths.stderr


# sacct states after which SLURM runs the job no more (unless it requeues it: then squeue lists it again)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "DEADLINE", "BOOT_FAIL")


def job_state(job_id: str) -> tuple[str, bool]:
    """(sacct's state of the job's latest attempt, whether the job is over). An attempt can end FAILED or
    NODE_FAIL and the job be requeued (the supervisor, SLURM): over means a final state and out of squeue."""
    try:
        lines = _run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id]).stdout.splitlines()
        queue = _run(["squeue", "-h", "-o", "%T", "-j", job_id])
    except subprocess.SubprocessError:
        return "UNKNOWN", False
    state = lines[-1].split()[0] if lines and lines[-1].strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    queued = bool(queue.stdout.strip()) or (queue.returncode != 0 and "Invalid job id" not in queue.stderr)
    return state, state in FINAL_STATES and not queued


def follow(jobs: list, poll_s: float = 3.0) -> bool:
    """Print the first member's rank-0 log as it grows and its state changes; report every member's end.
    A failed attempt that the supervisor requeues keeps its job id and log files: this follows it through
    PENDING and RUNNING again until the job is over. True if every member completed."""
    stdout, stderr = log_paths(jobs[0])
    offsets = {stdout: 0, stderr: 0}

    def print_new() -> None:
        for path in offsets:
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(offsets[path])
                    chunk = f.read()
                offsets[path] += len(chunk)
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()

    last_state = None
    pending = list(jobs)
    ok = True
    while pending:
        print_new()
        for job in list(pending):
            state, over = job_state(job.job_id)
            if job is jobs[0] and state != last_state and state != "UNKNOWN":  # UNKNOWN: not in sacct yet
                print(f"[slurm.py] job {job.job_id}: {state}", flush=True)
                last_state = state
            if over:
                pending.remove(job)
                if job is jobs[0]:
                    print_new()
                ok &= report_end(job, state)
        if pending:
            time.sleep(poll_s)
    return ok


def report_end(job, state: str) -> bool:
    stdout, stderr = log_paths(job)
    try:
        summary = job.results()[0]  # rank 0's summary (every task returns one)
    except Exception as e:  # the supervisor's reason to stop, the job's traceback, or why no result exists
        print(f"[slurm.py] job {job.job_id} did not complete: state {state}\n  log: {stdout}\n  err: {stderr}\n"
              f"{str(e).strip()[-3000:]}", file=sys.stderr, flush=True)
        return False
    print(f"[slurm.py] job {job.job_id} done: step {summary.get('step')}, out {summary.get('out')}", flush=True)
    return True


def plans_text(configs: list[TrainConfig], args: argparse.Namespace, world: int, cpus: int | None,
               cpus_why: str) -> str:
    """The plan of the first job, then what differs for each other array member (data described once)."""
    gpus = args.gpus_per_node
    devices = (f"{args.nodes} node(s) x {gpus} GPU(s)" if gpus
               else f"{args.nodes} node(s) x {world // args.nodes} CPU task(s)")
    sources: dict = {}
    plans = []
    for cfg in configs:
        key = (cfg.data, cfg.stream, cfg.samples_per_shard)
        if key not in sources:
            sources[key] = describe_source(*key)
        plans.append(build_plan(cfg, world_size=world, device="cuda" if gpus else "cpu",
                                source_info=sources[key], devices=devices, threads_per_rank=cpus or 1))
    lines = [format_plan(plans[0]), f"  slurm    --cpus-per-task {cpus or 1} ({cpus_why}), OMP_NUM_THREADS the same"]
    first = _flat(plans[0])
    for cfg, plan in zip(configs[1:], plans[1:]):
        changed = {k: v for k, v in _flat(plan).items() if first.get(k) != v}
        lines.append(f"  member {Path(cfg.out).name}: " + ", ".join(f"{k} {v}" for k, v in changed.items()))
    return "\n".join(lines)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        world = args.nodes * tasks_per_node(args)
        configs = build_configs(args, argv, parser, world)
        cpus, cpus_why = cpus_per_task(args)
        # submitit's pickles and logs, shared by array members: on a filesystem every node sees, like --out
        folder = Path(config_from_args(args).out).resolve() / "slurm"
        params = slurm_parameters(args, len(configs), cpus, folder)
        require_data(configs)
        plan = plans_text(configs, args, world, cpus, cpus_why)
        if args.dry_run:
            print(sbatch_script(folder, params, len(configs)))
            for cfg in configs:
                print(f"# member out: {cfg.out}")
            print(plan)
            return 0
        check_cluster(args.partition)
    except (LaunchError, ValueError) as e:  # ValueError: the trainer's own config checks
        print(f"slurm.py: error: {e}", file=sys.stderr)
        return 2
    print(plan, flush=True)

    executor = make_executor(folder, params, args.max_timeouts)
    try:
        with executor.batch() if len(configs) > 1 else contextlib.nullcontext():
            jobs = [executor.submit(TrainTask(cfg, args.max_failures)) for cfg in configs]
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as e:
        hint = " (no GPUs on this cluster? --gpus-per-node 0 runs CPU tasks)" if "gres" in str(e) else ""
        print(f"slurm.py: error: sbatch refused the job: {str(e).strip()}{hint}", file=sys.stderr)
        return 2

    devices = f"{params['gpus_per_node']} GPU(s)/node" if "gpus_per_node" in params else "CPU tasks"
    for job, cfg in zip(jobs, configs):
        stdout, stderr = log_paths(job)
        print(f"submitted job {job.job_id}: {params['nodes']} node(s) x {params['ntasks_per_node']} task(s) "
              f"= world size {world}, {devices}\n  out:  {cfg.out}\n  log:  {stdout}\n  err:  {stderr}")
    for job in submit_evaluations(folder, params, jobs, configs):
        print(f"submitted k-shot job {job.job_id} (after the training: --eval-every); log {log_paths(job)[0]}")
    print(f"monitor: squeue -j {jobs[0].job_id.split('_')[0]}    tail -f {log_paths(jobs[0])[0]}\n"
          f"tensorboard --logdir {folder.parent}")
    if not args.wait:
        return 0
    return 0 if follow(jobs) else 1


if __name__ == "__main__":
    # Run through the package so submitit pickles TrainTask by reference (launchers.slurm.TrainTask), not by
    # value from __main__.
    from launchers.slurm import main as _main

    sys.exit(_main())
