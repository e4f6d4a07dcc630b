"""launchers/slurm.py against a real SLURM: the local cluster of launchers/cluster/up.sh (2 fake nodes).

The long jobs are submitted together at the start (module fixture `jobs`) so their waits overlap: requeue
and restart delays are SLURM's (credential expiry, scheduler ticks), not CPU time. Every job is the
cpu-small preset on the imagenette fixture with tiny batches, one thread per rank.
What is asserted comes from what the jobs leave behind: sacct states, submitit logs, the TensorBoard event
files (one per attempt, read back raw) and the checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UP, DOWN = REPO / "launchers/cluster/up.sh", REPO / "launchers/cluster/down.sh"
LAUNCHER = REPO / "launchers/slurm.py"
STATE = Path(os.environ.get("LEJEPA_SLURM_DIR", "/var/tmp/lejepa-slurm"))

# Tests that use the cluster are marked `slurm` (and `slow` when they run jobs); the dry-run and bad-input
# tests need no cluster and are not marked.


# ---------------------------------------------------------------------------------------------- helpers
def root_cmd(*cmd) -> list[str]:
    return [str(c) for c in cmd] if os.geteuid() == 0 else ["sudo", "-E", *map(str, cmd)]


@pytest.fixture(scope="session")
def cluster():
    """Start the local cluster (installs the Debian packages on a fresh machine); stop it after if we started it."""
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.fail("the SLURM tests start a local cluster with launchers/cluster/up.sh, which needs root or sudo")
    was_up = subprocess.run(["scontrol", "ping"], capture_output=True, text=True).returncode == 0 \
        if shutil.which("scontrol") else False
    up = subprocess.run(root_cmd("bash", UP), capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
    yield
    if not was_up:
        subprocess.run(root_cmd("bash", DOWN), capture_output=True, text=True, timeout=120)


def train_flags(data: Path, out: Path, steps: int, **extra) -> list[str]:
    flags = {"preset": "cpu-small", "data": data / "train", "backend": "torchvision", "out": out, "steps": steps,
             "batch-size": 4, "log-every": 1, "image-every": 0, "num-workers": 0, "gpus-per-node": 0,
             "cpus-per-task": 1, "time": 10, **extra}
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def submit(*arg_lists: list[str]) -> list[str]:
    """Run the launcher once per argument list, in parallel (no --wait); return the job ids it printed."""
    procs = [subprocess.Popen([sys.executable, LAUNCHER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for args in arg_lists]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, f"launcher failed:\n{out}\n{err}"
        m = re.search(r"submitted job (\d+)", out)
        assert m and "tensorboard --logdir" in out and "log:" in out, out
        ids.append(m.group(1))
    return ids


def sacct_states(job: str) -> dict[str, str]:
    """{job id or array member id: state} of the allocation (not its steps)."""
    p = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", job], capture_output=True, text=True)
    return dict(line.split("|")[:2] for line in p.stdout.split() if "|" in line)


def squeue_state(job: str) -> str:
    p = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job], capture_output=True, text=True)
    return p.stdout.strip()


def wait_until(predicate, what: str, timeout: float, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "DEADLINE")


def wait_done(job: str, out: Path, timeout: float = 300) -> dict[str, str]:
    """Wait for every member of the job to end; fail with the logs if one did not complete."""
    def ended():
        states = sacct_states(job)  # a pending array shows one row "ID_[0-1]" until its members start
        final = states and not any("[" in k for k in states) and all(v.split()[0] in FINAL for v in states.values())
        return states if final else None

    states = wait_until(ended, f"job {job} to finish", timeout, poll=2)
    if any(s != "COMPLETED" for s in states.values()):
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((out / "slurm").glob("*_log.*")))
        pytest.fail(f"job {job} ended {states}\n{logs}")
    return states


def loss_steps_per_attempt(run_dir: Path) -> list[list[int]]:
    """Steps logged under train/loss, one list per TensorBoard event file (= per attempt), oldest first.
    Raw files, so steps a killed attempt logged after its last checkpoint are still visible."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from evaluation.watch import TB_SUFFIX  # the k-shot watcher's own event file is not an attempt

    files = sorted((f for f in (run_dir / "tb").glob("events.out.tfevents.*") if not f.name.endswith(TB_SUFFIX)),
                   key=lambda f: int(f.name.split(".")[3]))
    return [[e.step for e in EventFileLoader(str(f)).Load() if any(v.tag == "train/loss" for v in e.summary.value)]
            for f in files]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in run_dir.glob("checkpoint_*.pt"))


