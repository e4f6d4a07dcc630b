"""Full training-step throughput (loader -> encoder -> LeJEPA loss -> optimizer) per backend and arch.

    python benchmarks/train_step.py [--data DIR] [--beton FILE] [--backends torchvision dali ffcv]
                                    [--archs vit_t resnet18] [--preset cpu-small] [--steps 10] [--repeats 3]

Each (backend, arch) is one real `trainer.run` (the same code a user runs, TensorBoard included); the
figures are the trainer's own `perf/images_per_s` and `perf/data_wait_frac` (the fraction of the step
spent waiting for the loader), read back from its event file. The first `--steps` window is warm-up
(worker start, DALI/numba build) and is dropped; the median of the next `--repeats` windows is reported.
`ratio` is images/s over the torchvision reference of the same arch measured in the same process.
FFCV needs `--beton` (see `python -m pipelines.convert_ffcv`); DALI/FFCV are skipped when not installed.
Default data: the embedded Fashion-MNIST subset. Target: data-wait < 5 % with DALI/FFCV, CPU preset.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from benchmarks.report import append_rows, emit  # noqa: E402
from pipelines import available  # noqa: E402
from trainer import TrainConfig  # noqa: E402
from trainer.config import PRESETS, add_config_args, config_from_args  # noqa: E402
from trainer.train import run  # noqa: E402


def patch_for(base: TrainConfig, arch: str) -> int | None:
    """The patch size a launcher gives `arch` under `base`'s preset: --patch-size if given, else the preset's
    (cpu-small: 8). `base` is resolved for --arch (ResNet-18 by default), which drops the preset's patch."""
    if not arch.startswith("vit_"):
        return None
    return base.patch_size if base.patch_size is not None else PRESETS[base.preset].get("patch_size")


