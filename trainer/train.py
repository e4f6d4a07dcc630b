"""`run(cfg)`: LeJEPA pretraining. Set-up helpers first, then the loop in one function, top to bottom.

Run dir (`--out`): `config.yaml` (resolved config), `tb/` (TensorBoard events: train/{loss,pred,sigreg,lr},
probe/acc, perf/{images_per_s,data_wait_frac,step_ms}, image `views`), `checkpoint_{step:06d}.pt` (the last
`--keep-ckpts`; format in models/checkpoint.py). A run dir that holds checkpoints is resumed from the
latest readable one (a truncated latest file is reported and the previous one used); its recipe must match
(RESUME_MUST_MATCH, the error names the field). `--no-resume` refuses such a dir instead of overwriting it.
Resume is exact: model, optimizer, scheduler, scaler, every rank's RNG states and the loader position
(epoch, batches consumed) are restored, so on CPU the losses after a kill -9 equal an uninterrupted run's.

Throughput choices: the batch arrives on the device from the loader; the SIGReg step counter lives on the
device (no host sync to draw directions); loss figures stay on the device and are read only every
`log_every` steps. The one per-step host sync is the finiteness check of the grad norm (needed to skip a
NaN/Inf step on every rank alike; DDP has already all-reduced the grads, so all ranks see the same norm).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.io import atomic_open
from losses import SIGReg, lejepa_loss
from models import build_encoder, list_checkpoints, load_checkpoint, save_checkpoint
from pipelines import build_loader
from pipelines.preview import view_grid as pipeline_view_grid
from trainer.config import RESUME_MUST_MATCH, TrainConfig, validate_config

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM's warning signals (--signal=USR1@90, scancel/preempt)


# ---------------------------------------------------------------------------------------------- set-up


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, we_initialised_the_group) from the torchrun-style env vars."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    owns_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
        owns_group = True
    return rank, world, device, owns_group


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
    """AdamW; no weight decay on biases, norms, tokens and position embeddings (1-D params), nor the probe."""
    decay, no_decay = [], []
    for name, p in module.encoder.named_parameters():
        (decay if p.ndim >= 2 and "pos_embed" not in name and "token" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.effective_weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if module.probe is not None:
        groups.append({"params": list(module.probe.parameters()), "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=None)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine from 1 to 1/1000 (the seed's final lr = lr/1000)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def code_version() -> str:
    try:
        repo = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _comparable(cfg: dict, name: str):
    if name == "weight_decay":
        return TrainConfig.from_dict(cfg).effective_weight_decay
    value = cfg.get(name)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()} if name == "spec" else value


def find_resume_checkpoint(cfg: TrainConfig) -> dict | None:
    """The checkpoint to resume from (latest valid in `out`), after checking it matches `cfg`."""
    if not list_checkpoints(cfg.out):
        return None
    if not cfg.resume:
        raise ValueError(f"--out {cfg.out} already holds checkpoints and --no-resume was given: "
                         "choose an empty --out or drop --no-resume to continue that run")
    ckpt = load_checkpoint(cfg.out)  # warns and falls back when the latest file is truncated
    saved, now = ckpt["config"], cfg.to_dict()
    for name in RESUME_MUST_MATCH:
        if _comparable(saved, name) != _comparable(now, name):
            raise ValueError(
                f"checkpoint {ckpt['path']} was trained with {name}={_comparable(saved, name)!r} but this run "
                f"has {name}={_comparable(now, name)!r}; use another --out (or the same settings) to resume"
            )
    return ckpt


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


# ------------------------------------------------------------------------------------------------ run


def run(cfg: TrainConfig) -> dict:
    """Train until cfg.steps/epochs, a preemption signal, or divergence. Returns a summary dict."""
    validate_config(cfg)
    rank, world, device, owns_group = setup_distributed(cfg)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    out = Path(cfg.out)
    if cfg.data is None:  # the embedded default: rank 0 writes it once, the others wait
        from pipelines.embedded import materialise

        if rank == 0:
            materialise()
        if world > 1:
            dist.barrier()
        data = str(materialise() / "train")
    else:
        data = cfg.data
    ckpt = find_resume_checkpoint(cfg)

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    loader = build_loader(data, cfg.spec, backend=cfg.backend, batch_size=cfg.batch_size, device=device,
                          rank=rank, world_size=world, seed=cfg.seed, num_workers=cfg.num_workers)
    steps_per_epoch = len(loader) // cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(f"--data {data}: {len(loader)} batches per epoch < --accum-steps {cfg.accum_steps}")
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    warmup = cfg.warmup if cfg.warmup is not None else max(1, total // 10)

    encoder = build_encoder(cfg.arch, proj_dim=cfg.proj_dim, hidden_dim=cfg.hidden_dim,
                            patch_size=cfg.patch_size, img_size=cfg.spec.global_size)
    module = TrainModule(encoder, loader.num_classes).to(device)
    if world > 1 and device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # conv-net BN over the global batch (GPU only)
    optimizer = build_optimizer(module, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    amp_dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype == torch.float16)  # fp16 GPUs only
    sigreg = SIGReg(num_slices=cfg.num_slices, seed=cfg.seed)

    step, epoch, pos = 0, 0, 0  # completed optimizer steps; loader epoch; batches consumed in that epoch
    if ckpt is not None:
        module.encoder.load_state_dict(ckpt["model"])
        if module.probe is not None and ckpt["probe"] is not None:
            module.probe.load_state_dict(ckpt["probe"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, pos = ckpt["step"], ckpt["epoch"], ckpt["step_in_epoch"]
        if ckpt["world_size"] == world:
            set_rng_state(ckpt["rng"][rank])
        else:  # same data, other sharding: continue at the same fraction of the epoch (not bit-exact)
            warnings.warn(f"resuming a {ckpt['world_size']}-rank checkpoint on {world} ranks: not bit-exact")
            pos = pos * ckpt["world_size"] // world
            set_rng_state(ckpt["rng"][0])
        if rank == 0:
            print(f"resumed from {ckpt['path']} at step {step}", flush=True)
        del ckpt

    model = DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else module
    if cfg.compile:
        model = torch.compile(model)

    writer, version = None, code_version()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / "config.yaml", _plain(dict(cfg.to_dict(), data=data, world_size=world,
                                                    total_steps=total, code_version=version)))
        # purge_step drops events a killed run logged after its last checkpoint
        writer = SummaryWriter(out / "tb", purge_step=step + 1 if step else None)

    def checkpoint() -> None:
        """Every rank contributes its RNG state; rank 0 writes the file atomically."""
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank == 0:
            e, p = (epoch + 1, 0) if pos >= len(loader) else (epoch, pos)
            state = {"epoch": e, "step_in_epoch": p, "world_size": world, "config": cfg.to_dict(),
                     "model": module.encoder.state_dict(),
                     "probe": module.probe.state_dict() if module.probe is not None else None,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": rngs, "code_version": version}
            save_checkpoint(state, out, step, keep=cfg.keep_ckpts)
        if world > 1:
            dist.barrier()

    preempt = PreemptionFlag()
    preempt.install()
    status, bad, skipped = "done", 0, 0
    step_t = torch.tensor(step, device=device)  # SIGReg's direction seed, advanced on the device
    images_per_step = cfg.batch_size * world * cfg.accum_steps
    last: dict = {}  # figures of the last logged step
    t_log, wait_log, steps_log = time.perf_counter(), 0.0, 0
    loader.set_epoch(epoch, pos)
    batches = iter(loader)
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    model.train()
    try:
        while step < total:
            # ---- forward/backward over accum_steps micro-batches
            figures = torch.zeros(5, device=device)  # loss, pred, sigreg, probe correct, probe labelled
            # BatchNorm running stats change in the forward: keep a copy (a few KB) to undo a skipped step
            buffers = [b.detach().clone() for b in module.buffers() if b.is_floating_point()]
            for micro in range(cfg.accum_steps):
                t0 = time.perf_counter()
                if pos >= len(loader):  # epoch boundary: reshuffle
                    epoch, pos = epoch + 1, 0
                    loader.set_epoch(epoch)
                    batches = iter(loader)
                batch = next(batches)
                pos += 1
                wait_log += time.perf_counter() - t0
                sync = model.no_sync() if world > 1 and micro < cfg.accum_steps - 1 else contextlib.nullcontext()
                with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                    out_, logits = model(batch.global_views, batch.local_views)
                    # the loss in fp32: its terms are means of small differences that bf16 would quantise
                    parts = lejepa_loss(out_.global_emb.float(), out_.all_emb.float(), lambd=cfg.lambd,
                                        sigreg=sigreg, step=step_t)
                    loss = parts.loss
                    if logits is not None:
                        labels = batch.labels.expand(logits.shape[0], -1)  # [G, B]
                        labelled = labels >= 0
                        # sum / count (not 'mean'): a batch without labels gives 0, not 0/0 = NaN
                        probe_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-1, reduction="sum") / labelled.sum().clamp_min(1)
                        loss = loss + probe_loss
                        figures[3] += ((logits.argmax(-1) == labels) & labelled).sum()
                        figures[4] += labelled.sum()
                    scaler.scale(loss / cfg.accum_steps).backward()
                figures[:3] += torch.stack([parts.loss, parts.pred, parts.sigreg]).detach().float() / cfg.accum_steps

            # ---- optimizer step, skipped (on every rank alike) when the gradient is not finite
            if scaler.is_enabled():
                scaler.unscale_(optimizer)
            norm = nn.utils.clip_grad_norm_(module.encoder.parameters(), cfg.grad_clip or float("inf"))
            if scaler.is_enabled():  # fp16: the scaler skips overflow steps itself and lowers its scale
                scaler.step(optimizer)
                scaler.update()
            elif torch.isfinite(norm).item():
                optimizer.step()
                bad = 0
            else:
                bad, skipped = bad + 1, skipped + 1
                with torch.no_grad():
                    for saved, b in zip(buffers, (b for b in module.buffers() if b.is_floating_point())):
                        b.copy_(saved)
                if rank == 0:
                    tqdm.write(f"step {step + 1}: non-finite loss/gradient, step skipped ({bad} in a row)")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            step_t += 1
            steps_log += 1
            bar.update(1)

            # ---- logging (the only place loss figures leave the device)
            if step % cfg.log_every == 0 or step == total:
                if world > 1:
                    dist.all_reduce(figures)  # sums: loss parts / world = mean over ranks
                    figures[:3] /= world
                loss_v, pred_v, sig_v, correct, labelled = figures.tolist()
                elapsed = time.perf_counter() - t_log
                row = {"train/loss": loss_v, "train/pred": pred_v, "train/sigreg": sig_v,
                       "train/lr": scheduler.get_last_lr()[0],
                       "perf/images_per_s": images_per_step * steps_log / elapsed,
                       "perf/data_wait_frac": wait_log / elapsed,
                       "perf/step_ms": 1000 * elapsed / steps_log}
                if labelled:
                    row["probe/acc"] = correct / labelled
                last = {"loss": loss_v, **({"probe_acc": row["probe/acc"]} if labelled else {})}
                if writer is not None:
                    for tag, value in row.items():
                        writer.add_scalar(tag, value, step)
                    bar.set_postfix(loss=f"{loss_v:.4f}", pred=f"{pred_v:.4f}", sigreg=f"{sig_v:.3f}",
                                    acc=f"{row.get('probe/acc', float('nan')):.3f}",
                                    img_s=f"{row['perf/images_per_s']:.0f}",
                                    wait=f"{row['perf/data_wait_frac']:.0%}", refresh=False)
                t_log, wait_log, steps_log = time.perf_counter(), 0.0, 0
            if writer is not None and cfg.image_every and step % cfg.image_every == 0:
                writer.add_image("views", view_grid(batch, cfg.spec), step)

            # ---- divergence, checkpoints, preemption
            if bad >= cfg.max_bad_steps:
                status = "diverged"
                checkpoint()  # skipped steps left the weights at the last finite update
                if rank == 0:
                    tqdm.write(f"stopping: {bad} consecutive non-finite steps (limit --max-bad-steps "
                               f"{cfg.max_bad_steps}); the weights of the last good step are in "
                               f"{out}/checkpoint_{step:06d}.pt. Lower --lr or raise --warmup.")
                break
            if step % cfg.ckpt_every == 0 and step < total:
                checkpoint()
            signalled = preempt.signum is not None
            if world > 1 and (step % cfg.signal_sync_every == 0 or step == total):
                flag = torch.tensor([float(signalled)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signalled = flag.item() > 0
            elif world > 1:
                signalled = False  # act only at agreed steps so all ranks save together
            if signalled:
                status = "preempted"
                checkpoint()
                if rank == 0:
                    tqdm.write(f"preempted at step {step}: checkpoint written to {out}")
                break
        if status == "done":
            checkpoint()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if hasattr(loader, "close"):  # FFCV keeps decoding after its iterator is dropped
            loader.close()
    if status == "preempted" and preempt.signum is not None:
        preempt.chain()  # e.g. submitit's SIGUSR1 handler: requeue the job
    preempt.uninstall()
    return {"status": status, "step": step, "total_steps": total, "out": str(out), "skipped_steps": skipped,
            "last": last}