def run_log(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*_log.*")))


# ------------------------------------------------------------------------------------------- the jobs
# TIMEOUT_STEPS: ~0.3 s a step on a quiet 2-core machine, so one attempt (cut 25-55 s after its start) can
# never finish them all; 60 did fit once on a quiet machine and the job then never met its limit.
REQUEUE_STEPS, TIMEOUT_STEPS, ARRAY_STEPS = 12, 400, 4


@pytest.fixture(scope="module")
def jobs(cluster, imagenette, dtd10, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_runs")
    # Shared across nodes in a real cluster; here every fake node is this machine, so tmp is shared too.
    runs = {"requeue": root / "requeue", "timeout": root / "timeout", "array": root / "array"}
    flags = {
        # 2 nodes x 1 CPU task; requeued by the test mid-run (SIGTERM path).
        "requeue": train_flags(imagenette, runs["requeue"], REQUEUE_STEPS, nodes=2, **{"ckpt-every": 3}),
        # 1 task, 1-minute limit, SIGUSR1 5 s before it (slurmctld checks every 30 s, so it comes 25-55 s
        # after the start): the SIGUSR1 -> trainer checkpoint -> submitit requeue path. Periodic checkpoints
        # off, so every checkpoint is one the time limit caused.
        "timeout": train_flags(imagenette, runs["timeout"], TIMEOUT_STEPS, nodes=1, time=1,
                               **{"signal-delay": 5, "ckpt-every": 1000}),
        # each member also gets a k-shot job after it (--eval-every: dependency afterany)
        "array": train_flags(imagenette, runs["array"], ARRAY_STEPS, nodes=1, **{"ckpt-every": 2, "eval-every": 2})
        + ["--eval-data", f"imagefolder:{dtd10}", "--array", "lambd=0.05,0.2"],
    }
    ids = dict(zip(flags, submit(*flags.values())))
    yield ids, runs, flags
    subprocess.run(["scancel", *ids.values()], capture_output=True)


# ------------------------------------------------------------------------------------------- the tests
@pytest.mark.slurm
@pytest.mark.slow
def test_two_node_job_requeued_mid_run_resumes_from_its_checkpoint(jobs):
    ids, runs, flags = jobs
    job, out = ids["requeue"], runs["requeue"]
    wait_until(lambda: checkpoint_steps(out) and squeue_state(job) == "RUNNING", "the first checkpoint", 240)
    subprocess.run(["scontrol", "requeue", job], check=True)
    # Back to PENDING once every process of the first attempt is gone: its checkpoints are final then.
    wait_until(lambda: squeue_state(job) == "PENDING", "the requeued job to be pending", 120, poll=0.5)
    last_ckpt = max(checkpoint_steps(out))
    assert 3 <= last_ckpt < REQUEUE_STEPS, f"requeue was meant to land mid-run, checkpoints {checkpoint_steps(out)}"

    wait_done(job, out, timeout=300)
    first, second = loss_steps_per_attempt(out)
    log = run_log(out)
    assert "restart 1" in log and f"resumed from {out}/checkpoint_{last_ckpt:06d}.pt at step {last_ckpt}" in log
    # SIGTERM let the first attempt save where it stood (within KillWait), so it trained exactly 1..last_ckpt...
    assert f"preempted at step {last_ckpt}: checkpoint written" in log
    assert first == list(range(1, last_ckpt + 1))
    # ... and the second continued right after that checkpoint: no step up to it was trained twice.
    assert second == list(range(last_ckpt + 1, REQUEUE_STEPS + 1))

    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out)
    assert ckpt["step"] == REQUEUE_STEPS and ckpt["world_size"] == 2
    assert (out / "config.yaml").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_job_hitting_its_time_limit_requeues_and_finishes(jobs):
    ids, runs, flags = jobs
    job, out = ids["timeout"], runs["timeout"]
    # TIMEOUT_STEPS cannot fit in one 25-55 s attempt on 2 cores, so the first attempt meets its limit.
    wait_until(lambda: "Requeued job" in run_log(out), "the first attempt to hit its time limit and requeue", 240)
    # Then let the job finish without more timeouts (keeps the test short; each attempt is the same path).
    # On a quiet machine the second attempt may finish before this line: then there is nothing to extend.
    update = subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], capture_output=True, text=True)
    assert update.returncode == 0 or "already finished" in update.stderr, update.stderr
    wait_done(job, out, timeout=600)
    log = run_log(out)
    attempts = [a for a in loss_steps_per_attempt(out) if a]
    rank0 = (out / "slurm" / f"{job}_0_log.out").read_text()  # submitit logs INFO here (WARNING in both files)
    assert len(attempts) >= 2
    # (an attempt whose signal came before training started requeues too, without logging a step)
    assert rank0.count("this job is timed-out") == rank0.count(f"Requeued job {job}") >= len(attempts) - 1
    # Each SIGUSR1 checkpoint was written where its attempt stood, and the next attempt resumed from it at
    # the following step: together the attempts train every step exactly once.
    for before in attempts[:-1]:
        assert f"resumed from {out}/checkpoint_{before[-1]:06d}.pt at step {before[-1]}" in log
    assert [s for a in attempts for s in a] == list(range(1, TIMEOUT_STEPS + 1)), attempts
    from models.checkpoint import load_checkpoint

    assert load_checkpoint(out)["step"] == TIMEOUT_STEPS


