"""FFCV: conversion speed (images/s into a .beton) and the FFCV loader's throughput with numba's compile
time recorded apart from the steady state.

    python benchmarks/convert_ffcv.py [--src DIR] [--max-resolution 256] [--limit N] [--repeats 3]
                                      [--loader-seconds 20] [--preset seed] [--batch-size 64]
                                      [--reference] [--no-md]

Conversion: `pipelines.convert_ffcv.convert` (validation decode + FFCV writer process) on --src (default
imagenette160/train), median of --repeats runs; the writer process start (importing ffcv/torch) is
inside the figure, as a user sees it. Loader (--loader-seconds > 0): a fresh process-wide loader is
built, the first batch (numba compile + decode) is timed as `compile_s`, then batches are drawn for
the given seconds (median of --repeats windows). --reference runs the torchvision backend on the same
images in the same process for the ratio the design card targets (>= 9x, seed recipe, 256-px .beton).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import append_rows, emit  # noqa: E402
from pipelines import SPEC_PRESETS, build_loader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO / ".cache" / "data" / "imagenette160" / "train"


def subset(src: Path, limit: int, into: Path) -> Path:
    """An ImageFolder of symlinks to the first `limit` images (round-robin over classes)."""
    from pipelines.sources import open_source

    source = open_source(src)
    for i in range(0, len(source), max(1, len(source) // limit))[:limit]:
        f = Path(source.name(i))
        (into / f.parent.name).mkdir(parents=True, exist_ok=True)
        (into / f.parent.name / f.name).symlink_to(f.resolve())
    return into


def loader_throughput(source, backend: str, spec, batch_size: int, seconds: float, repeats: int,
                      num_workers: int | None) -> dict:
    t0 = time.perf_counter()
    loader = build_loader(source, spec, backend=backend, batch_size=batch_size, device="cpu",
                          num_workers=num_workers)
    it = iter(loader)
    next(it)  # FFCV: numba compiles the pipeline here (the kernels come from the on-disk cache)
    compile_s = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            n += len(batch.labels)
        rates.append(n / (time.perf_counter() - t))
    del it
    if hasattr(loader, "close"):
        loader.close()
    return {"backend": backend, "first_batch_s": round(compile_s, 2), "images_per_s": round(statistics.median(rates), 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(DEFAULT_SRC), help="ImageFolder / shards to convert")
    ap.add_argument("--max-resolution", type=int, default=256)
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--limit", type=int, default=0, help="convert only N images (smoke runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader-seconds", type=float, default=0.0, help="time the FFCV loader too")
    ap.add_argument("--preset", default="seed", choices=sorted(SPEC_PRESETS))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--reference", action="store_true", help="also the torchvision backend, for the ratio")
    ap.add_argument("--no-md", action="store_true", help="JSON lines only, no BENCHMARKS.md row")
    args = ap.parse_args(argv)
    from pipelines.convert_ffcv import convert

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ffcv-") as tmp:
        src = Path(args.src)
        if args.limit:
            src = subset(src, args.limit, Path(tmp) / "src")
        out = Path(tmp) / "bench.beton"
        reports = [convert(str(src), out, args.max_resolution, args.jpeg_quality, args.num_workers)
                   for _ in range(args.repeats)]
        rate = statistics.median(r["images_per_s"] for r in reports)
        record = {"bench": "convert_ffcv", "src": args.src, "images": reports[0]["images_written"],
                  "max_resolution": args.max_resolution, "images_per_s": rate,
                  "validate_s": statistics.median(r["validate_s"] for r in reports),
                  "write_s": statistics.median(r["write_s"] for r in reports), "mb": reports[0]["bytes"] / 2**20}
        emit(record)
        rows.append(["convert", record["images"], f"{rate:.0f} img/s", "", ""])
        if args.loader_seconds > 0:
            spec = SPEC_PRESETS[args.preset]
            ffcv = loader_throughput(out, "ffcv", spec, args.batch_size, args.loader_seconds, args.repeats,
                                     args.num_workers)
            emit({"bench": "ffcv_loader", "preset": args.preset, **ffcv})
            ratio = ""
            if args.reference:
                ref = loader_throughput(src, "torchvision", spec, args.batch_size, args.loader_seconds,
                                        args.repeats, args.num_workers)
                ratio = f"{ffcv['images_per_s'] / ref['images_per_s']:.2f}x"
                emit({"bench": "ffcv_loader_reference", "preset": args.preset, **ref, "ratio": ratio})
                rows.append([f"torchvision loader ({args.preset})", "", f"{ref['images_per_s']} img/s",
                             f"{ref['first_batch_s']} s", "1.00x"])
            rows.append([f"ffcv loader ({args.preset})", "", f"{ffcv['images_per_s']} img/s",
                         f"{ffcv['first_batch_s']} s", ratio])
    if not args.no_md:
        append_rows("FFCV conversion and loader", ["what", "images", f"median of {args.repeats}",
                                                   "first batch (compile)", "ratio"], rows)


if __name__ == "__main__":
    main()
