"""Faults on one machine: a checkpoint write that fails on a real full filesystem (a small tmpfs as --out),
a data loader that really stalls (a named pipe among the JPEGs: open() blocks as on a hung network
filesystem), and the supervisor's rules on reports as the ranks write them. The SLURM side (a rank killed or
stopped, a failure that repeats at the same step) is in tests/test_slurm.py."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from models import list_checkpoints, load_checkpoint
from test_trainer import launcher, small_imagefolder, tiny  # the tiny run of the trainer's tests
from trainer import run
from trainer.checkpointing import CheckpointError

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def root_cmd(*cmd) -> list[str]:
    return [str(c) for c in cmd] if os.geteuid() == 0 else ["sudo", *map(str, cmd)]


@pytest.fixture
def small_fs(tmp_path):
    """mount(size_mb) -> a fresh tmpfs of that size (a full disk on demand); unmounted afterwards."""
    mounts = []

    def mount(size_mb: int) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        done = subprocess.run(root_cmd("mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=1777", "tmpfs", where),
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"these tests mount a small tmpfs as --out, which needs root or sudo: {done.stderr}")
        mounts.append(where)
        return where

    yield mount
    for where in reversed(mounts):
        subprocess.run(root_cmd("umount", "-l", where), capture_output=True)


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp"))


class Lines:
    """A child's stdout, line by line, with a timeout (a reader thread feeds a queue)."""

    def __init__(self, proc: subprocess.Popen):
        self.q, self.seen = queue.Queue(), []
        threading.Thread(target=lambda: [self.q.put(line) for line in proc.stdout], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        pytest.fail(f"no line matching {pattern!r} within {timeout:.0f} s; got:\n{''.join(self.seen)[-3000:]}")


# ---------------------------------------------------------------------------------- checkpoint writes
def test_a_full_disk_loses_no_checkpoint_and_training_goes_on(small_fs, imagenette):
    """The disk fills up after the first checkpoint: the next write fails, leaves no temp file and the first
    checkpoint the latest readable one, says so in one line, and training goes on; once space is freed the
    next checkpoint step writes again and the run finishes with every step trained once."""
    out = small_fs(600) / "run"
    cmd = launcher(out, imagenette / "train", "--steps", "10", "--ckpt-every", "2", "--max-ckpt-failures", "4")
    proc = subprocess.Popen(cmd, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = Lines(proc)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint_000002.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "checkpoint_000002.pt").exists(), "".join(lines.seen)
        proc.send_signal(signal.SIGSTOP)  # fill the disk between two checkpoint steps
        size = (out / "checkpoint_000002.pt").stat().st_size
        stat = os.statvfs(out)
        filler = out.parent / "filler"
        with open(filler, "wb") as f:  # leave half a checkpoint free
            os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize - size // 2)
        proc.send_signal(signal.SIGCONT)

        line = lines.wait_for(r"checkpoint at step \d+ not written", timeout=300)
        proc.send_signal(signal.SIGSTOP)  # look at the run dir as the failure left it
        assert re.search(r"checkpoint at step (4|6) not written \(OSError: \[Errno 28\] No space left on device\); "
                         rf"the latest readable is {re.escape(str(out))}/checkpoint_000002\.pt; training goes on and "
                         r"retries at the next checkpoint step \(\d failure\(s\) in a row, limit --max-ckpt-failures 4\)",
                         line), line
        assert temp_files(out) == []
        assert [p.name for p in list_checkpoints(out)] == ["checkpoint_000002.pt"]
        assert load_checkpoint(out)["step"] == 2
        filler.unlink()  # space again
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=300) == 0, "".join(lines.seen)
    finally:
        proc.kill()
        proc.wait()
    failures = [line for line in lines.seen if "not written" in line]
    assert 1 <= len(failures) <= 2  # one line per failed write (the next may still have met the full disk)
    assert [p.name for p in list_checkpoints(out)][-1] == "checkpoint_000010.pt" and temp_files(out) == []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))  # the run never stopped


def test_checkpoint_failures_in_a_row_stop_the_run_and_stale_temp_files_go(small_fs, imagenette, capsys):
    """No checkpoint fits: --max-ckpt-failures writes in a row fail, then the run stops with an error naming
    the step; a temp file that a killed write had left is removed when the run starts."""
    fs = small_fs(2)  # 2 MB: room for TensorBoard and config.yaml, not for a checkpoint
    out = fs / "run"
    out.mkdir()
    stale = out / ".checkpoint_000003.pt.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 100_000)
    cfg = tiny(fs, imagenette / "train", steps=8, ckpt_every=2, max_ckpt_failures=2)
    with pytest.raises(CheckpointError) as e:
        run(cfg)
    assert re.search(r"2 checkpoint writes in a row failed \(limit --max-ckpt-failures 2\), the last at step 4: "
                     r"OSError: \[Errno 28\] No space left on device", str(e.value)), str(e.value)
    assert any("rank 0 failed at step 4 (checkpoint save" in note for note in e.value.__notes__)
    printed = capsys.readouterr().out
    assert f"removed 1 temp file(s) of an interrupted checkpoint write from {out}" in printed
    assert len(re.findall(r"checkpoint at step [24] not written .* the latest readable is none", printed)) == 2
    assert not stale.exists() and temp_files(out) == [] and list_checkpoints(out) == []