@pytest.mark.slurm
@pytest.mark.slow
def test_array_members_run_with_their_own_output_folders(jobs, capsys):
    import yaml

    ids, runs, flags = jobs
    job, out = ids["array"], runs["array"]
    states = wait_done(job, out, timeout=300)
    assert sorted(states) == [f"{job}_0", f"{job}_1"]
    # --dry-run shows exactly the script that was submitted
    code, dry, _ = launch(capsys, *flags["array"], "--dry-run")
    submitted = (out / "slurm" / f"{job}_submission.sh").read_text()
    assert code == 0 and dry.split("# member out:")[0].strip() == submitted.strip()
    for lambd in (0.05, 0.2):
        member = out / f"lambd={lambd}"
        config = yaml.safe_load((member / "config.yaml").read_text())
        assert config["lambd"] == lambd and config["out"] == str(member)
        assert checkpoint_steps(member)[-1] == ARRAY_STEPS
        assert loss_steps_per_attempt(member) == [list(range(1, ARRAY_STEPS + 1))]
    # the dependent k-shot jobs: every 2nd checkpoint of each member, evaluated after it ended
    for lambd in (0.05, 0.2):
        results = out / f"lambd={lambd}" / "eval" / "results.json"
        deadline = time.time() + 300
        while time.time() < deadline and not (results.exists() and len(json.loads(results.read_text())) == 2):
            time.sleep(2)
        rows = json.loads(results.read_text())
        assert sorted(r["step"] for r in rows) == [2, 4] and all(0 < r["mean"] <= 100 for r in rows)


# --------------------------------------------------------------------- in-process: dry run, bad input
def launch(capsys, *argv) -> tuple[int, str, str]:
    from launchers.slurm import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CLUSTER_DATA = "/cluster/only/imagenet/train"  # a --data on the cluster's filesystem, not mounted here