def measure(base: TrainConfig, backend: str, arch: str, data: str, steps: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        cfg = TrainConfig(**{**base.__dict__, "backend": backend, "arch": arch, "data": data, "out": out,
                             "steps": steps * (repeats + 1), "epochs": None, "log_every": steps,
                             "image_every": 0, "ckpt_every": 10**9, "resume": False,
                             "patch_size": patch_for(base, arch)})
        summary = run(cfg)
        acc = EventAccumulator(str(Path(out) / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        windows = {tag: [e.value for e in acc.Scalars(tag)][1:]  # drop the warm-up window
                   for tag in ("perf/images_per_s", "perf/data_wait_frac", "perf/step_ms")}
    return {"backend": backend, "arch": arch, "status": summary["status"],
            "images_per_s": statistics.median(windows["perf/images_per_s"]),
            "data_wait_frac": statistics.median(windows["perf/data_wait_frac"]),
            "step_ms": statistics.median(windows["perf/step_ms"]),
            "windows": [round(v, 1) for v in windows["perf/images_per_s"]]}


VARIANTS = {  # name -> (torch.compile, bf16 autocast, channels_last)
    "eager-fp32": (False, False, False), "eager-bf16": (False, True, False),
    "eager-fp32-cl": (False, False, True), "eager-bf16-cl": (False, True, True),
    "compile-fp32": (True, False, False), "compile-bf16": (True, True, False),
    "compile-fp32-cl": (True, False, True), "compile-bf16-cl": (True, True, True),
}


def synthetic_step(base: TrainConfig, arch: str, variants: list[str], steps: int, repeats: int) -> list[dict]:
    """The model's side of the step alone: `Training.step` (forward, LeJEPA loss, backward, fused AdamW) on one
    fixed batch, no loader, for each variant; repeats interleaved so that drifts hit every variant alike."""
    import time

    import torch

    from pipelines import Batch
    from trainer.schedule import Schedule
    from trainer.train import Distributed, Training

    spec, b = base.spec, base.batch_size
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(b, spec.global_views, 3, spec.global_size, spec.global_size, generator=g),
                  torch.randn(b, spec.local_views, 3, spec.local_size, spec.local_size, generator=g),
                  torch.randint(0, 10, (b,), generator=g))
    runs = {}
    for name in variants:
        compiled, bf16, channels_last = VARIANTS[name]
        if channels_last and arch.startswith("vit_"):
            continue
        cfg = TrainConfig(**{**base.__dict__, "arch": arch, "compile": compiled, "amp": bf16,
                             "patch_size": patch_for(base, arch)})
        training = Training(cfg, Distributed(0, 1, torch.device("cpu"), False), 10, Schedule(10**6, 10))
        if channels_last:
            training.module.encoder.use_channels_last()
        training.distribute(0)
        t0 = time.perf_counter()
        for _ in range(2):  # warm-up: compile, lazy optimizer state, allocator
            training.step(lambda: batch)
        runs[name] = {"training": training, "times": [], "warmup_s": time.perf_counter() - t0}
    for _ in range(repeats):
        for name, r in runs.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                r["training"].step(lambda: batch)
            r["training"].read_window()  # the log step's read: the queue is drained
            r["times"].append((time.perf_counter() - t0) / steps)
    return [{"arch": arch, "variant": name, "images_per_s": b / statistics.median(r["times"]),
             "step_ms": 1000 * statistics.median(r["times"]), "warmup_s": r["warmup_s"],
             "runs_ms": [round(1000 * t, 1) for t in r["times"]]} for name, r in runs.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beton", help=".beton of the same images, for the ffcv backend")
    parser.add_argument("--backends", nargs="+", default=["torchvision", "dali", "ffcv"])
    parser.add_argument("--archs", nargs="+", default=["vit_t", "resnet18"])
    parser.add_argument("--repeats", type=int, default=3, help="timed windows (median reported)")
    parser.add_argument("--no-md", action="store_true", help="print JSON lines only, no BENCHMARKS.md row")
    parser.add_argument("--synthetic", nargs="*", metavar="VARIANT", choices=list(VARIANTS),
                        help=f"measure the model's step alone on a fixed batch for these variants "
                             f"({', '.join(VARIANTS)}; default all) instead of full training runs")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    add_config_args(parser)  # --data, --preset, --batch-size, --steps (= steps per window), --num-workers...
    args = parser.parse_args(argv)
    steps = args.steps or 10
    args.steps, args.epochs = 1, None  # the window length is handled in measure()
    base = config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.synthetic is not None:
        rows = []
        for arch in args.archs:
            for rec in synthetic_step(base, arch, args.synthetic or list(VARIANTS), steps, args.repeats):
                emit(rec)
                rows.append([arch, rec["variant"], base.batch_size, f"{rec['images_per_s']:.1f}",
                             f"{rec['step_ms']:.0f}", f"{rec['warmup_s']:.1f}"])
        if not args.no_md:
            append_rows("Training step, model only: synthetic batch (benchmarks/train_step.py --synthetic)",
                        ["arch", "variant", "batch", "images/s", "step ms", "warm-up s"], rows,
                        note=f"Preset {base.preset}; Training.step on one fixed batch, median of {args.repeats} "
                             f"interleaved windows of {steps} steps; -cl = channels_last.")
        return
    if base.data is None:
        from pipelines.embedded import materialise

        base.data = str(materialise() / "train")

    rows, reference = [], {}
    for arch in args.archs:
        for backend in args.backends:
            data = args.beton if backend == "ffcv" else base.data
            if not available(backend) or (backend == "ffcv" and not args.beton):
                emit({"backend": backend, "arch": arch, "skipped": "not installed" if not available(backend)
                      else "needs --beton"})
                continue
            rec = measure(base, backend, arch, data, steps, args.repeats)
            if backend == "torchvision":
                reference[arch] = rec["images_per_s"]
            rec["ratio_vs_torchvision"] = rec["images_per_s"] / reference[arch] if arch in reference else None
            rec.update(preset=base.preset, batch_size=base.batch_size, steps_per_window=steps)
            emit(rec)
            ratio = f"{rec['ratio_vs_torchvision']:.2f}" if rec["ratio_vs_torchvision"] else "-"
            rows.append([backend, arch, base.batch_size, f"{rec['images_per_s']:.1f}",
                         f"{100 * rec['data_wait_frac']:.1f} %", f"{rec['step_ms']:.0f}", ratio])
    if rows and not args.no_md:
        append_rows("Training step: loader -> loss -> optimizer (benchmarks/train_step.py)",
                    ["backend", "arch", "batch/rank", "images/s", "data wait", "step ms", "vs torchvision"], rows,
                    note=f"Preset {base.preset}, data {base.data}; median of {args.repeats} windows of {steps} "
                         "steps after one warm-up window.")


if __name__ == "__main__":
    main()
