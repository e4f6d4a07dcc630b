"""`run(cfg)`: LeJEPA pretraining. Set-up helpers first, then the loop in one function, top to bottom.

Run dir (`--out`): `config.yaml` (resolved config), `tb/` (TensorBoard events: train/{loss,pred,sigreg,lr},
probe/acc, perf/{images_per_s,data_wait_frac,step_ms}, monitor/{rankme,sigreg_global,sigreg_local,emb_std}
(label-free curves, losses/monitor.py), data/* fault counters of the loader summed over ranks (bad_samples;
for a stream skipped_shards, shard_retries, laps), image `views`), `checkpoint_{step:06d}.pt` (the last
`--keep-ckpts`; format in models/checkpoint.py). A run dir that holds checkpoints is resumed from the
latest readable one (a truncated latest file is reported and the previous one used); its recipe must match
(RESUME_MUST_MATCH, the error names the field). `--no-resume` refuses such a dir instead of overwriting it.
Resume is exact (trainer/checkpointing.py): on CPU the losses after a kill -9 equal an uninterrupted run's.

Throughput: a step that does not log makes no host sync. The batch arrives on the device from the loader;
the SIGReg step counter lives on the device (directions drawn without a sync); loss figures and the
non-finite-step counters stay on the device and are read every `log_every` steps; a non-finite gradient
skips the update on the device (fused AdamW's `found_inf`, as GradScaler does); BatchNorm statistics are
all-reduced without a host sync (models/batchnorm.py); ranks agree on a preemption signal over a CPU (gloo)
group, which never waits for the GPU.

Faults (trainer/faults.py): every collective and the process-group set-up time out after
`--collective-timeout`, a rank's data loader after `--data-timeout`; the rank then exits with a line naming
the operation and step, which `run(cfg, on_failure)` also hands to the launcher. A failed checkpoint write
is retried at the next checkpoint step (trainer/checkpointing.py).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.io import atomic_open
from losses import MONITOR_TAGS, SIGReg, lejepa_loss, monitor_figures
from models import build_encoder
from models.batchnorm import globalise_batchnorm
from pipelines import Batch, build_loader
from pipelines.preview import view_grid as pipeline_view_grid
from trainer import faults
from trainer.checkpointing import (Checkpointer, CheckpointError, Progress, code_version, find_resume_checkpoint,
                                   restore)
from trainer.config import TrainConfig, resumed_config, validate_config, warmup_steps
from trainer.plan import build_plan, format_plan
from trainer.schedule import CALIBRATION_STEPS, Schedule, TimeBudget

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM's warning signals (--signal=USR1@90, scancel/preempt)


# ---------------------------------------------------------------------------------------------- set-up


@dataclass
class Distributed:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # we initialised the process group (and destroy it at the end)
    control: object = None  # CPU (gloo) group for host-side agreement; None when world == 1


def setup_distributed(cfg: TrainConfig) -> Distributed:
    """Rank, world size and device from the torchrun-style env vars; the process group when world > 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # TF32 for fp32 matmuls/convolutions (the current API; the legacy allow_tf32 flags warn and can
        # conflict with inductor's settings)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.benchmark = True
    owns_group, control = False, None
    if world > 1:
        # --collective-timeout bounds the rendezvous and every collective: gloo raises in the waiting call;
        # NCCL's watchdog aborts the communicator and ends the rank (async error handling) instead of hanging.
        timeout = datetime.timedelta(seconds=cfg.collective_timeout)
        if cuda:
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
            owns_group = True
        control = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else dist.group.WORLD
    return Distributed(rank, world, device, owns_group, control)