def test_headline_dry_run_plans_the_seed_recipe_on_32_gpus(capsys, tmp_path):
    """`slurm.py --arch vit_l --nodes 4` is the paper's recipe on 4 x 8 GPUs, and the dry run says so."""
    from trainer.config import PRESETS

    code, out, err = launch(capsys, "--arch", "vit_l", "--nodes", 4, "--data", CLUSTER_DATA, "--partition", "main",
                            "--time", "2-00:00:00", "--out", tmp_path, "--dry-run")
    assert code == 0, err
    lines = out.splitlines()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=2880", "#SBATCH --signal=USR1@120", "#SBATCH --requeue",
                 "#SBATCH --partition=main", f"#SBATCH --output={tmp_path}/slurm/%j_0_log.out"):
        assert line in lines, line
    assert re.search(r"^srun .* -m submitit.core._submit " + re.escape(str(tmp_path / "slurm")), out, re.M)
    # GPU ranks get CPUs (sinfo's node CPUs / GPUs, or the stated default) and their threads follow them
    cpus = int(re.search(r"^#SBATCH --cpus-per-task=(\d+)$", out, re.M).group(1))
    assert f"export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-{cpus}}}" in lines
    assert re.search(rf"^  slurm +--cpus-per-task {cpus} \((sinfo|default)", out, re.M)
    # the plan, beside the script: seed recipe, its views, 32 ranks, the LR scaled to the global batch
    seed = PRESETS["seed"]
    global_batch = seed["batch_size"] * 4 * 8
    lr = seed["lr"] * global_batch / seed["base_batch"]
    plan = out.split("# member out:")[1]
    for piece in ("plan: preset seed", "vit_l (patch 14)", "2 global x 224 px (scale 0.3-1)",
                  "6 local x 98 px (scale 0.05-0.3)", f"64 per rank x 32 rank(s) x 1 accumulation = {global_batch:,}",
                  f"lr       {lr:.3g} = {seed['lr']:.3g} x {global_batch:,} / {seed['base_batch']:,} (linear",
                  "100 epochs", f"{CLUSTER_DATA}: a folder", "not visible from", "auto -> ",
                  "4 node(s) x 8 GPU(s), world size 32", f"out      {tmp_path}"):
        assert piece in plan, piece
    assert lr == pytest.approx(2e-3)  # 4x the seed's 8-GPU batch of 512 at 5e-4
    assert not (tmp_path / "slurm").exists()  # nothing written, nothing submitted


def test_cluster_run_without_data_is_refused_except_for_the_cpu_demo(capsys, tmp_path):
    code, out, err = launch(capsys, "--arch", "vit_l", "--nodes", 4, "--out", tmp_path, "--dry-run")
    assert code == 2 and "--data is required for a cluster run (--preset seed)" in err
    assert "--preset cpu-small" in err and "Traceback" not in err and "#SBATCH" not in out
    code, out, err = launch(capsys, "--preset", "cpu-small", "--gpus-per-node", 0, "--out", tmp_path, "--dry-run")
    assert code == 0 and "embedded Fashion-MNIST" in out, err


def test_node_cpus_per_gpu_from_sinfo():
    from launchers.slurm import cpus_per_gpu_from_sinfo

    # `sinfo -h -o %P|%c|%G`: the default partition is starred; "+" when its nodes differ (the least is shown)
    listing = "gpu*|96|gpu:a100:8(S:0-1)\ngpu*|64+|gpu:8\nbig|256|gpu:h100:4,shard:8\ncpu|128|(null)\n"
    assert cpus_per_gpu_from_sinfo(listing, None, 8) == min(96 // 8, 64 // 8)
    assert cpus_per_gpu_from_sinfo(listing, "big", 8) == 256 // 4
    assert cpus_per_gpu_from_sinfo(listing, "cpu", 8) == 128 // 8  # no GPU gres: the request's count
    assert cpus_per_gpu_from_sinfo("main*|2|(null)", None, 8) == 1  # never 0
    assert cpus_per_gpu_from_sinfo(listing, "nosuch", 8) is None


def test_dry_run_cpu_tasks_and_array(capsys, tmp_path):
    code, out, _ = launch(capsys, "--preset", "cpu-small", "--gpus-per-node", 0, "--tasks-per-node", 2, "--nodes", 3,
                          "--cpus-per-task", 4, "--mem", "8G", "--array", "lambd=0.02,0.05,0.1", "--out", tmp_path,
                          "--dry-run")
    assert code == 0
    lines = out.splitlines()
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --mem=8GB", "#SBATCH --array=0-2%3", "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-4}"):
        assert line in lines, line
    assert not any("gpus" in line for line in lines)
    for lambd in ("0.02", "0.05", "0.1"):
        assert f"# member out: {tmp_path}/lambd={lambd}" in lines
    # one plan, then what each other member changes
    assert out.count("plan: preset cpu-small") == 1 and "3 node(s) x 2 CPU task(s), world size 6" in out
    assert f"  member lambd=0.05: lambd 0.05, out {tmp_path}/lambd=0.05" in lines


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--time", "1h"], "--time '1h'"),
    (["--time", "25:61:00:00"], "--time '25:61:00:00'"),
    (["--mem", "lots"], "--mem 'lots'"),
    (["--gpus-per-node", "8", "--tasks-per-node", "2"], "one task per GPU"),
    (["--array", "nosuchflag=1,2"], "--nosuchflag is not a training flag"),
    (["--array", "lambd"], "expected FLAG=V1,V2"),
    (["--array", "lambd=0.1,7"], "--lambd must be in [0, 1]"),
    (["--arch", "vit_xxl"], "unknown arch 'vit_xxl'"),
    (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1"),
    (["--max-failures", "-1"], "--max-failures must be >= 0, got -1"),
    (["--collective-timeout", "nan"], "--collective-timeout must be > 0 seconds"),
    (["--data-timeout", "-1"], "--data-timeout must be > 0 seconds"),
    ([], "--data is required for a cluster run"),
])
def test_bad_input_is_one_clear_error_before_submission(capsys, tmp_path, argv, message):
    code, out, err = launch(capsys, *argv, "--out", tmp_path)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "slurm").exists()


