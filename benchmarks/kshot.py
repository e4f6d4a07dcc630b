"""k-shot evaluation cost: feature extraction images/s and probe time per dataset.

    python benchmarks/kshot.py --arch vit_t --random-init --preset cpu-small \\
        --datasets imagefolder:.cache/data/dtd10 --shots 1 10 all --seeds 5 --repeats 3

Per (model, dataset): extraction of the train pool through the real path (decode, resize + centre crop,
normalise, DataLoader workers, `probe_features`) in images/s, against the network alone on random tensors
of the same shape (the reference: what extraction would reach if loading were free); then the wall time of
one k-shot evaluation (all seeds) per shot count with the linear probe (including its weight-decay sweep)
and with weighted kNN. Medians of --repeats runs; the feature cache is not used.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import append_rows, emit  # noqa: E402
from evaluation.features import default_device, extract  # noqa: E402
from evaluation.knn import knn_classifier  # noqa: E402
from evaluation.cli import add_common_args, setup  # noqa: E402
from evaluation.kshot import Features, evaluate_shots, linear_probe  # noqa: E402


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


@torch.inference_mode()
def forward_only(model, n: int, batch_size: int, device: torch.device) -> None:
    """The network alone on `n` random images in the extraction's batches (the last one partial)."""
    module = model.module.to(device).eval()
    x = torch.randn(batch_size, 3, model.image_size, model.image_size, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, n, batch_size):
            module.probe_features(x[: min(batch_size, n - start)])
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-markdown", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    models, datasets = setup(args)
    device = torch.device(args.device) if args.device else default_device()
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device)
    rows = []
    for model in models:
        for arg, train, test in datasets:
            n = len(train.labels)
            extract(model, torch.utils.data.Subset(train.dataset, range(min(n, args.batch_size))), **kw)  # warm-up
            t_extract, train_x = median_time(lambda: extract(model, train.dataset, **kw), args.repeats)
            forward_only(model, min(n, args.batch_size), args.batch_size, device)  # warm-up
            t_forward, _ = median_time(lambda: forward_only(model, n, args.batch_size, device), args.repeats)
            feats = Features(train_x, train.labels, extract(model, test.dataset, **kw), test.labels, train.classes)
            rec = {"bench": "kshot", "device": device.type, "model": model.name, "dataset": arg.label,
                   "images": n, "image_size": model.image_size, "extract_img_s": round(n / t_extract, 1),
                   "forward_only_img_s": round(n / t_forward, 1), "ratio": round(t_forward / t_extract, 3),
                   "repeats": args.repeats, "seeds": args.seeds, "n_test": len(test.labels)}
            for shots in args.shots:
                t_lin, _ = median_time(lambda: evaluate_shots(feats, shots, args.seeds, linear_probe, device),
                                       args.repeats)
                t_knn, _ = median_time(lambda: evaluate_shots(feats, shots, args.seeds, knn_classifier, device),
                                       args.repeats)
                rec[f"linear_s_{shots}"], rec[f"knn_s_{shots}"] = round(t_lin, 3), round(t_knn, 3)
            emit(rec)
            rows.append([arg.label, model.name, f"{n} @ {model.image_size} px", rec["extract_img_s"],
                         rec["forward_only_img_s"], f"{rec['ratio']:.2f}",
                         " / ".join(f"{rec[f'linear_s_{s}']:.2f}" for s in args.shots),
                         " / ".join(f"{rec[f'knn_s_{s}']:.2f}" for s in args.shots)])
    if not args.no_markdown:
        shots = " / ".join(str(s) for s in args.shots)
        append_rows(
            f"k-shot evaluation ({device.type})",
            ["dataset", "model", "train images", "extract img/s", "network-only img/s", "extract / network-only",
             f"linear probe s ({shots} shots)", f"kNN s ({shots} shots)"], rows,
            note=f"Extraction: decode + resize/crop + forward over the train pool, {args.num_workers} loader "
                 f"workers, batch {args.batch_size}; probe times are one evaluation over {args.seeds} seeds "
                 f"('all': one run) on {len(test.labels)} test images. Medians of {args.repeats} runs.",
        )


if __name__ == "__main__":
    main()
