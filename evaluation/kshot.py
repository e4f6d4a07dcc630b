"""k-shot transfer of frozen features: a linear probe on 1 / 10 / all labelled images per class.

    python evaluation/kshot.py --checkpoint runs/demo --baseline \\
        --datasets dtd:/data/dtd imagefolder:/data/pets --shots 1 10 all --seeds 5 \\
        --json kshot.json --markdown kshot.md

Protocol (the seed's table, whose code upstream does not ship):
- the backbone is frozen; probe features (`--probe`, models/probe.py; default: ViT CLS of the last two blocks
  + LayerNorm, else pooled) are extracted once per dataset split at the pretraining global view size (resize +
  centre crop) and cached;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from common.io import atomic_open
from evaluation.cli import Shots, add_common_args, plain_warnings, setup
from evaluation.features import FeatureModel, cached_features, default_device
from evaluation.transfer_datasets import DatasetArg, Split

WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
ONE_SHOT_WEIGHT_DECAY = 1e-1
SMALL_PROBLEM = 2_000_000  # train features (N x D elements) below which a CPU probe runs on one thread

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
LINEAR_PROBE_NAME = (f"linear probe (L-BFGS logistic regression, weight decay from "
                     f"{{{', '.join(f'{w:g}' for w in WEIGHT_DECAYS)}}} chosen on held-out shots; "
                     f"1 shot: {ONE_SHOT_WEIGHT_DECAY:g})")


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


# ------------------------------------------------------------------------------------------------- run
def dataset_features(model: FeatureModel, arg: DatasetArg, train: Split, test: Split, cache_dir: str | Path | None,
                     max_train_per_class: int | None = None, max_test_per_class: int | None = None,
                     **extract_kw) -> Features:
    """Train-pool and test features of one dataset (from the cache when it holds them)."""
    key = {"name": arg.name, "root": str(arg.root.resolve()), "max_train_per_class": max_train_per_class,
           "max_test_per_class": max_test_per_class}
    cache = Path(cache_dir) if cache_dir else None
    return Features(cached_features(model, key, "train", train, cache, **extract_kw), train.labels,
                    cached_features(model, key, "test", test, cache, **extract_kw), test.labels, train.classes)


def run(args: argparse.Namespace, classifier: Classifier, classifier_name: str) -> list[dict]:
    models, datasets = setup(args)
    device = torch.device(args.device) if args.device else default_device()
    results = []
    for model in models:
        for arg, train, test in datasets:
            feats = dataset_features(model, arg, train, test, args.cache_dir, args.max_train_per_class,
                                     args.max_test_per_class, batch_size=args.batch_size,
                                     num_workers=args.num_workers, device=device)
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
    return report(args, linear_probe, LINEAR_PROBE_NAME)


if __name__ == "__main__":
    plain_warnings()
    main()
