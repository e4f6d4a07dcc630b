"""When a rank cannot go on: what it was doing, at which step, and one line that says so.

- `Watchdog`: the training loop tells it what it is doing (`enter(phase, step)`: one attribute write, no
  device sync). Its thread ends the rank when a phase lasts too long: waiting for the data loader longer
  than `--data-timeout`, or, with several ranks, anything else longer than `--collective-timeout` +
  STALL_MARGIN_S (a backstop: a stalled collective is normally ended first by the backend's own timeout,
  see trainer.train.setup_distributed). A thread, because the main thread is then stuck inside a C call.
- `Failure`: rank, step, phase, kind and message of a failure. `run(cfg, on_failure)` hands it to the
  launcher before the rank exits (launchers/slurm.py records it for launchers/supervisor.py, which decides
  whether the job comes back) and adds its line to the exception.

Exit codes of a rank: 0 done, EXIT_FAILED an exception ended the run, EXIT_STALLED the watchdog ended it
(as timeout(1) does), EXIT_REQUEUE (launchers/slurm.py) preempted or at its time limit, SLURM requeues it.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass

EXIT_FAILED = 1
EXIT_REQUEUE = 3
EXIT_STALLED = 124
STALL_MARGIN_S = 60.0

# Phases the loop reports (`Watchdog.enter`); only DATA has its own limit (--data-timeout).
START_UP = "start-up"  # process group, data indexing, resume: bounded by the backends' own timeouts
DATA = "waiting for the data loader"
STEP = "training step (forward/backward all-reduces)"
LOGGING = "logging all-reduce"
CHECKPOINT = "checkpoint save (gather + write)"
SIGNAL_SYNC = "preemption-signal all-reduce"
UNWATCHED = (START_UP,)

# What a failure was, as the supervisor needs to tell the rank that failed from the ranks that saw it fail.
PEER_LOST = "peer lost"  # a collective broke because another rank went away
COLLECTIVE_TIMEOUT = "collective timeout"  # a collective waited --collective-timeout for another rank
DATA_TIMEOUT = "data timeout"
STALLED = "stalled"
ERROR = "error"  # anything else: this rank's own failure
SEEN_FROM_PEER = (PEER_LOST, COLLECTIVE_TIMEOUT)

# gloo: "Timed out waiting 20000ms for recv operation", "Connection reset by peer", "Connection closed by
# peer"; NCCL: "Watchdog caught collective operation timeout", "remote process exited or there was a network
# error"; the TCP store at start-up: "Connection refused", "timed out".
_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)
_PEER = re.compile(r"connection (reset|closed|refused)|closed by peer|broken pipe|remote process exited|"
                   r"communicator was aborted", re.IGNORECASE)


def classify(error: BaseException) -> str:
    """PEER_LOST / COLLECTIVE_TIMEOUT for the errors torch.distributed raises (RuntimeError subclasses) when
    another rank is gone or silent, ERROR for anything else."""
    if not isinstance(error, (RuntimeError, ConnectionError, TimeoutError)):
        return ERROR
    text = str(error)
    if _PEER.search(text) or isinstance(error, ConnectionError):
        return PEER_LOST
    if _TIMEOUT.search(text) or isinstance(error, TimeoutError):
        return COLLECTIVE_TIMEOUT
    return ERROR


@dataclass
class Failure:
    rank: int
    step: int  # the optimizer step the rank was in (completed steps + 1), or at whose end it saved/logged
    phase: str
    kind: str
    message: str  # one line

    def line(self) -> str:
        return f"rank {self.rank} failed at step {self.step} ({self.phase}): {self.kind}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


def one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class Watchdog:
    """See the module docstring. `enter` swaps one tuple (atomic in CPython), so the thread never pairs a
    new phase with an old start time."""

    def __init__(self, rank: int, world: int, data_timeout: float, collective_timeout: float, on_failure=None):
        self.rank, self.on_failure = rank, on_failure
        self.limits = {DATA: data_timeout}
        # one process has no collective to time out, and its checkpoint write may take what it takes
        self.backstop = collective_timeout + STALL_MARGIN_S if world > 1 else None
        self.state = (START_UP, 0, time.monotonic())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lejepa-watchdog", daemon=True)

    def enter(self, phase: str, step: int) -> None:
        self.state = (phase, step, time.monotonic())

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def limit(self, phase: str) -> float | None:
        return None if phase in UNWATCHED else self.limits.get(phase, self.backstop)

    def failure(self, error: BaseException) -> Failure:
        """The failure an exception caught in the loop stands for: where the loop was when it was raised."""
        phase, step, _ = self.state
        kind = classify(error) if phase != DATA else ERROR  # the loader's own "timed out" is not a peer's
        message = one_line(error)
        if kind == COLLECTIVE_TIMEOUT:
            message = f"no answer from another rank within --collective-timeout: {message}"
        return Failure(self.rank, step, phase, kind, message)

    def report(self, failure: Failure) -> None:
        """Hand `failure` to the launcher; a failing report must not hide the failure itself."""
        if self.on_failure is not None:
            try:
                self.on_failure(failure)
            except Exception as e:  # noqa: BLE001
                print(f"rank {self.rank}: could not record the failure: {one_line(e)}", file=sys.stderr, flush=True)

    def _watch(self) -> None:
        poll = min(1.0, min(v for v in [*self.limits.values(), self.backstop] if v is not None) / 10)
        while not self._stop.wait(poll):
            phase, step, since = self.state
            limit, waited = self.limit(phase), time.monotonic() - since
            if limit is None or waited <= limit:
                continue
            if phase == DATA:
                kind, why = DATA_TIMEOUT, f"the data loader returned no batch for {waited:.0f} s (--data-timeout {limit:g})"
            else:
                kind, why = STALLED, (f"no progress for {waited:.0f} s (--collective-timeout + {STALL_MARGIN_S:.0f} s); "
                                      "the backend did not time out by itself")
            failure = Failure(self.rank, step, phase, kind, why)
            print(failure.line(), file=sys.stderr, flush=True)
            self.report(failure)
            sys.stdout.flush()
            os._exit(EXIT_STALLED)  # the main thread is blocked in a C call: nothing else would end it
