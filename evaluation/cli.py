"""Command-line pieces shared by the evaluation scripts (kshot.py, knn.py, visualize.py, watch.py): which
network(s) to evaluate and with which probe, which datasets, shot counts, and clear errors for bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

from evaluation.features import FeatureModel, from_checkpoint, from_timm, random_init
from evaluation.transfer_datasets import DatasetArg, DatasetError, Split, cap_per_class, load_dataset, parse_dataset_arg
from models import is_vit
from models.probe import DEFAULT_PROBE, PROBES

# Input recipe of the trainer's presets (evaluation imports neither pipelines/ nor trainer/; a test checks
# these against SPEC_PRESETS and trainer PRESETS): preset -> (global view size, ViT patch size).
PRESET_INPUT = {"seed": (224, None), "cpu-small": (64, 8)}

Shots = int | str  # a positive int or "all"


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
    """Which network(s) to evaluate and which features to read; kshot.py, knn.py and visualize.py."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="LeJEPA run dir (latest valid checkpoint), checkpoint file, or a folder "
                     "written by models/export.py")
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
    parser.add_argument("--probe", choices=PROBES, default=DEFAULT_PROBE,
                        help="features read: 'seed' (default; ViT: CLS of the last two blocks + LayerNorm, others: "
                             "pooled), 'pooled' (the backbone's pooled output), 'projector' (the projector's "
                             "output; training checkpoints only)")


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
    parser.add_argument("--num-workers", type=int, default=min(4, len(os.sched_getaffinity(0))))
    parser.add_argument("--cache-dir", default=".cache/features", help="feature cache ('' disables it)")
    parser.add_argument("--max-train-per-class", type=positive_int,
                        help="cap the train pool (first N per class; recorded in the output)")
    parser.add_argument("--max-test-per-class", type=positive_int,
                        help="cap the test split (first N per class; recorded in the output)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def build_models(args: argparse.Namespace) -> list[FeatureModel]:
    if args.checkpoint:
        model = from_checkpoint(args.checkpoint, args.image_size, args.probe)
        models = [model]
        if args.baseline:
            models.append(random_init(model.info["arch"], model.image_size, model.info["patch_size"], probe=args.probe))
        return models
    if args.baseline:
        raise ValueError("--baseline needs --checkpoint (it copies the checkpoint's arch and input size)")
    if args.arch:
        if not args.random_init:
            raise ValueError("--arch evaluates a randomly initialised network: add --random-init "
                             "(for trained weights use --checkpoint)")
        size, patch = PRESET_INPUT.get(args.preset, (224, None))
        patch = args.patch_size or (patch if is_vit(args.arch) else None)  # a preset's patch is a ViT setting
        return [random_init(args.arch, args.image_size or size, patch, probe=args.probe)]
    return [from_timm(args.timm, args.timm_weights, args.image_size, args.probe)]


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



def plain_warnings() -> None:
    """Command-line warnings as one readable line (no source line, no category)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