class TrainModule(nn.Module):
    """Encoder + online probe in one module, so one DDP wrapper syncs both. The probe (LayerNorm + Linear)
    reads detached global-view features: it measures the representation without shaping it."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        d = encoder.feature_dim
        self.probe = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, num_classes)) if num_classes else None

    def forward(self, global_views, local_views):
        out = self.encoder(global_views, local_views)
        feats = out.features[: global_views.shape[1]].detach()  # [G, B, D]
        logits = self.probe(feats) if self.probe is not None else None
        return out, logits


def build_optimizer(module: TrainModule, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, tokens and position embeddings (1-D params), nor the probe.
    Fused: one kernel per step, and it takes `found_inf` to skip a non-finite step on the device."""
    decay, no_decay = [], []
    for name, p in module.encoder.named_parameters():
        (decay if p.ndim >= 2 and "pos_embed" not in name and "token" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.effective_weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if module.probe is not None:
        groups.append({"params": list(module.probe.parameters()), "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=True)


class PreemptionFlag:
    """SIGTERM/SIGUSR1 set a flag; the loop checks it at step boundaries, saves, then chains the handler
    that was installed before ours (e.g. submitit's requeue handler)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for s in SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def uninstall(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def chain(self) -> None:
        """Run the previous handler of the signal we received, if it is a Python callable."""
        handler = self.previous.get(self.signum)
        self.uninstall()
        if callable(handler):
            handler(self.signum, None)



def agree(dd: Distributed, *flags: bool) -> list[bool]:
    """Each flag OR-ed over ranks: a MAX all-reduce on the CPU control group (never waits for the GPU)."""
    if dd.world == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dd.control)
    return [bool(v) for v in t.tolist()]


def data_counters(loader, dd: Distributed) -> dict[str, float]:
    """The loader's cumulative fault counters (skipped shards, bad samples, ...) summed over ranks, on the
    CPU control group (never waits for the GPU)."""
    counters = loader.counters() if hasattr(loader, "counters") else {}
    if dd.world > 1 and counters:
        t = torch.tensor(list(counters.values()), dtype=torch.float64)
        dist.all_reduce(t, group=dd.control)
        counters = dict(zip(counters, t.tolist()))
    return counters


def view_grid(batch, spec, n: int = 4) -> torch.Tensor:
    """[3, H, W] image for TensorBoard: the views of the first `n` samples, one row each."""
    return torch.cat([pipeline_view_grid(batch, spec, index=i) for i in range(min(n, len(batch.labels)))], dim=1)


def write_yaml(path: Path, data: dict) -> None:
    with atomic_open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def _plain(d):
    """Tuples -> lists so yaml.safe_dump writes plain YAML."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


# Figures summed on the device during a logging window, read once per log step.
LOSS, PRED, SIGREG, CORRECT, LABELLED, SKIPPED = range(6)


class Training:
    """Everything one optimizer step needs, built from the config: encoder + probe, optimizer, LR schedule,
    autocast/scaler, SIGReg, and the on-device figures of the logging window. `step()` is the whole training
    step; the loop below and benchmarks/gpu_check.py (synthetic batches) call it."""

    def __init__(self, cfg: TrainConfig, dd: Distributed, num_classes: int, schedule: Schedule):
        self.cfg, self.dd, self.schedule = cfg, dd, schedule
        device = dd.device
        encoder = build_encoder(cfg.arch, proj_dim=cfg.proj_dim, hidden_dim=cfg.hidden_dim,
                                patch_size=cfg.patch_size, img_size=cfg.spec.global_size)
        # NHWC for conv nets on both devices: cuDNN's layout, and oneDNN's on CPU (ResNet-18 bf16 step 1.13-1.4x,
        # benchmarks/train_step.py --synthetic); a no-op for ViTs
        encoder.use_channels_last()
        self.module = TrainModule(encoder, num_classes).to(device)
        if dd.world > 1:
            globalise_batchnorm(self.module)  # every BN layer normalises over the global batch, no host sync
        self.model = self.module  # wrapped by distribute()
        self.optimizer = build_optimizer(self.module, cfg)
        # a callable object: LambdaLR keeps its fields (the step counts) in the scheduler's state dict
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        # fp16 (GPUs without bf16) needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and self.amp_dtype == torch.float16)
        self.sigreg = SIGReg(num_slices=cfg.num_slices, seed=cfg.seed)
        self.step_t = torch.zeros((), dtype=torch.int64, device=device)  # SIGReg's direction seed, on the device
        self.sums = torch.zeros(6, device=device)  # LOSS..SKIPPED, summed over the logging window
        self.bad_run = torch.zeros((), device=device)  # consecutive non-finite steps, counted on the device
        # BatchNorm running statistics change in the forward: a skipped step puts them back
        self.bn_buffers = [b for b in self.module.buffers() if b.is_floating_point()]

    def distribute(self, step: int) -> None:
        """DDP and torch.compile wrappers, after any checkpoint was loaded into the module."""
        self.step_t.fill_(step)
        if self.dd.world > 1:  # BN statistics are global already: nothing for DDP to broadcast each step
            device = self.dd.device
            self.model = DDP(self.module, device_ids=[device.index] if device.type == "cuda" else None,
                             broadcast_buffers=False)
        if self.cfg.compile:
            self.model = torch.compile(self.model)

    def step(self, next_batch) -> Batch:
        """One optimizer step over `accum_steps` micro-batches from `next_batch()`; returns the last batch.
        No host sync: a non-finite gradient skips the update on the device (all ranks alike: gradients are
        all-reduced, so every rank sees the same norm)."""
        cfg, sums, accum = self.cfg, self.sums, self.cfg.accum_steps
        saved_buffers = [b.detach().clone() for b in self.bn_buffers]
        for micro in range(accum):
            batch = next_batch()
            no_sync = self.dd.world > 1 and micro < accum - 1
            with self.model.no_sync() if no_sync else contextlib.nullcontext(), \
                    torch.autocast(self.dd.device.type, dtype=self.amp_dtype, enabled=cfg.amp):
                out, logits = self.model(batch.global_views, batch.local_views)
                # the loss in fp32: its terms are means of small differences that bf16 would quantise
                parts = lejepa_loss(out.global_emb.float(), out.all_emb.float(), lambd=cfg.lambd,
                                    sigreg=self.sigreg, step=self.step_t)
                loss = parts.loss
                if logits is not None:
                    labels = batch.labels.expand(logits.shape[0], -1)  # [G, B]
                    labelled = labels >= 0
                    # sum / count (not 'mean'): a batch without labels gives 0, not 0/0 = NaN
                    probe_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                 ignore_index=-1, reduction="sum") / labelled.sum().clamp_min(1)
                    loss = loss + probe_loss
                    sums[CORRECT] += ((logits.argmax(-1) == labels) & labelled).sum()
                    sums[LABELLED] += labelled.sum()
                self.scaler.scale(loss / accum).backward()
            sums[LOSS:SIGREG + 1] += torch.stack([parts.loss, parts.pred, parts.sigreg]).detach().float() / accum
        self.last_emb = out.all_emb.detach()  # the label-free curves of a log step read the last micro-batch

        if self.scaler.is_enabled():  # fp16: the scaler skips overflow steps itself and lowers its scale
            self.scaler.unscale_(self.optimizer)
        norm = nn.utils.clip_grad_norm_(self.module.encoder.parameters(), cfg.grad_clip or float("inf"))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            found_inf = (~torch.isfinite(norm)).float()
            self.optimizer.found_inf = found_inf  # fused AdamW leaves params and state untouched when 1
            self.optimizer.step()
            with torch.no_grad():
                skip = found_inf.bool()
                for saved, b in zip(saved_buffers, self.bn_buffers):
                    b.copy_(torch.where(skip, saved, b))  # (a blend would keep the NaNs)
            self.bad_run = (self.bad_run + 1) * found_inf
            sums[SKIPPED] += found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step_t += 1
        return batch

    def refresh_lr(self) -> None:
        """Re-apply the schedule to the optimizer (after a time budget fixed the warmup or total)."""
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.schedule(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def read_window(self) -> tuple[list[float], int, dict]:
        """The logging window's sums (averaged over ranks where they are means), the current run of
        non-finite steps and the label-free curves of the last step (losses/monitor.py: RankMe, SIGReg per
        view group, embedding std; rank 0's batch for the first and last): the one host read, at log steps.
        Resets the window."""
        window = self.sums.clone()
        if self.dd.world > 1:
            dist.all_reduce(window)
            window[[LOSS, PRED, SIGREG, SKIPPED]] /= self.dd.world  # means over ranks; probe counts stay sums
        # step_t - 1: the directions the step's loss used, so the two SIGReg curves average to train/sigreg
        monitor = monitor_figures(self.last_emb, self.cfg.spec.global_views, self.sigreg, self.step_t - 1)
        values = torch.cat([window, self.bad_run.reshape(1), monitor]).tolist()
        self.sums.zero_()
        figures, bad = values[:len(window)], int(values[len(window)])
        return figures, bad, dict(zip(MONITOR_TAGS, values[len(window) + 1:]))


class StepLog:
    """TensorBoard scalars, the progress bar and the throughput clock of the logging window."""

    def __init__(self, writer: SummaryWriter | None, bar: tqdm, images_per_step: int):
        self.writer, self.bar, self.images_per_step = writer, bar, images_per_step
        self.last: dict = {}  # figures of the last logged step (the run's summary)
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def log(self, step: int, sums: list[float], lr: float, monitor: dict) -> None:
        n, elapsed = self.steps, time.perf_counter() - self.t0
        row = {"train/loss": sums[LOSS] / n, "train/pred": sums[PRED] / n, "train/sigreg": sums[SIGREG] / n,
               "train/lr": lr, "perf/images_per_s": self.images_per_step * n / elapsed,
               "perf/data_wait_frac": self.wait / elapsed, "perf/step_ms": 1000 * elapsed / n}
        if sums[LABELLED]:
            row["probe/acc"] = sums[CORRECT] / sums[LABELLED]
        row.update({tag: v for tag, v in monitor.items() if v == v})  # NaN: no local views
        self.last = {"loss": row["train/loss"], **({"probe_acc": row["probe/acc"]} if "probe/acc" in row else {})}
        if self.writer is not None:
            for tag, value in row.items():
                self.writer.add_scalar(tag, value, step)
            self.bar.set_postfix(loss=f"{row['train/loss']:.4f}", pred=f"{row['train/pred']:.4f}",
                                 sigreg=f"{row['train/sigreg']:.3f}", acc=f"{row.get('probe/acc', math.nan):.3f}",
                                 img_s=f"{row['perf/images_per_s']:.0f}",
                                 wait=f"{row['perf/data_wait_frac']:.0%}", refresh=False)
        self.reset()


# ------------------------------------------------------------------------------------------------ run


def run(cfg: TrainConfig, on_failure=None) -> dict:
    """Train until cfg.steps/epochs, a preemption signal, or divergence. Returns a summary dict.

    A failure (an exception, or a stall the watchdog ends) is handed to `on_failure(faults.Failure)` first:
    rank, step, the operation under way and one line of why. An exception is then re-raised with that line."""
    validate_config(cfg)
    watch = faults.Watchdog(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), cfg.data_timeout,
                            cfg.collective_timeout, on_failure)
    dd = None
    try:
        dd = setup_distributed(cfg)
        return _train(cfg, dd, watch.start())
    except Exception as e:
        failure = watch.failure(e)
        e.add_note(failure.line())
        watch.report(failure)
        raise
    finally:
        watch.stop()
        if dd is not None and dd.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _data_root(cfg: TrainConfig, dd: Distributed) -> str:
    if cfg.data is not None:
        return cfg.data
    from pipelines.embedded import materialise  # the embedded default: rank 0 writes it once

    if dd.rank == 0:
        materialise()
    if dd.world > 1:
        dist.barrier()
    return str(materialise() / "train")


def _train(cfg: TrainConfig, dd: Distributed, watch: faults.Watchdog) -> dict:
    started = time.perf_counter()
    rank, world = dd.rank, dd.world
    out, data = Path(cfg.out), _data_root(cfg, dd)
    ckpt = find_resume_checkpoint(cfg)
    if ckpt is not None:
        cfg = resumed_config(cfg, ckpt["config"])  # the LR the run was launched with (scaled once, at launch)

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    loader = build_loader(data, cfg.spec, backend=cfg.backend, batch_size=cfg.batch_size, device=dd.device,
                          rank=rank, world_size=world, seed=cfg.seed, num_workers=cfg.num_workers,
                          stream=cfg.stream_options())
    steps_per_epoch = len(loader) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"--data {data}: {len(loader)} batches per epoch < --accum-steps {cfg.accum_steps}")
    if cfg.time_budget is None:
        total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
        schedule = Schedule(total, warmup_steps(cfg, total))
    else:  # the budget fixes warmup (unless given) and total from measured step times
        schedule = Schedule(None, cfg.warmup, start=CALIBRATION_STEPS)

    training = Training(cfg, dd, loader.num_classes, schedule)
    progress, budget_state = Progress(), None
    if ckpt is not None:
        progress = restore(ckpt, training.module, training.optimizer, training.scheduler, training.scaler, loader,
                           rank, world)
        if cfg.time_budget is None:  # the step counts come from this launch's flags (--steps may change)
            schedule.__init__(total, warmup_steps(cfg, total))
        budget_state = ckpt.get("budget")
        if rank == 0:
            print(f"resumed from {ckpt['path']} at step {progress.step}", flush=True)
        del ckpt
    training.distribute(progress.step)
    budget = TimeBudget(cfg.time_budget, started, budget_state) if cfg.time_budget is not None else None

    writer, version = None, code_version()

    def write_config() -> None:
        write_yaml(out / "config.yaml", _plain(dict(cfg.to_dict(), data=data, world_size=world,
                                                    total_steps=schedule.total, code_version=version, plan=plan)))

    if rank == 0:
        plan = build_plan(cfg, world_size=world, device=dd.device, steps_per_epoch=steps_per_epoch,
                          threads_per_rank=torch.get_num_threads())
        out.mkdir(parents=True, exist_ok=True)
        write_config()
        # purge_step drops events a killed run logged after its last checkpoint
        writer = SummaryWriter(out / "tb", purge_step=progress.step + 1 if progress.step else None)
        writer.add_text("plan", "    " + format_plan(plan).replace("\n", "\n    "), progress.step)  # verbatim
    checkpointer = Checkpointer(cfg, rank, world, training.module, training.optimizer, training.scheduler,
                                training.scaler, loader, version)

    def save() -> bool:
        t0 = time.perf_counter()
        written = checkpointer.save(progress, {"budget": budget.state()} if budget is not None else None)
        if budget is not None:  # the end of the budget keeps room for the slowest write seen
            budget.save_seconds = max(budget.save_seconds, time.perf_counter() - t0)
        return written

    preempt = PreemptionFlag()
    preempt.install()
    status, skipped = "done", 0
    bar = tqdm(total=schedule.total, initial=progress.step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    log = StepLog(writer, bar, cfg.batch_size * world * cfg.accum_steps)
    loader.set_epoch(progress.epoch, progress.pos)
    batches = iter(loader)

    def next_batch():
        nonlocal batches
        t0 = time.perf_counter()
        watch.enter(faults.DATA, progress.step + 1)
        if progress.pos >= len(loader):  # epoch boundary: reshuffle
            progress.epoch, progress.pos = progress.epoch + 1, 0
            loader.set_epoch(progress.epoch)
            batches = iter(loader)
        batch = next(batches)
        progress.pos += 1
        watch.enter(faults.STEP, progress.step + 1)
        log.wait += time.perf_counter() - t0
        return batch

    training.model.train()
    if budget is not None:
        budget.after_step(progress.step, schedule, dd.control, rank)  # the clock mark the first step is timed from
    try:
        while schedule.total is None or progress.step < schedule.total:
            batch = training.step(next_batch)
            progress.step += 1
            step, total = progress.step, schedule.total
            log.steps += 1
            bar.update(1)
            if budget is not None and total is None:
                note = budget.after_step(step, schedule, dd.control, rank)
                total = schedule.total
                if note:  # the schedule just changed: the next step's LR with it
                    training.refresh_lr()
                if note and rank == 0:
                    tqdm.write(note)
                    if total is not None:
                        bar.total = total
                        write_config()

            # ---- logging: the only place figures leave the device
            if step % cfg.log_every == 0 or step == total:
                watch.enter(faults.LOGGING, step)
                figures, bad, monitor = training.read_window()
                log.log(step, figures, training.scheduler.get_last_lr()[0], monitor)
                for tag, value in data_counters(loader, dd).items():  # data/skipped_shards, data/bad_samples ...
                    if writer is not None:
                        writer.add_scalar(tag, value, step)
                if figures[SKIPPED]:
                    skipped += int(figures[SKIPPED])
                    if rank == 0:
                        tqdm.write(f"step {step}: {int(figures[SKIPPED])} non-finite loss/gradient step(s) skipped "
                                   f"since the last log ({bad} in a row)")
                if bad >= cfg.max_bad_steps:
                    status = "diverged"
                    save()  # skipped steps left the weights at the last finite update
                    if rank == 0:
                        tqdm.write(f"stopping: {bad} consecutive non-finite steps (limit --max-bad-steps "
                                   f"{cfg.max_bad_steps}); the weights of the last good step are in "
                                   f"{out}/checkpoint_{step:06d}.pt. Lower --lr or raise --warmup.")
                    break
            if writer is not None and cfg.image_every and step % cfg.image_every == 0:
                writer.add_image("views", view_grid(batch, cfg.spec), step)

            # ---- checkpoints, preemption, the end of a time budget
            watch.enter(faults.CHECKPOINT, step)
            if step % cfg.ckpt_every == 0 and step != total:
                save()  # a failed write is said and retried at the next checkpoint step
            watch.enter(faults.SIGNAL_SYNC, step)
            if world == 1 or step % cfg.signal_sync_every == 0 or step == total:
                late = budget is not None and rank == 0 and step != total and budget.out_of_time()
                signalled, late = agree(dd, preempt.signum is not None, late)
                if signalled:
                    status = "preempted"  # every rank acts at the same agreed step, so they save together
                    save()
                    if rank == 0:
                        tqdm.write(f"preempted at step {step}: checkpoint written to {out}")
                    break
                if late:  # steps ran slower than measured: end now, checkpointed, inside the budget
                    if rank == 0:
                        tqdm.write(f"--time-budget: stopping at step {step} of {total}, the budget is used up "
                                   f"(steps ran slower than the {budget.step_seconds:.3f} s measured after warmup)")
                    break
        watch.enter(faults.CHECKPOINT, progress.step)
        if status == "done" and not save():
            raise CheckpointError(f"the final checkpoint (step {progress.step}) could not be written; the run "
                                  "resumes from the latest readable one")
        skipped += int(training.sums[SKIPPED].item())  # skipped since the last log (a preemption cut the window)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if hasattr(loader, "close"):  # FFCV keeps decoding after its iterator is dropped
            loader.close()
    if status == "preempted" and preempt.signum is not None:
        preempt.chain()  # e.g. submitit's SIGUSR1 handler: requeue the job
    preempt.uninstall()
    summary = {"status": status, "step": progress.step, "total_steps": schedule.total, "out": str(out),
               "skipped_steps": skipped, "last": log.last}
    if budget is not None:
        summary["minutes"] = budget.used() / 60
    return summary
