"""`TrainConfig`: every knob of a run, its CLI flags (shared by all launchers) and validation.

Precedence: explicit flag > preset value > dataclass default. The resolved config (preset applied, spec
filled in) is what `trainer.run` receives, what `OUT/config.yaml` records and what checkpoints store.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.images import IMAGE_EXTS
from models.registry import ARCHS, is_vit
from pipelines import BACKENDS, StreamOptions, streamed
from pipelines.spec import SPEC_PRESETS, MultiCropSpec
from pipelines.streaming import check_source


# Presets fill every field the user did not set on the command line.
#
# Learning rate: a preset's `lr` is stated for a reference global batch `base_batch` (images per optimizer step,
# batch_size x world size x accum_steps). Unless --lr is given, the launch scales it linearly to the run's global
# batch: lr = lr_preset x global_batch / base_batch (`scale_lr`). Linear, as the AdamW multi-crop SSL recipes
# do: DINO (facebookresearch/dino, main_dino.py: "args.lr * (batch_size_per_gpu * world_size) / 256.  # linear
# scaling rule", its --lr "specified here for a reference batch size of 256"); LeJEPA's own code
# (rbalestr-lab/lejepa, MINIMAL.md) fixes one LR for one batch (2e-3 at 256, ViT-S/8) and states no rule, so
# we keep DINO's. The warmup (10 % of the run by default) is what keeps a linearly scaled peak stable.
# An --lr given on the command line is used as is.
PRESETS: dict[str, dict] = {
    # The seed recipe (LeJEPA ViT-L/14, 2x224 + 6x98 views): AdamW 5e-4, wd 5e-2, λ 0.05, 1024 slices,
    # 100 epochs; 64 images per GPU (x 8 GPUs = 512 per step) fits an 80 GB card in bf16. The 5e-4 is for that
    # global batch of 512: 4 nodes x 8 GPUs (2048 per step) train at 2e-3.
    "seed": dict(arch="vit_l", patch_size=None, batch_size=64, lr=5e-4, base_batch=512, epochs=100, warmup=None,
                 lambd=0.05, num_slices=1024, proj_dim=128, hidden_dim=2048, log_every=50, image_every=2000,
                 ckpt_every=2500),
    # Tiny views (2x64 + 6x32 px) and ResNet-18 (~3x the images/s of ViT-tiny/8 on 2 cores) so a CPU run
    # learns something in minutes; `--arch vit_t` gets patch 8 (64 px -> 8x8 tokens). A short run wants a
    # larger λ (SIGReg is still far from Gaussian after a few hundred steps) and a higher LR: 2e-3 for one
    # process of 64 images.
    "cpu-small": dict(arch="resnet18", patch_size=8, batch_size=64, lr=2e-3, base_batch=64, steps=300, warmup=None,
                      lambd=0.1, num_slices=256, proj_dim=64, hidden_dim=512, log_every=10, image_every=100,
                      ckpt_every=100),
}
# The preset that may train on the embedded Fashion-MNIST set on a cluster (everything else needs --data there).
DEMO_PRESET = "cpu-small"
LR_RULE = "linear"

# A resumed run must agree with its checkpoint on these (anything else, e.g. --steps, may change). The LR is
# compared as the recipe states it (base_lr at base_batch), not as scaled: the scaled LR depends on the world
# size, and a run resumed on another world size keeps the LR it was launched with (`resumed_config`; the
# optimizer and scheduler state restored from the checkpoint carry that LR anyway).
RESUME_MUST_MATCH = ("arch", "patch_size", "proj_dim", "hidden_dim", "spec", "batch_size", "accum_steps",
                     "base_lr", "base_batch", "weight_decay", "lambd", "num_slices", "seed")


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    data: str | None = None  # ImageFolder dir, tar shards, .beton, http(s):// or pipe: shards; None -> embedded
    stream: bool = False  # stream local tar shards (URLs and pipe: always stream)
    shuffle_buffer: int = 1000  # streamed shards: samples per shuffle block
    shard_retries: int = 3  # streamed shards: retries of a failing shard before it is skipped
    samples_per_shard: int | None = None  # streamed shards: None -> the writer's index, else one shard counted
    backend: str = "auto"
    out: str = "runs/default"
    preset: str = "cpu-small"
    steps: int | None = None  # total optimizer steps; exclusive with epochs
    epochs: int | None = None
    time_budget: float | None = None  # minutes of wall clock; the step count is fixed after warmup (trainer)
    batch_size: int = 64  # per rank, per micro-batch
    accum_steps: int = 1
    lr: float = 5e-4  # peak AdamW LR after warmup (after batch scaling); cosine to lr/1000
    base_lr: float | None = None  # the LR as the recipe states it, for `base_batch`; None: = lr
    base_batch: int | None = None  # reference global batch of base_lr; None: lr given explicitly, not scaled
    weight_decay: float | None = None  # None: 5e-2 for ViT/ConvNeXt (AdamW-style nets), 5e-4 for ResNet
    warmup: int | None = None  # warmup steps; None: 10 % of the run
    grad_clip: float = 1.0  # max global grad norm of the encoder; 0 = no clipping
    lambd: float = 0.05
    num_slices: int = 1024
    proj_dim: int = 128
    hidden_dim: int = 2048
    patch_size: int | None = None  # ViT only; None = the registry's patch
    compile: bool = False
    amp: bool = True  # bf16 autocast (fp16 + GradScaler on GPUs without bf16); False = full fp32
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int | None = None
    seed: int = 0
    ckpt_every: int = 100
    keep_ckpts: int = 3
    resume: bool = True  # reuse the latest checkpoint in `out`; False refuses a dir that has checkpoints
    log_every: int = 10
    image_every: int = 100  # view grid to TensorBoard; 0 = never
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops as "diverged"
    eval_every: int | None = None  # k-shot of every N-th checkpoint, off the training path (evaluation/watch.py)
    eval_data: tuple[str, ...] | None = None  # NAME:ROOT datasets of kshot.py for --eval-every
    signal_sync_every: int = 5  # DDP: steps between all-reduces that agree on a preemption signal
    # Faults (trainer/faults.py): a rank waits this long for the others in a collective (process-group set-up
    # included) and for its data loader, then exits naming the step; a failed checkpoint write is retried at
    # the next checkpoint step, and this many failures in a row stop the run.
    collective_timeout: float = 600.0  # seconds
    data_timeout: float = 600.0  # seconds
    max_ckpt_failures: int = 3
    spec: MultiCropSpec = field(default_factory=MultiCropSpec)

    def __post_init__(self) -> None:
        if self.base_lr is None:  # an LR set directly (API, --lr) is its own base
            self.base_lr = self.lr

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all ranks."""
        return self.batch_size * world_size * self.accum_steps

    def stream_options(self) -> StreamOptions | None:
        """The loader's StreamOptions when --data is streamed (URLs, pipe:, --stream), else None (indexed)."""
        if self.data is None or not streamed(self.data, self.stream):
            return None
        return StreamOptions(shuffle_buffer=self.shuffle_buffer, retries=self.shard_retries,
                             samples_per_shard=self.samples_per_shard)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # the spec becomes a plain dict too

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {sorted(unknown)}")
        if isinstance(d.get("spec"), dict):
            d["spec"] = MultiCropSpec.from_dict(d["spec"])
        return cls(**d)

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.arch.startswith("resnet") else 5e-2


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


