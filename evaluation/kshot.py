"""k-shot transfer of frozen features: a linear probe on 1 / 10 / all labelled images per class.

    python evaluation/kshot.py --checkpoint runs/demo --baseline \\
        --datasets dtd:/data/dtd imagefolder:/data/pets --shots 1 10 all --seeds 5 \\
        --json kshot.json --markdown kshot.md

Protocol (the seed's table, whose code upstream does not ship):
- the backbone is frozen; probe features (ViT: CLS of the last two blocks + LayerNorm, else pooled) are
  extracted once per dataset split at the pretraining global view size (resize + centre crop) and cached;
- for each seed, k images per class are drawn from the train pool (a class with fewer than k uses all of
  them, with a warning, and is recorded in the output); "all" uses the whole pool once (no sampling, so
  one seed);
- classifier: multinomial logistic regression, full-batch L-BFGS on standardised features; the weight
  decay is chosen from WEIGHT_DECAYS by accuracy on a held-out fifth of the sampled shots (at least one
  image per class that has two or more), then refit on all the shots. With one shot per class nothing can
  be held out, so 1-shot probes use the fixed ONE_SHOT_WEIGHT_DECAY. The test split is never used for any
  choice;
- accuracy on the full test split (unless capped by --max-test-per-class, which is recorded), mean ± std
  (sample std) over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from common.io import atomic_open
from evaluation.features import FeatureModel, cached_features, default_device, from_checkpoint, from_timm, random_init
from evaluation.transfer_datasets import DatasetArg, DatasetError, Split, cap_per_class, load_dataset, parse_dataset_arg
from models import is_vit

WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
ONE_SHOT_WEIGHT_DECAY = 1e-1
SMALL_PROBLEM = 2_000_000  # train features (N x D elements) below which a CPU probe runs on one thread
# Input recipe of the trainer's presets (evaluation imports neither pipelines/ nor trainer/; a test checks
# these against SPEC_PRESETS and trainer PRESETS): preset -> (global view size, ViT patch size).
PRESET_INPUT = {"seed": (224, None), "cpu-small": (64, 8)}

Shots = int | str  # a positive int or "all"


# ---------------------------------------------------------------------------------------------- sampling
def sample_shots(labels: np.ndarray, shots: Shots, seed: int) -> tuple[np.ndarray, dict[int, int]]:
    """Indices of `shots` images per class (sorted), drawn without replacement with `seed`, and the classes
    that had fewer than `shots` images {class: available} (they contribute all they have)."""
    classes = np.unique(labels)
    if shots == "all":
        return np.arange(len(labels)), {}
    rng = np.random.default_rng(seed)
    picked, short = [], {}
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            short[int(c)] = len(members)
        picked.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(picked)), short


def holdout_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into `labels`) to fit on and to validate on: a fifth of each class, at least one image of
    every class that has two or more, none of a class with one (it must stay in the fit set)."""
    rng = np.random.default_rng([seed, 1])  # a stream independent of the shot sampling
    fit, val = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, len(members) // 5) if len(members) >= 2 else 0
        val.append(members[:n_val])
        fit.append(members[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


# ------------------------------------------------------------------------------------------- classifiers
def fit_logistic(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = 200) -> Tensor:
    """Multinomial logistic regression (mean cross-entropy + wd/2 ||W||^2, bias unpenalised), full-batch
    L-BFGS from zero: deterministic, no learning rate to tune. Returns W [D + 1, C] (last row: bias)."""
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    w = torch.zeros(x1.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x1 @ w, y) + 0.5 * weight_decay * w[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def _logits(w: Tensor, x: Tensor) -> Tensor:
    return x @ w[:-1] + w[-1]


@dataclass
class ProbeResult:
    predictions: Tensor  # [N_test] predicted class
    info: dict  # what was chosen (recorded per seed)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, seed: int) -> ProbeResult:
    """Standardise with the shots' statistics, choose the weight decay on held-out shots, refit on all."""
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    fit_idx, val_idx = holdout_split(train_y.cpu().numpy(), seed)
    if len(val_idx) == 0:
        wd, val_acc = ONE_SHOT_WEIGHT_DECAY, None
    else:
        fit_idx, val_idx = torch.from_numpy(fit_idx).to(train_x.device), torch.from_numpy(val_idx).to(train_x.device)
        scores = []
        for wd in WEIGHT_DECAYS:
            w = fit_logistic(train_x[fit_idx], train_y[fit_idx], num_classes, wd)
            logits = _logits(w, train_x[val_idx])
            acc = (logits.argmax(1) == train_y[val_idx]).float().mean().item()
            loss = F.cross_entropy(logits, train_y[val_idx]).item()
            scores.append((acc, -loss, wd))  # best accuracy, ties broken by the lower validation loss
        val_acc, _, wd = max(scores)
    w = fit_logistic(train_x, train_y, num_classes, wd)
    return ProbeResult(_logits(w, test_x).argmax(1), {"weight_decay": wd, "val_acc": val_acc})


Classifier = Callable[[Tensor, Tensor, Tensor, int, int], ProbeResult]


# ------------------------------------------------------------------------------------------- evaluation
@dataclass
class Features:
    """Cached features of one dataset for one model."""

    train_x: Tensor
    train_y: np.ndarray
    test_x: Tensor
    test_y: np.ndarray
    classes: list[str]


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Temporarily use `n` intra-op threads (None: leave as is). A small probe is thousands of tiny ops,
    where thread hand-offs cost more than the work (10x more on a busy machine): one thread is faster."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def evaluate_shots(feats: Features, shots: Shots, seeds: int, classifier: Classifier,
                   device: torch.device | None = None) -> dict:
    """Accuracy (%) of `classifier` trained on `shots` per class for each seed; mean, std and what was
    recorded (per-seed accuracies, short classes, classifier choices)."""
    device = device or default_device()
    num_classes = len(feats.classes)
    test_x = feats.test_x.to(device)
    test_y = torch.from_numpy(feats.test_y).to(device)
    run_seeds = [0] if shots == "all" else list(range(seeds))
    accs, infos, short = [], [], {}
    for seed in run_seeds:
        idx, short = sample_shots(feats.train_y, shots, seed)
        train_x = feats.train_x[idx].to(device)
        train_y = torch.from_numpy(feats.train_y[idx]).to(device)
        with cpu_threads(1 if device.type == "cpu" and train_x.numel() < SMALL_PROBLEM else None):
            result = classifier(train_x, train_y, test_x, num_classes, seed)
        accs.append(100.0 * (result.predictions == test_y).float().mean().item())
        infos.append(result.info)
    return {
        "shots": shots, "mean": float(np.mean(accs)),
        "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "seeds": len(run_seeds), "per_seed": accs, "choices": infos,
        "short_classes": {feats.classes[c]: n for c, n in short.items()},
    }


def warn_short_classes(label: str, train: Split, shots_list: list[Shots]) -> None:
    counts = np.bincount(train.labels, minlength=len(train.classes))
    present = counts[counts > 0]
    for shots in shots_list:
        if shots != "all" and shots > present.min():
            n_short = int((present < shots).sum())
            smallest = train.classes[int(np.flatnonzero(counts == present.min())[0])]
            warnings.warn(f"dataset {label}: --shots {shots} is larger than {n_short} class(es) of the train "
                          f"pool (smallest: {smallest!r} with {present.min()} images); those classes use all "
                          f"their images (recorded in the output as short_classes)", stacklevel=2)


# ---------------------------------------------------------------------------------------------- outputs
def format_markdown(results: list[dict], notes: list[str] = ()) -> str:
    """Rows: shots x model; columns: datasets, then the average over datasets (as in the seed's table)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    models = list(dict.fromkeys(r["model"] for r in results))
    shots_order = list(dict.fromkeys(r["shots"] for r in results))
    cell = {(r["shots"], r["model"], r["dataset"]): r for r in results}
    lines = ["| shots | model | " + " | ".join(datasets) + " | avg |",
             "|---|---|" + "---:|" * (len(datasets) + 1)]
    for shots in shots_order:
        for model in models:
            rs = [cell.get((shots, model, d)) for d in datasets]
            if not any(rs):
                continue
            cells = [f"{r['mean']:.1f} ± {r['std']:.1f}" if r and r["seeds"] > 1 else
                     (f"{r['mean']:.1f}" if r else "–") for r in rs]
            avg = f"{np.mean([r['mean'] for r in rs]):.1f}" if all(rs) else "–"
            lines.append(f"| {shots} | {model} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------- CLI
def parse_shots(text: str) -> Shots:
    if text == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots {text!r}: expected a positive integer or 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--shots {text!r}: expected a positive integer or 'all'")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Which network(s) to evaluate; shared by kshot.py, knn.py and visualize.py."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="LeJEPA run dir (latest valid checkpoint) or checkpoint file")
    src.add_argument("--arch", help="evaluate this arch at random init (with --random-init)")
    src.add_argument("--timm", metavar="MODEL_NAME", help="a timm model; random init unless --timm-weights")
    parser.add_argument("--random-init", action="store_true", help="required with --arch (makes intent explicit)")
    parser.add_argument("--preset", choices=sorted(PRESET_INPUT), help="with --arch: input size and ViT patch "
                        "size of this training preset")
    parser.add_argument("--patch-size", type=positive_int, help="with --arch: ViT patch size")
    parser.add_argument("--timm-weights", help="with --timm: a local weights file (nothing is downloaded)")
    parser.add_argument("--baseline", action="store_true",
                        help="with --checkpoint: also evaluate the same arch / patch / input size at random init")
    parser.add_argument("--image-size", type=positive_int, help="input size (default: pretraining global view size)")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags kshot.py and knn.py share (model, datasets, shots, outputs, extraction)."""
    add_model_args(parser)
    parser.add_argument("--datasets", nargs="+", required=True, metavar="NAME:ROOT",
                        help="dtd, fgvcaircraft, stanfordcars, cifar10, cifar100, flowers102, food101, "
                             "oxfordiiitpet (torchvision layouts, no download) or imagefolder:DIR")
    parser.add_argument("--shots", nargs="+", type=parse_shots, default=[1, 10, "all"])
    parser.add_argument("--seeds", type=positive_int, default=5, help="number of seeds (0..N-1) per shot count")
    parser.add_argument("--json", help="write results as a JSON list here")
    parser.add_argument("--markdown", help="write the markdown table here")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--cache-dir", default=".cache/features", help="feature cache ('' disables it)")
    parser.add_argument("--max-train-per-class", type=positive_int,
                        help="cap the train pool (first N per class; recorded in the output)")
    parser.add_argument("--max-test-per-class", type=positive_int,
                        help="cap the test split (first N per class; recorded in the output)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def build_models(args: argparse.Namespace) -> list[FeatureModel]:
    if args.checkpoint:
        model = from_checkpoint(args.checkpoint, args.image_size)
        models = [model]
        if args.baseline:
            base = random_init(model.info["arch"], model.image_size, model.info["patch_size"])
            models.append(base)
        return models
    if args.baseline:
        raise ValueError("--baseline needs --checkpoint (it copies the checkpoint's arch and input size)")
    if args.arch:
        if not args.random_init:
            raise ValueError("--arch evaluates a randomly initialised network: add --random-init "
                             "(for trained weights use --checkpoint)")
        size, patch = PRESET_INPUT.get(args.preset, (224, None))
        patch = args.patch_size or (patch if is_vit(args.arch) else None)  # a preset's patch is a ViT setting
        return [random_init(args.arch, args.image_size or size, patch)]
    return [from_timm(args.timm, args.timm_weights, args.image_size)]


def load_datasets(args: argparse.Namespace) -> list[tuple[DatasetArg, Split, Split]]:
    out = []
    for text in args.datasets:
        arg = parse_dataset_arg(text)
        train, test = load_dataset(arg)
        train, test = cap_per_class(train, args.max_train_per_class), cap_per_class(test, args.max_test_per_class)
        warn_short_classes(arg.label, train, args.shots)
        out.append((arg, train, test))
    return out


def setup(args: argparse.Namespace) -> tuple[list[FeatureModel], list[tuple[DatasetArg, Split, Split]]]:
    """Everything that can fail on bad input, before any feature is extracted: clear message, no traceback."""
    try:
        datasets = load_datasets(args)
        models = build_models(args)
    except (DatasetError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    return models, datasets


def run(args: argparse.Namespace, classifier: Classifier, classifier_name: str) -> list[dict]:
    models, datasets = setup(args)
    device = torch.device(args.device) if args.device else default_device()
    results = []
    for model in models:
        for arg, train, test in datasets:
            key = {"name": arg.name, "root": str(arg.root.resolve()), "max_train_per_class": args.max_train_per_class,
                   "max_test_per_class": args.max_test_per_class}
            kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device)
            cache = Path(args.cache_dir) if args.cache_dir else None
            feats = Features(cached_features(model, key, "train", train, cache, **kw), train.labels,
                             cached_features(model, key, "test", test, cache, **kw), test.labels, train.classes)
            for shots in tqdm(args.shots, desc=f"{model.name} {arg.label} probes", leave=False):
                r = evaluate_shots(feats, shots, args.seeds, classifier, device)
                results.append({"dataset": arg.label, "model": model.name, **r, "classifier": classifier_name,
                                "n_train": len(train.labels), "n_test": len(test.labels),
                                "max_train_per_class": args.max_train_per_class,
                                "max_test_per_class": args.max_test_per_class, "model_info": model.info})
    return results


def notes_for(results: list[dict], classifier_name: str) -> list[str]:
    notes = [f"{classifier_name}; accuracy % on the test split, mean ± std over seeds "
             f"('all': one run on the whole train pool)"]
    seen = set()
    for r in results:
        tag = (r["dataset"], r["max_train_per_class"], r["max_test_per_class"])
        if (r["max_train_per_class"] or r["max_test_per_class"]) and tag not in seen:
            seen.add(tag)
            notes.append(f"{r['dataset']}: subset, at most {r['max_train_per_class'] or 'all'} train and "
                         f"{r['max_test_per_class'] or 'all'} test images per class "
                         f"({r['n_train']} train, {r['n_test']} test)")
        if r["short_classes"] and r["model"] == results[0]["model"]:
            notes.append(f"{r['dataset']}, {r['shots']} shots: {len(r['short_classes'])} class(es) had fewer "
                         f"images and used all of them: {r['short_classes']}")
    return notes


def report(args: argparse.Namespace, classifier: Classifier, classifier_name: str) -> list[dict]:
    """Run, print the markdown table, write --markdown / --json (atomically); returns the result rows."""
    results = run(args, classifier, classifier_name)
    table = format_markdown(results, notes_for(results, classifier_name))
    print(table, end="")
    if args.markdown:
        atomic_write_text(args.markdown, table)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args(argv)
    wds = ", ".join(f"{w:g}" for w in WEIGHT_DECAYS)
    return report(args, linear_probe, f"linear probe (L-BFGS logistic regression, weight decay from {{{wds}}} "
                  f"chosen on held-out shots; 1 shot: {ONE_SHOT_WEIGHT_DECAY:g})")


def plain_warnings() -> None:
    """Command-line warnings as one readable line (no source line, no category)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"


if __name__ == "__main__":
    plain_warnings()
    main()