# -------------------------------------------------------------------------------------- data timeout
def test_a_stalled_data_loader_ends_the_rank_naming_the_step(tmp_path, imagenette):
    data = small_imagefolder(imagenette, tmp_path / "data", per_class=16)
    os.mkfifo(next((data).iterdir()) / "stalls.jpg")  # read() blocks: no writer ever opens it
    # 33 samples in batches of 11: the pipe is in one of the 3 batches of the first epoch
    cmd = launcher(tmp_path / "run", data, "--steps", "3", "--batch-size", "11", "--data-timeout", "3")
    started = time.monotonic()
    done = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 124, done.stderr[-3000:]
    m = re.search(r"rank 0 failed at step ([123]) \(waiting for the data loader\): data timeout: the data loader "
                  r"returned no batch for 3 s \(--data-timeout 3\)", done.stderr)
    assert m, done.stderr[-3000:]
    assert time.monotonic() - started < 240  # it did not wait for the pipe


# ---------------------------------------------------------------------------------- supervisor rules
def report(rank, step, kind, message="...", phase="training step (forward/backward all-reduces)", outcome="failed"):
    return {"rank": rank, "step": step, "phase": phase, "kind": kind, "message": message, "outcome": outcome,
            "attempt": 0}


def test_the_failed_rank_is_the_one_that_did_not_report_or_failed_by_itself():
    from launchers.supervisor import describe_failure

    # rank 1 was killed: rank 0 lost it at step 5
    killed = describe_failure([report(0, 5, "peer lost", "RuntimeError: Connection reset by peer")], world=2)
    assert (killed["rank"], killed["step"], killed["kind"]) == (1, 5, "peer lost")
    assert "ended without a report" in killed["why"] and "rank 0 saw peer lost: RuntimeError: Connection" in killed["why"]
    # rank 2 stalled in its data loader: its own report names it, whatever the others saw
    stalled = describe_failure([report(0, 7, "peer lost"), report(2, 7, "data timeout", "no batch for 600 s",
                                                                   "waiting for the data loader"),
                                report(1, 7, "collective timeout")], world=3)
    assert (stalled["rank"], stalled["kind"], stalled["phase"]) == (2, "data timeout", "waiting for the data loader")
    # nobody reported (every rank killed, an OOM kill of the whole step)
    assert describe_failure([], world=2) == {"rank": 0, "step": None, "phase": None, "kind": "no report",
                                             "why": describe_failure([], world=2)["why"]}


def failure(attempt, step, checkpoint):
    return {"attempt": attempt, "rank": 1, "step": step, "checkpoint": checkpoint}


def test_a_failure_that_repeats_at_the_same_step_stops_the_job_and_failures_are_bounded():
    from launchers.supervisor import stop_reason

    same = stop_reason([failure(0, 7, 6), failure(1, 7, 6)], max_failures=3)
    assert same and "attempt 2 failed at step 7 exactly as attempt 1 did" in same and "bug, not bad luck" in same
    assert stop_reason([failure(0, 7, 6)], max_failures=3) is None
    assert stop_reason([failure(0, 7, 6), failure(1, 8, 6)], max_failures=3) is None  # another step: bad luck
    assert stop_reason([failure(0, 7, 6), failure(1, 7, 9)], max_failures=3) is None  # progress in between
    assert stop_reason([failure(0, None, 6), failure(1, None, 6)], max_failures=3) is None  # step unknown
    four = [failure(i, 10 * i, 10 * i) for i in range(4)]
    assert stop_reason(four[:3], max_failures=3) is None
    assert stop_reason(four, max_failures=3) == "4 failure(s), more than --max-failures 3"
    assert stop_reason(four[:1], max_failures=0) == "1 failure(s), more than --max-failures 0"


def test_rank_reports_round_trip_per_attempt(tmp_path, monkeypatch):
    from launchers.supervisor import FAILED, REQUEUE, RankReport, read_reports
    from trainer.faults import Failure

    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    RankReport(tmp_path, "42", 0).failed(Failure(0, 9, "logging all-reduce", "collective timeout", "no answer"))
    RankReport(tmp_path, "42", 1).ended(REQUEUE, "preempted", 9)
    got = read_reports(tmp_path, "42", world=3, attempt=2)
    assert [(r["rank"], r["outcome"], r["step"], r["kind"]) for r in got] == [(0, FAILED, 9, "collective timeout"),
                                                                            (1, REQUEUE, 9, REQUEUE)]
    assert read_reports(tmp_path, "42", world=3, attempt=1) == []  # an older attempt's reports do not count
