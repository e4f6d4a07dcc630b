"""Do the label-free curves track downstream accuracy? Spearman correlation along one CPU pretraining run.

    python benchmarks/label_free.py --out runs/label_free --steps 1000 --every 50

1. Pretrains with launchers/local.py (cpu-small preset, imagenette160 train), a checkpoint every --every
   steps, all kept (flags after `--` go to local.py, e.g. `-- --arch vit_t --backend torchvision`).
2. For each checkpoint, offline:
   - the four curves of losses/monitor.py (rankme, sigreg_global, sigreg_local, emb_std) on one fixed
     held-out batch: --eval-batch imagenette160 *val* images through the run's own multi-crop recipe
     (torchvision reference backend, fixed seed), the encoder in training mode (batch-statistics BatchNorm,
     as the trainer sees them) without gradients, SIGReg with the same directions (step 0) for every
     checkpoint, so only the weights change between points;
   - the train loss logged at that step (TensorBoard `train/loss`: that one step's batch, noisy);
   - the all-shot linear probe of evaluation/kshot.py (the watch.py code) on dtd10 (train -> test) and
     imagenette160 (train -> val).
3. Spearman's rho of each curve against each accuracy over the checkpoints; a JSON line per checkpoint and
   per correlation, and a table appended to BENCHMARKS.md. A curve that tracks accuracy has |rho| near 1
   (the LeJEPA loss and SIGReg should fall as accuracy rises: rho < 0; RankMe should rise: rho > 0).

Re-running with the same --out reuses the finished run (the trainer resumes and stops at once).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import append_rows, emit  # noqa: E402
from evaluation.features import from_checkpoint  # noqa: E402
from evaluation.watch import checkpoint_step, evaluate_all_shot, load_eval_data  # noqa: E402
from losses import MONITOR_TAGS, SIGReg, monitor_figures  # noqa: E402
from models import encoder_from_checkpoint, list_checkpoints, load_checkpoint  # noqa: E402
from pipelines import MultiCropSpec, build_loader  # noqa: E402

CURVES = ("train/loss", *MONITOR_TAGS)


def pretrain(args: argparse.Namespace, extra: list[str]) -> None:
    cmd = [sys.executable, str(REPO / "launchers" / "local.py"), "--preset", "cpu-small", "--data",
           str(args.imagenette / "train"), "--out", str(args.out), "--steps", str(args.steps), "--ckpt-every",
           str(args.every), "--keep-ckpts", str(args.steps // args.every + 1), "--log-every",
           str(args.every), "--image-every", "0", *extra]  # `extra` last: its flags win
    print("pretrain:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def train_loss(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def held_out_batch(cfg: dict, imagenette: Path, batch_size: int, seed: int):
    """One batch of val images through the run's recipe: the same pixels for every checkpoint."""
    spec = MultiCropSpec.from_dict(cfg["spec"])
    loader = build_loader(str(imagenette / "val"), spec, backend="torchvision", batch_size=batch_size,
                          device="cpu", seed=seed, num_workers=0)
    return next(iter(loader)), spec


@torch.no_grad()
def curves_of(path: Path, batch, spec: MultiCropSpec) -> dict[str, float]:
    encoder, cfg = encoder_from_checkpoint(load_checkpoint(path))
    out = encoder.train()(batch.global_views, batch.local_views)
    sigreg = SIGReg(num_slices=cfg["num_slices"], seed=cfg["seed"])
    figures = monitor_figures(out.all_emb, spec.global_views, sigreg, torch.tensor(0)).tolist()
    return dict(zip(MONITOR_TAGS, figures))


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "label_free", help="run dir")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="checkpoint (and evaluation) every N steps")
    parser.add_argument("--imagenette", type=Path, default=REPO / ".cache" / "data" / "imagenette160")
    parser.add_argument("--dtd", type=Path, default=REPO / ".cache" / "data" / "dtd10")
    parser.add_argument("--eval-batch", type=int, default=256, help="held-out images for the curves")
    parser.add_argument("--max-train-per-class", type=int, help="cap the k-shot train pools (recorded)")
    parser.add_argument("--eval-workers", type=int, default=2, help="k-shot feature extraction workers")
    parser.add_argument("--no-markdown", action="store_true", help="do not append to BENCHMARKS.md")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    for root in (args.imagenette / "train", args.imagenette / "val", args.dtd / "train"):
        if not root.is_dir():
            sys.exit(f"error: {root} does not exist (the tests extract ../shared/data/*.tar into .cache/data/)")
    datasets = load_eval_data([f"imagefolder:{args.dtd}", f"imagefolder:{args.imagenette}"],
                              args.max_train_per_class)
    labels = [arg.label for arg, _, _ in datasets]

    pretrain(args, extra)
    files = [p for p in list_checkpoints(args.out) if checkpoint_step(p) % args.every == 0]
    batch, spec = held_out_batch(load_checkpoint(files[0])["config"], args.imagenette, args.eval_batch, seed=1234)
    losses = train_loss(args.out)
    points = []
    for path in files:
        step = checkpoint_step(path)
        point = {"step": step, "train/loss": losses.get(step, float("nan")), **curves_of(path, batch, spec)}
        rows = evaluate_all_shot(from_checkpoint(path), datasets, max_train_per_class=args.max_train_per_class,
                                 num_workers=args.eval_workers)
        point.update({f"acc/{r['dataset']}": r["mean"] for r in rows})
        emit({"bench": "label_free", **point})
        points.append(point)

    rho = {(c, d): spearman([p[c] for p in points], [p[f"acc/{d}"] for p in points]) for c in CURVES for d in labels}
    for (c, d), value in rho.items():
        emit({"bench": "label_free", "curve": c, "accuracy": d, "spearman": value, "checkpoints": len(points)})
    if not args.no_markdown:
        header = ["step", *CURVES, *(f"{d} all-shot %" for d in labels)]
        table = [[p["step"], *(f"{p[c]:.4g}" for c in CURVES), *(f"{p[f'acc/{d}']:.1f}" for d in labels)]
                 for p in points]
        table += [[f"**Spearman ρ vs {d}**", *(f"**{rho[c, d]:+.2f}**" for c in CURVES), *([""] * len(labels))]
                  for d in labels]
        append_rows(
            "Label-free curves vs k-shot accuracy (one CPU run)", header, table,
            note=f"cpu-small pretraining on imagenette160 train, {len(points)} checkpoints (every {args.every} "
                 f"steps). Curves on one fixed batch of {args.eval_batch} imagenette160 val images (the run's "
                 f"views, encoder in training mode, SIGReg directions fixed); train/loss is the logged loss of "
                 f"that step. Accuracy: all-shot linear probe (evaluation/kshot.py) on dtd10 test and "
                 f"imagenette160 val" + (f", train pools capped at {args.max_train_per_class} per class"
                                         if args.max_train_per_class else "") + ".",
        )


if __name__ == "__main__":
    main()
