"""The learning-rate schedule, and `--time-budget`: train for a fixed wall-clock time instead of a step count.

`Schedule` is the LR factor per step: linear warmup to 1, then cosine to 1/1000 at `total`. It is a callable
object, so `LambdaLR` keeps its fields in the scheduler's state dict and a resumed budget run gets back the
step counts it fixed.

Under a time budget the run's length is not known at start. `TimeBudget` measures it:
1. the first `CALIBRATION_STEPS` steps run at LR 0 (they still fill Adam's moments and BN statistics) while
   the step time is measured past the first (slow: compile, loader start-up) step;
2. the warmup is then fixed: `--warmup`, else 10 % of the steps the rest of the budget holds; a budget that
   cannot hold the warmup is a clear error;
3. after the warmup the step time is measured again (now with real data-loading in it) and the total step
   count fixed so that the run, final checkpoint included, ends inside the budget. From then on the run is an
   ordinary fixed-length run: a checkpoint records the counts (scheduler state) and the budget used, and a
   resume keeps them, so it stays exact. (A resume before the count is fixed measures again.)
4. a safety net: if the steps turn slower than measured, the run stops early, checkpointed, inside the budget.
Rank 0 decides and broadcasts over the CPU control group, so every rank runs the same number of steps.
"""

from __future__ import annotations

import math
import time

import torch.distributed as dist

CALIBRATION_STEPS = 3
WARMUP_FRACTION = 0.1  # of the steps the budget holds, when --warmup is not given
END_MARGIN = 0.02  # of the budget, kept free beyond the measured end (final checkpoint, teardown)


class Schedule:
    """LR factor of each step: 0 for `start` steps, linear warmup over `warmup` steps, cosine to 1/1000 at
    `total`. `total`/`warmup` may be None while a time budget has not fixed them (factor 1 past warmup:
    the cosine starts at 1 either way)."""

    def __init__(self, total: int | None, warmup: int | None, start: int = 0):
        self.total, self.warmup, self.start = total, warmup, start

    def __call__(self, step: int) -> float:
        if step < self.start or self.warmup is None:
            return 0.0
        step -= self.start
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.total is None:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.start - self.warmup))
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress))


def _broadcast(value, control):
    """Rank 0's value on every rank (host-side, over the CPU control group)."""
    if control is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


class TimeBudget:
    """Fixes a `Schedule`'s warmup and total from measured step times (module docstring)."""

    def __init__(self, minutes: float, started: float, state: dict | None = None):
        """`started`: perf_counter() when this attempt started; `state`: what a checkpoint recorded."""
        state = state or {}
        self.seconds = 60.0 * minutes
        self.origin = started - state.get("used_s", 0.0)  # perf_counter() at budget time 0 (earlier attempts too)
        self.marks: dict[int, float] = {}
        self.step_seconds: float | None = state.get("step_s")  # measured after warmup
        self.save_seconds = state.get("save_s", 0.0)  # longest checkpoint write seen: kept free at the end

    def state(self) -> dict:
        """For the checkpoint: the budget used so far and what was measured."""
        return {"used_s": self.used(), "step_s": self.step_seconds, "save_s": self.save_seconds}

    def used(self) -> float:
        return time.perf_counter() - self.origin

    def _rate(self, step: int) -> float:
        """Seconds per step up to `step`, measured from step 1 (past the slow first step) when this process
        saw it, else from its first step (a resumed run)."""
        first = 1 if 1 in self.marks and step > 1 else min(self.marks)
        return (self.marks[step] - self.marks[first]) / max(1, step - first)

    def after_step(self, step: int, schedule: Schedule, control, rank: int) -> str | None:
        """Called by every rank after each step (and once with the resume step before the first). Fixes the
        warmup / total at the agreed steps; returns a line for the log when it fixed something. Rank 0's
        measurement decides and is broadcast, so every rank runs the same steps."""
        self.marks[step] = self.used()
        if step == CALIBRATION_STEPS and schedule.total is None and step <= schedule.start:
            t = self._rate(step)
            left = self.seconds * (1 - END_MARGIN) - self.marks[step]
            warmup = schedule.warmup if schedule.warmup is not None else max(1, round(WARMUP_FRACTION * left / t))
            error = None
            if warmup * t > left:
                error = (f"--time-budget {self.seconds / 60:g} min cannot hold the warmup: {warmup} steps at "
                         f"{t:.2f} s/step need {warmup * t / 60:.1f} min, {left / 60:.1f} min are left after "
                         f"{step} steps; give a longer budget or a shorter --warmup")
            warmup, error = _broadcast((warmup, error), control)
            if error:
                raise ValueError(error)
            schedule.warmup = warmup
            return f"--time-budget: {t:.3f} s/step over the first {step} steps; warmup {warmup} steps"
        if schedule.total is None and schedule.warmup is not None and step == schedule.start + schedule.warmup:
            t = self._rate(step)
            left = self.seconds * (1 - END_MARGIN) - self.marks[step] - self.save_seconds
            self.step_seconds, total = _broadcast((t, step + max(1, math.floor(left / t))), control)
            schedule.total = total
            return (f"--time-budget {self.seconds / 60:g} min: {t:.3f} s/step after warmup -> {total} steps "
                    f"in all (ends at ~{(self.marks[step] + (total - step) * t) / 60:.1f} min)")
        return None

    def out_of_time(self) -> bool:
        """True when one more step would not end inside the budget (the safety net; rank 0's clock)."""
        if self.step_seconds is None:
            return False
        return self.used() + 1.5 * self.step_seconds + self.save_seconds > self.seconds