@pytest.mark.slurm
def test_unknown_partition_is_refused(cluster, capsys, tmp_path):
    code, _, err = launch(capsys, "--partition", "nosuch", "--preset", "cpu-small", "--gpus-per-node", 0,
                          "--out", tmp_path)
    assert code == 2 and "--partition 'nosuch' is not a partition" in err and "main" in err and "preempt" in err


def test_no_sbatch_on_path_points_to_the_local_cluster_script(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM client here
    code, _, err = launch(capsys, "--preset", "cpu-small", "--gpus-per-node", 0, "--out", tmp_path)
    assert code == 2 and "no `sbatch` on PATH" in err and "launchers/cluster/up.sh" in err


@pytest.mark.slurm
def test_unreachable_controller_points_to_the_local_cluster_script(cluster, capsys, tmp_path, monkeypatch):
    conf = (STATE / "etc/slurm.conf").read_text()
    bad = tmp_path / "slurm.conf"  # same cluster, but a port where no controller listens
    bad.write_text(re.sub(r"^SlurmctldPort=\d+", "SlurmctldPort=1", conf, flags=re.M))
    monkeypatch.setenv("SLURM_CONF", str(bad))
    code, _, err = launch(capsys, "--preset", "cpu-small", "--gpus-per-node", 0, "--out", tmp_path)
    assert code == 2 and "no SLURM controller reachable" in err and "launchers/cluster/up.sh" in err


@pytest.mark.slurm
@pytest.mark.slow
def test_wait_reports_a_job_that_fails_on_its_node(cluster, imagenette, tmp_path):
    # 5000 training images and a batch of 6000 per rank: valid flags, but the trainer finds no full batch.
    flags = train_flags(imagenette, tmp_path, 2, nodes=1, **{"batch-size": 6000})
    p = subprocess.run([sys.executable, LAUNCHER, *flags, "--wait"], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert p.returncode == 1
    assert re.search(r"job \d+ did not complete: state FAILED", p.stderr), p.stderr
    assert f"log: {tmp_path}/slurm/" in p.stderr and "ValueError" in p.stderr  # the node's traceback, last line


# ---------------------------------------------------------------------------- faults: failed attempts
# Four jobs followed with --wait, submitted together: a rank killed (kill -9) after a checkpoint, a rank
# stopped (SIGSTOP: it hangs, its peer times out in a collective), a failure that repeats at the same step
# (checkpoint writes on a full tmpfs --out, --max-ckpt-failures 2 in a row) and a run that diverges.
# launchers/supervisor.py requeues the first two, which then finish; it stops the third after its second
# attempt and the fourth after its first.
FAULT_STEPS, FAULT_CKPT_EVERY, COLLECTIVE_TIMEOUT = 16, 4, 20
REPEAT_STEPS = 8
CKPT_MB = 141  # one cpu-small checkpoint (ResNet-18 + AdamW state)


class Followed:
    """`slurm.py ... --wait` running in the background; its output collected line by line."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, LAUNCHER, *args, "--wait"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=REPO)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def text(self) -> str:
        return "".join(self.lines)

    def job(self) -> str:
        m = wait_until(lambda: re.search(r"submitted job (\d+)", self.text()) or self.proc.poll() is not None,
                       "the launcher to submit", 180, poll=0.5)
        assert m is not True, self.text()
        return m.group(1)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"--wait did not return within {timeout:.0f} s:\n{self.text()[-5000:]}")
        self.reader.join(timeout=10)
        return rc


def rank_pid(job: str, rank: int) -> int | None:
    """Pid of the first attempt's trainer rank `rank` of `job` (its submitit process), from /proc."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"submitit.core._submit" not in (proc / "cmdline").read_bytes():
                continue
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if want <= env and not any(v.startswith(b"SLURM_RESTART_COUNT=") and v != b"SLURM_RESTART_COUNT=0"
                                   for v in env):
            return int(proc.name)
    return None


def ledger(out: Path, job: str) -> dict:
    import json

    return json.loads((out / "slurm" / f"{job}_faults.json").read_text())


def hit_rank_1(job: str, out: Path, sig: int) -> float:
    """Send `sig` to rank 1 of `job` once its first checkpoint is written; returns when."""
    pid = wait_until(lambda: checkpoint_steps(out) and rank_pid(job, 1), f"job {job}'s rank 1 after its first "
                     "checkpoint", 400, poll=0.2)
    os.kill(pid, sig)
    return time.time()


@pytest.fixture(scope="module")
def fault_jobs(cluster, imagenette, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("slurm_faults")
    full = root / "full"  # a tmpfs with room for one checkpoint and a half: the second write fails
    full.mkdir()
    mount = subprocess.run(root_cmd("mount", "-t", "tmpfs", "-o", f"size={CKPT_MB * 3 // 2}m", "tmpfs", full),
                           capture_output=True, text=True)
    assert mount.returncode == 0, f"mounting a tmpfs needs root or sudo: {mount.stderr}"
    outs = {"kill": root / "kill", "stop": root / "stop", "repeat": full / "run", "diverge": root / "diverge"}
    common = {"ckpt-every": FAULT_CKPT_EVERY, "collective-timeout": COLLECTIVE_TIMEOUT}
    followed = {
        "kill": Followed(train_flags(imagenette, outs["kill"], FAULT_STEPS, nodes=2, **common)),
        "stop": Followed(train_flags(imagenette, outs["stop"], FAULT_STEPS, nodes=2, **common)),
        "repeat": Followed(train_flags(imagenette, outs["repeat"], REPEAT_STEPS, nodes=1,
                                       **{"ckpt-every": 2, "max-ckpt-failures": 2})),
        # lr 1e30: every step after the first is non-finite, the trainer stops the run itself (diverged)
        "diverge": Followed(train_flags(imagenette, outs["diverge"], 20, nodes=1,
                                        **{"lr": 1e30, "warmup": 0, "max-bad-steps": 2})),
    }
    jobs = {name: f.job() for name, f in followed.items()}
    # The faults, each as soon as its job has a checkpoint (the jobs run side by side)
    with ThreadPoolExecutor(2) as pool:
        hits = {"kill": pool.submit(hit_rank_1, jobs["kill"], outs["kill"], signal.SIGKILL),
                "stop": pool.submit(hit_rank_1, jobs["stop"], outs["stop"], signal.SIGSTOP)}  # hangs, sockets open
        yield jobs, outs, followed, hits
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
        for f in followed.values():
            f.proc.kill()
    wait_until(lambda: not any(squeue_state(j) for j in jobs.values()), "the fault jobs to leave the queue", 120)
    subprocess.run(root_cmd("umount", "-l", full), capture_output=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_killed_rank_brings_the_job_back_from_its_last_checkpoint(fault_jobs):
    jobs, outs, followed, hits = fault_jobs
    job, out, f = jobs["kill"], outs["kill"], followed["kill"]
    hits["kill"].result(timeout=600)  # rank 1 killed (kill -9) after the first checkpoint
    assert f.wait(timeout=600) == 0, f.text()[-5000:]  # --wait followed the job through its requeue

    [failure] = ledger(out, job)["failures"]
    c = failure["checkpoint"]  # the last checkpoint when the attempt ended
    assert (failure["rank"], failure["kind"]) == (1, "peer lost") and FAULT_CKPT_EVERY <= c < FAULT_STEPS, failure
    text, log = f.text(), run_log(out)
    assert "srun: error: node2: task 1: Killed" in log
    assert (f"job {job} attempt 1 failed at step {failure['step']} (rank 1, {failure['phase']}): ended without a "
            "report") in text
    assert f"resubmitted (failure 1 of at most 3), resuming from checkpoint step {c}." in text
    assert f"resumed from {out}/checkpoint_{c:06d}.pt at step {c}" in log
    assert re.search(rf"\[slurm.py\] job {job}: (PENDING|REQUEUED).*\[slurm.py\] job {job}: RUNNING.*"
                     rf"\[slurm.py\] job {job} done: step {FAULT_STEPS}", text, re.S)
    # The killed attempt trained 1..k (k >= c, its last steps lost with it); the next one started right after
    # the checkpoint: no step up to it was trained twice, and the run has every step.
    first, second = loss_steps_per_attempt(out)
    assert first == list(range(1, len(first) + 1)) and len(first) >= c
    assert second == list(range(c + 1, FAULT_STEPS + 1))
    from models.checkpoint import load_checkpoint

    assert load_checkpoint(out)["step"] == FAULT_STEPS and sacct_states(job)[job] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_hung_rank_makes_the_job_fail_within_the_collective_timeout_and_come_back(fault_jobs):
    import json

    jobs, outs, followed, hits = fault_jobs
    job, out, f = jobs["stop"], outs["stop"], followed["stop"]
    stopped = hits["stop"].result(timeout=600)  # rank 1 stopped (SIGSTOP): alive, sockets open, answering nothing
    assert f.wait(timeout=600) == 0, f.text()[-5000:]

    # rank 0 waited --collective-timeout in a collective, then said where and exited
    seen = json.loads((out / "slurm" / f"{job}_0_exit.json").read_text())
    assert seen["kind"] == "collective timeout" and seen["attempt"] == 0
    assert COLLECTIVE_TIMEOUT - 1 <= seen["time"] - stopped <= COLLECTIVE_TIMEOUT + 30
    assert (f"rank 0 failed at step {seen['step']} ({seen['phase']}): collective timeout: no answer from another "
            "rank within --collective-timeout") in f.text()
    [failure] = ledger(out, job)["failures"]
    assert (failure["rank"], failure["step"], failure["kind"]) == (1, seen["step"], "collective timeout")
    c = failure["checkpoint"]
    assert f"resumed from {out}/checkpoint_{c:06d}.pt at step {c}" in run_log(out)
    first, second = loss_steps_per_attempt(out)
    assert len(first) >= c and second == list(range(c + 1, FAULT_STEPS + 1))
    assert sacct_states(job)[job] == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_failure_at_the_same_step_twice_stops_the_job_with_step_rank_and_log(fault_jobs):
    jobs, outs, followed, _ = fault_jobs
    job, out, f = jobs["repeat"], outs["repeat"], followed["repeat"]
    assert f.wait(timeout=900) == 1, f.text()[-5000:]
    text = f.text()
    # On the full disk the writes at steps 4 and 6 fail (no temp file left, checkpoint 2 stays the latest),
    # the second failure in a row stops the attempt at step 6; the requeued attempt resumes from 2 and fails
    # at step 6 again: the supervisor stops the job and says where, who, and which log.
    assert text.count("checkpoint at step 4 not written (OSError: [Errno 28] No space left on device)") == 2
    stop = (rf"job {job} attempt 2 failed at step 6 \(rank 0, checkpoint save \(gather \+ write\)\): CheckpointError: "
            r"2 checkpoint writes in a row failed .*No space left on device\. Stopped: attempt 2 failed at step 6 "
            r"exactly as attempt 1 did, with no checkpoint written in between: a failure that repeats at the same "
            rf"step is a bug, not bad luck, so the job is not resubmitted\. log: {re.escape(str(out))}/slurm/{job}_0_log\.err")
    assert len(re.findall(stop, text)) >= 2, text[-5000:]  # in the job's log, and in --wait's final report
    assert re.search(rf"job {job} did not complete: state FAILED", text)
    book = ledger(out, job)
    assert [(x["attempt"], x["step"], x["checkpoint"], x["rank"]) for x in book["failures"]] == [(0, 6, 2, 0),
                                                                                               (1, 6, 2, 0)]
    assert re.search(stop, book["stopped"])
    assert checkpoint_steps(out) == [2] and not list(out.glob(".*.tmp"))
    assert sacct_states(job)[job] == "FAILED"


@pytest.mark.slurm
@pytest.mark.slow
def test_a_run_the_trainer_stops_itself_is_not_resubmitted(fault_jobs):
    jobs, outs, followed, _ = fault_jobs
    job, out, f = jobs["diverge"], outs["diverge"], followed["diverge"]
    assert f.wait(timeout=900) == 1, f.text()[-5000:]
    stop = (rf"job {job} attempt 1 failed at step \d+ \(rank 0\): training ended with status 'diverged' at step \d+ "
            r"\(this rank's log says why\)\. Stopped: the run ended itself; resubmitting would not change that")
    assert re.search(stop, f.text()) and "2 consecutive non-finite steps" in f.text()
    assert re.search(stop, ledger(out, job)["stopped"])
    attempts = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                              text=True).stdout.split()
    assert attempts == ["FAILED"]  # one attempt: no requeue


def lose_node(node: str, job: str) -> None:
    """`node` dies under `job`: its slurmd, the job's slurmstepd processes there and everything they run,
    SIGKILLed at once (what a power cut leaves: slurmctld hears nothing more from the node)."""
    victims = {int((STATE / "run" / f"slurmd-{node}.pid").read_text())}
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = set((proc / "environ").read_bytes().split(b"\0")) if b"slurmstepd" not in cmd else set()
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.startswith(f"slurmstepd: [{job}.batch]".encode()):  # the batch step runs on the first node
            victims.add(int(proc.name))
        if {f"SLURMD_NODENAME={node}".encode(), f"SLURM_JOB_ID={job}".encode()} <= env:
            victims |= {int(proc.name), parent}  # a process of the job there, and its slurmstepd
    subprocess.run(root_cmd("kill", "-9", *victims), capture_output=True)  # (slurmd and slurmstepd are root's)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_lost_node_is_requeued_by_slurm_and_counted_as_a_failure(cluster, imagenette, tmp_path):
    out = tmp_path / "run"
    [job] = submit(train_flags(imagenette, out, FAULT_STEPS, nodes=2, **{"ckpt-every": FAULT_CKPT_EVERY}))
    wait_until(lambda: checkpoint_steps(out) and rank_pid(job, 0), "the first checkpoint", 400, poll=0.2)
    lose_node("node1", job)  # the batch host: no supervisor runs after srun, SLURM requeues the job (NODE_FAIL)
    try:
        wait_until(lambda: "down" in subprocess.run(["sinfo", "-h", "-n", "node1", "-o", "%T"], capture_output=True,
                                                    text=True).stdout, "slurmctld to find node1 down", 180)
    finally:  # the node comes back (ReturnToService=2)
        subprocess.run(root_cmd("slurmd", "-f", STATE / "etc/slurm.conf", "-N", "node1"), check=True)

    def attempts() -> list[str]:
        return subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True,
                              text=True).stdout.split()

    wait_until(lambda: len(attempts()) >= 2, "SLURM to requeue the job", 180)  # (sacct says NODE_FAIL first)
    wait_done(job, out, timeout=600)
    # On this one-host cluster slurmctld may still deliver the lost node's pending kill once node1 is back, and
    # it reaches the requeued attempt (same job id): the supervisor then counts a further failure and requeues
    # again (REQUEUED), which is the behaviour under test once more; the job still completes.
    states = attempts()
    assert states[0] == "NODE_FAIL" and states[-1] == "COMPLETED" and set(states[1:-1]) <= {"REQUEUED"}, states
    # the next attempt's supervisor counted it (--max-failures bounds node losses too) and said so
    failure, *later = ledger(out, job)["failures"]
    assert len(later) == len(states) - 2 and all(f["kind"] != "node failure" for f in later)
    c = failure["checkpoint"]
    assert (failure["kind"], failure["rank"], failure["attempt"]) == ("node failure", None, 0) and c >= FAULT_CKPT_EVERY
    log = run_log(out)
    assert (f"job {job} attempt 1 failed at an unknown step (rank unknown): a node of the job failed (sacct: "
            f"NODE_FAIL) and SLURM requeued it; resubmitted (failure 1 of at most 3), resuming from checkpoint "
            f"step {c}") in log
    assert f"resumed from {out}/checkpoint_{c:06d}.pt at step {c}" in log
    last = later[-1]["checkpoint"] if later else c
    assert loss_steps_per_attempt(out)[-1] == list(range(last + 1, FAULT_STEPS + 1))