SPEC_FLAGS = tuple(f.name for f in dataclasses.fields(MultiCropSpec))


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every TrainConfig flag. Defaults are None so `config_from_args` can tell 'not given' from a value."""
    g = parser.add_argument_group("training (trainer.TrainConfig)")
    g.add_argument("--arch", help=f"backbone: {', '.join(ARCHS)}")
    g.add_argument("--data", help="ImageFolder dir, webdataset tar shards ('train-{000000..000146}.tar'), .beton, "
                                  "or shards to stream: 'http(s)://host/train-{000000..000146}.tar', "
                                  "'pipe:COMMAND' (default: embedded Fashion-MNIST)")
    g.add_argument("--stream", action="store_true", default=None,
                   help="stream local tar shards front to back instead of indexing them (URLs and pipe: always "
                        "stream)")
    g.add_argument("--shuffle-buffer", type=int, help="streamed shards: samples per shuffle block (default 1000)")
    g.add_argument("--shard-retries", type=int,
                   help="streamed shards: retries of a failing shard (backoff 1, 2, 4 s ...) before it is skipped "
                        "(default 3)")
    g.add_argument("--samples-per-shard", type=int,
                   help="streamed shards: samples per shard, for the epoch length (default: the writer's "
                        "<prefix>.index.json beside the shards, else the first shard is counted)")
    g.add_argument("--backend", help=f"input pipeline: {', '.join(BACKENDS)} (default auto)")
    g.add_argument("--out", help="run dir: checkpoints, tb/, config.yaml (default runs/default)")
    g.add_argument("--preset", help=f"recipe defaults: {', '.join(PRESETS)} (default: slurm.py seed; local.py seed "
                                    "with CUDA, cpu-small without)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="total optimizer steps")
    length.add_argument("--epochs", type=int, help="total epochs (alternative to --steps)")
    length.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="train for this much wall clock, final checkpoint included: the warmup + cosine "
                             "schedule is laid over the budget (step count fixed after warmup from the measured "
                             "step time; alternative to --steps/--epochs)")
    g.add_argument("--batch-size", type=int, help="images per rank per micro-batch")
    g.add_argument("--accum-steps", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (warmup, then cosine to lr/1000), used as given; "
                                         "default: the preset's LR scaled linearly to the global batch")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 5e-2 ViT/ConvNeXt, 5e-4 ResNet)")
    g.add_argument("--warmup", type=int, help="warmup steps (default 10%% of the run)")
    g.add_argument("--grad-clip", type=float, help="max grad norm (0 = off; default 1.0)")
    g.add_argument("--lambd", type=float, help="SIGReg weight λ in [0, 1]")
    g.add_argument("--num-slices", type=int, help="SIGReg random directions per step")
    g.add_argument("--proj-dim", type=int, help="projector output dim")
    g.add_argument("--hidden-dim", type=int, help="projector hidden dim")
    g.add_argument("--patch-size", type=int, help="ViT patch size (default: preset / registry)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--no-amp", dest="amp", action="store_false", default=None,
                   help="full fp32 instead of bf16 autocast (debugging, exact comparisons)")
    g.add_argument("--device", help="auto | cpu | cuda (default auto)")
    g.add_argument("--num-workers", type=int, help="loader workers per rank")
    g.add_argument("--seed", type=int)
    g.add_argument("--ckpt-every", type=int, help="checkpoint every N steps")
    g.add_argument("--keep-ckpts", type=int, help="keep the last K checkpoints (default 3)")
    g.add_argument("--no-resume", dest="resume", action="store_false", default=None,
                   help="never reuse checkpoints in --out (refuses a dir that already has some)")
    g.add_argument("--log-every", type=int, help="TensorBoard scalars every N steps")
    g.add_argument("--image-every", type=int, help="TensorBoard view grid every N steps (0 = never)")
    g.add_argument("--max-bad-steps", type=int, help="stop after K consecutive NaN/Inf steps (default 10)")
    g.add_argument("--collective-timeout", type=float, metavar="SECONDS",
                   help="DDP: how long a rank waits for the others in a collective (and at start-up) before it "
                        "exits naming the operation and step (default 600)")
    g.add_argument("--data-timeout", type=float, metavar="SECONDS",
                   help="how long a rank waits for one batch from its data loader before it exits (default 600)")
    g.add_argument("--max-ckpt-failures", type=int,
                   help="a failed checkpoint write is retried at the next checkpoint step; stop after K failures "
                        "in a row (default 3)")
    g.add_argument("--eval-every", type=int, help="all-shot k-shot of every N-th checkpoint during the run, off the "
                                                  "training path (a multiple of --ckpt-every; needs --eval-data)")
    g.add_argument("--eval-data", nargs="+", metavar="NAME:ROOT",
                   help="datasets for --eval-every, as evaluation/kshot.py takes them (dtd:/data/dtd, imagefolder:DIR)")
    s = parser.add_argument_group("multi-crop spec (overrides of the preset's MultiCropSpec)")
    reference = MultiCropSpec()
    for name in SPEC_FLAGS:  # one flag per spec field: counts, sizes, ranges and every probability
        value = getattr(reference, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple):
            s.add_argument(flag, type=float, nargs=len(value), metavar="X", help=f"default {value}")
        else:
            s.add_argument(flag, type=type(value), help=f"default {value}")
    return parser


def scale_lr(base_lr: float, global_batch: int, base_batch: int) -> float:
    """The linear scaling rule (LR_RULE): base_lr is right for base_batch images per step."""
    return base_lr * global_batch / base_batch


def config_from_args(args: argparse.Namespace, world_size: int = 1) -> TrainConfig:
    """Resolve flags + preset into a TrainConfig (unknown preset -> ValueError listing the valid ones).

    `world_size` is the number of ranks the launcher will start: without --lr, the preset's LR is scaled to
    the global batch batch_size x world_size x accum_steps, once, here (the trainer and its checkpoints use
    the result). An explicit --lr is kept as given.
    """
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.get("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    for length in ("steps", "epochs", "time_budget"):  # one run length: a given one replaces the preset's
        if length in given:
            for other in {"steps", "epochs", "time_budget"} - {length}:
                values.pop(other, None)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in given.items() if k in fields})
    # The preset's patch size is a ViT setting: it does not apply to a ResNet/ConvNeXt.
    if "patch_size" not in given and not is_vit(values.get("arch", TrainConfig.arch)):
        values["patch_size"] = None
    spec_changes = {k: tuple(given[k]) if isinstance(given[k], list) else given[k] for k in SPEC_FLAGS if k in given}
    values["spec"] = SPEC_PRESETS[preset].replace(**spec_changes)
    if values.get("eval_data") is not None:
        values["eval_data"] = tuple(values["eval_data"])
    values["preset"] = preset
    base_batch = values.pop("base_batch", None)
    if "lr" not in given and base_batch is not None:
        cfg = TrainConfig(**values)
        values.update(base_lr=cfg.lr, base_batch=base_batch,
                      lr=scale_lr(cfg.lr, cfg.global_batch(world_size), base_batch))
    return TrainConfig(**values)


def resumed_config(cfg: TrainConfig, saved: dict) -> TrainConfig:
    """The config a resumed run trains with: this launch's, but with the LR the run was launched with.

    The scaled LR is resolved once, at the run's first launch: a run resumed on another world size (same
    base_lr/base_batch, which RESUME_MUST_MATCH checks) goes on with the LR its optimizer and scheduler
    state hold, and config.yaml / new checkpoints record that LR rather than one this world size would give.
    """
    return dataclasses.replace(cfg, lr=saved.get("lr", cfg.lr))


def warmup_steps(cfg: TrainConfig, total: int | None) -> int | None:
    """Warmup length of a run of `total` steps: --warmup, else 10 % of the run (None while a --time-budget
    run's length is unknown: the trainer decides it from the measured step time)."""
    if cfg.warmup is not None or total is None:
        return cfg.warmup
    return max(1, total // 10)


def _has_image(root: Path) -> bool:
    for _, _, files in os.walk(root):
        if any(f.lower().endswith(IMAGE_EXTS) for f in files):
            return True
    return False


def validate_config(cfg: TrainConfig, check_data: bool = True) -> None:
    """Raise a ValueError naming the bad field before any process or loader starts.

    `check_data=False` skips looking at --data (a SLURM submit host that does not mount the cluster's
    filesystem: the nodes check it when the job starts)."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown arch {cfg.arch!r}; valid: {', '.join(ARCHS)}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cfg.backend!r}; valid: {', '.join(BACKENDS)}")
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; valid: {', '.join(PRESETS)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {cfg.device!r}: valid: auto, cpu, cuda")
    lengths = {"steps": cfg.steps, "epochs": cfg.epochs, "time_budget": cfg.time_budget}
    if sum(v is not None for v in lengths.values()) != 1:
        raise ValueError("give exactly one of --steps / --epochs / --time-budget (got "
                         + ", ".join(f"{k}={v}" for k, v in lengths.items()) + ")")
    if cfg.time_budget is not None and not cfg.time_budget > 0:
        raise ValueError(f"--time-budget must be > 0 minutes, got {cfg.time_budget}")
    for name in ("steps", "epochs", "batch_size", "accum_steps", "num_slices", "proj_dim", "hidden_dim",
                 "log_every", "ckpt_every", "max_bad_steps", "signal_sync_every", "max_ckpt_failures"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {value}")
    for name in ("shuffle_buffer", "samples_per_shard"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{_flag(name)} must be >= 1, got {value}")
    for name in ("keep_ckpts", "image_every", "grad_clip", "shard_retries"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    for name in ("collective_timeout", "data_timeout"):
        if not getattr(cfg, name) > 0:  # (NaN too)
            raise ValueError(f"{_flag(name)} must be > 0 seconds, got {getattr(cfg, name)}")
    if cfg.warmup is not None and cfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {cfg.warmup}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if not 0.0 <= cfg.lambd <= 1.0:
        raise ValueError(f"--lambd must be in [0, 1], got {cfg.lambd}")
    if cfg.patch_size is not None and not is_vit(cfg.arch):
        raise ValueError(f"--patch-size only applies to ViT archs, not {cfg.arch!r}")
    if cfg.base_batch is not None and cfg.base_batch < 1:
        raise ValueError(f"base_batch must be >= 1, got {cfg.base_batch}")
    if (cfg.eval_every is None) != (not cfg.eval_data):
        raise ValueError("--eval-every and --eval-data go together (evaluate every N-th checkpoint on these sets)")
    if cfg.eval_every is not None:
        if cfg.eval_every < 1 or cfg.eval_every % cfg.ckpt_every:
            raise ValueError(f"--eval-every {cfg.eval_every} must be a positive multiple of --ckpt-every "
                             f"{cfg.ckpt_every} (only checkpoints can be evaluated)")
        for item in cfg.eval_data:
            name, sep, root = item.partition(":")
            if not sep or not name or not root:
                raise ValueError(f"--eval-data {item!r}: expected NAME:ROOT, e.g. dtd:/data/dtd or imagefolder:DIR")
            if check_data and not Path(root).exists():
                raise ValueError(f"--eval-data {item!r}: {root} does not exist")
    if cfg.data is not None and check_data:
        validate_data(cfg.data, cfg.stream)
    elif cfg.stream and cfg.data is None:
        raise ValueError("--stream needs --data (webdataset tar shards)")


def validate_data(data: str, stream: bool = False) -> None:
    """A ValueError naming --data when it cannot be trained on. A streamed source (URL, pipe:, --stream)
    is checked cheaply: the pattern expands and one of its first shards opens as a tar."""
    text = str(data)
    if streamed(text, stream):
        check_source(text)  # its errors name the source ("data source 'http://...': ...")
        return
    if "{" in text:  # webdataset brace pattern: let the source scanner expand and check the shards
        from pipelines.sources import open_source

        open_source(text)
        return
    path = Path(text)
    if not path.exists():
        raise ValueError(f"--data {text!r} does not exist")
    if path.is_dir():
        if not _has_image(path) and not any(path.glob("*.tar")):
            raise ValueError(f"--data {text!r} holds no image files ({', '.join(IMAGE_EXTS)})")
    elif not (path.suffix in (".beton", ".tar")):
        raise ValueError(f"--data {text!r} is a file but neither a .beton nor a .tar shard")
    elif path.stat().st_size == 0:
        raise ValueError(f"--data {text!r} is an empty file")
