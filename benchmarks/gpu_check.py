"""`make gpu-check`: every GPU path of the project, run once, with its figures, on one GPU node.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--quick] [--sections env sigreg ...]
    DATA=/path/to/imagefolder python benchmarks/gpu_check.py      # the DALI sections read these images

Made for a node with no network and whatever torch / torchvision / timm it already has (Python 3.12 images
are common): DALI and FFCV are used only when they import, a section whose package is missing prints
`skipped: <package> not installed`, and the others go on. Each section prints one JSON line; all of them
go to one JSON file (--out) and a markdown table for BENCHMARKS.md is printed at the end. Without CUDA it
prints `no CUDA device: nothing to check` and exits 0. Budget: about 8 minutes on one H100/H200.

Sections
- env: GPU, driver, CUDA, versions, CPU cores visible to this process;
- sigreg: SIGReg forward+backward for N = 512 ... 8192 under torch.cuda.set_sync_debug_mode("error")
  (raises on any host sync), ms per call;
- train_step: `trainer.train.Training.step` (the trainer's own step) on a synthetic batch already on the
  device, seed-recipe shapes, bf16, vit_s and vit_l, eager and compiled: images/s, peak memory, and host
  syncs counted in non-logging steps (set_sync_debug_mode("warn"); target 0);
- ffcv_colour: FFCV's device colour ops (pipelines/ffcv_gpu.py `ColourOps`) on synthetic uint8 views,
  batch 64 and 256, eager and compiled: ms per batch, host CPU ms per batch, host syncs (target 0), first
  call (compile) time. Needs torch and numba only (the sampler), not ffcv;
- dali: the DALI `mixed` pipeline on an ImageFolder (DATA; default: 1024 imagenette160 photos from the
  tests' cache or ../shared/data upscaled to 500 px, ImageNet's pixel count, else synthetic 500-px JPEGs,
  written to a temp folder): images/s and host CPU ms per image at batch 64 and
  256 (hw_decoder_load 0.65, DALI's default) and at batch 256 with every JPEG on the hardware decoder
  (1.0), then a full training run (vit_s, seed recipe, trainer.run) fed by it: images/s and data-wait;
- pytest: `pytest -m gpu` and its summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SECTIONS = ("env", "sigreg", "train_step", "ffcv_colour", "dali", "pytest")
RESULTS: list[dict] = []


def emit(section: str, **record) -> dict:
    record = {"section": section, **record}
    RESULTS.append(record)
    print(json.dumps(record, default=str), flush=True)
    return record


def importable(module: str) -> str | None:
    """The package's version when it imports, else None."""
    try:
        mod = __import__(module, fromlist=["__version__"])
    except Exception:  # noqa: BLE001 - a broken install counts as missing too
        return None
    return getattr(mod, "__version__", "unknown")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def device_time(fn, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call: CUDA events on a GPU (`cuda_time`), the wall clock on CPU."""
    if device.type == "cuda":
        return cuda_time(fn, repeats, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cuda_time(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call, measured with CUDA events (one sync per measurement, not per call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


# ---------------------------------------------------------------------------------------------- sections
def section_env(args) -> None:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    dali = importable("nvidia.dali")
    emit("env", gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}."
         f"{props.minor}", driver=driver, cuda=torch.version.cuda, torch=torch.__version__,
         torchvision=importable("torchvision"), timm=importable("timm"), dali=dali, ffcv=importable("ffcv"),
         python=platform.python_version(), cpu_cores_visible=cores())


def section_sigreg(args) -> None:
    from losses import SIGReg

    sigreg = SIGReg(num_slices=1024)
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    rows = {}
    for n in (512, 1024, 2048, 4096, 8192):
        z = torch.randn(n, 512, device="cuda", requires_grad=True)

        def call():
            z.grad = None
            sigreg(z, step).backward()
            step.add_(1)

        call()  # lazy CUDA init outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
        try:
            times = cuda_time(call, repeats=5 if not args.quick else 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows[n] = round(1000 * statistics.median(times), 3)
    emit("sigreg", dim=512, slices=1024, ms_per_fwd_bwd=rows, host_syncs=0)


def _seed_batch(batch: int, spec, device):
    from pipelines import Batch

    g = torch.Generator(device=device).manual_seed(0)
    return Batch(torch.randn(batch, spec.global_views, 3, spec.global_size, spec.global_size, device=device,
                             generator=g),
                 torch.randn(batch, spec.local_views, 3, spec.local_size, spec.local_size, device=device, generator=g),
                 torch.randint(0, 1000, (batch,), device=device, generator=g))


def count_syncs(fn) -> int:
    """Host syncs during `fn()`, as set_sync_debug_mode("warn") reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def section_train_step(args) -> None:
    from trainer import TrainConfig
    from trainer.config import PRESETS
    from trainer.schedule import Schedule
    from trainer.train import Distributed, Training

    device = torch.device("cuda", 0)
    dd = Distributed(0, 1, device, False)
    archs = ("vit_s",) if args.quick else ("vit_s", "vit_l")
    for arch in archs:
        for compiled in (False, True):
            batch_size = 64 if arch == "vit_l" else 128
            preset = {k: v for k, v in PRESETS["seed"].items() if k in TrainConfig.__dataclass_fields__}
            cfg = TrainConfig(**{**preset, "arch": arch, "batch_size": batch_size, "compile": compiled,
                                 "preset": "seed", "out": "/tmp/gpu-check"})
            torch.cuda.reset_peak_memory_stats()
            training = Training(cfg, dd, num_classes=1000, schedule=Schedule(10**6, 10))
            training.distribute(0)
            batch = _seed_batch(batch_size, cfg.spec, device)
            t0 = time.perf_counter()
            for _ in range(3):  # compile, cuDNN autotune, lazy optimizer state
                training.step(lambda: batch)
            training.read_window()
            warm_s = time.perf_counter() - t0
            steps = 5 if args.quick else 20
            syncs = count_syncs(lambda: [training.step(lambda: batch) for _ in range(steps)])
            training.read_window()
            times = cuda_time(lambda: [training.step(lambda: batch) for _ in range(steps)], repeats=3)
            training.read_window()
            step_s = statistics.median(times) / steps
            emit("train_step", arch=arch, compiled=compiled, batch=batch_size, dtype="bf16",
                 images_per_s=round(batch_size / step_s, 1), step_ms=round(1000 * step_s, 2),
                 peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                 host_syncs_per_step=syncs / steps, warmup_s=round(warm_s, 1))
            del training, batch
            torch.cuda.empty_cache()


def ffcv_colour_figures(device, batch: int, compiled: bool, repeats: int) -> dict:
    """FFCV's device colour ops (`ffcv_gpu.ColourOps`) on a synthetic batch: device ms per batch, host CPU
    ms per batch, host syncs, first call (compile) time. Runs on CPU tensors too (tests)."""
    from pipelines import ffcv_gpu
    from pipelines.spec import MultiCropSpec

    spec, device = MultiCropSpec(), torch.device(device)
    ops = ffcv_gpu.ColourOps(spec, device, compiled=compiled)
    views, params = ffcv_gpu.synthetic_views(spec, batch, device)
    t0 = time.perf_counter()
    ops.both(*views, params)  # compiles the first time it sees a shape
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    cpu0 = time.process_time()
    times = device_time(lambda: ops.both(*views, params), device, repeats=repeats, warmup=3)
    host_ms = 1000 * (time.process_time() - cpu0) / (repeats + 3)
    syncs = count_syncs(lambda: ops.both(*views, params)) if device.type == "cuda" else None
    ms = 1000 * statistics.median(times)
    return dict(batch=batch, compiled=compiled, ms_per_batch=round(ms, 2), images_per_s=round(1000 * batch / ms),
                host_cpu_ms_per_batch=round(host_ms, 2), host_syncs=syncs, first_call_s=round(first_s, 1),
                views=f"{spec.global_views}x{spec.global_size} + {spec.local_views}x{spec.local_size}")


def section_ffcv_colour(args) -> None:
    try:
        import numba  # noqa: F401 - the sampler (pipelines/params.py) is numba-compiled
    except ImportError:
        emit("ffcv_colour", skipped="numba not installed")
        return
    for compiled in (False, True):
        for batch in (64, 256):
            emit("ffcv_colour", **ffcv_colour_figures("cuda", batch, compiled, repeats=10 if not args.quick else 3))


def _photos(limit: int):
    """(name, JPEG bytes) of up to `limit` imagenette160 training photos the repository reaches without a
    download: the tests' extracted cache, else the tar in ../shared/data; none when neither exists."""
    import tarfile

    cached = REPO / ".cache" / "data" / "imagenette160" / "train"
    if cached.is_dir():
        for f in sorted(cached.glob("*/*"))[:limit]:
            yield f"{f.parent.name}/{f.name}", f.read_bytes()
        return
    tar = REPO.parent / "shared" / "data" / "imagenette160.tar"
    if tar.is_file():
        with tarfile.open(tar) as tf:
            members = [m for m in tf if m.isfile() and "/train/" in m.name][:limit]
            for m in members:
                yield "/".join(m.name.split("/")[-2:]), tf.extractfile(m).read()


def _dali_data(count: int = 1024, side: int = 500) -> tuple[str, str]:
    """DATA when set; else `count` photos the repository reaches, upscaled to `side` px on the long side
    (ImageNet's pixel count; the 160-px originals would flatter the decoder), else smooth synthetic JPEGs
    of that size, written to a temp folder as an ImageFolder."""
    import io

    import numpy as np
    from PIL import Image

    data = os.environ.get("DATA")
    if data:
        return data, "DATA"
    root = Path(tempfile.mkdtemp(prefix="gpu-check-jpegs-"))
    written = 0
    for name, raw in _photos(count):
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        scale = side / max(img.size)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC).save(root / name, quality=90)
        written += 1
    if written:
        return str(root), f"{written} imagenette160 photos upscaled to {side} px"
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"class{c}").mkdir()
        for i in range(count // 4):  # smooth random images, JPEG q90
            base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(base).resize((side, side * 3 // 4), Image.BICUBIC).save(root / f"class{c}" / f"{i:04d}.jpg",
                                                                                     quality=90)
    return str(root), f"{count} synthetic {side} px JPEGs (no DATA, no imagenette160)"


def dali_figures(data: str, batch: int, hw_decoder_load: float, seconds: float, device="cuda") -> dict:
    """The DALI loader (`mixed` decode on CUDA; its CPU graph on CPU, for tests) iterated for `seconds` after a
    warm-up batch, epochs chained: source images/s and CPU ms of this process per image. The CPU time is
    every host thread's: the feed, DALI's CPU stages and nvJPEG's host share (Huffman decoding of the
    images the hardware decoder does not take)."""
    from pipelines import build_loader
    from pipelines.dali_backend import DecoderOptions
    from pipelines.spec import SPEC_PRESETS

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loader = build_loader(data, SPEC_PRESETS["seed"], backend="dali", batch_size=batch, device=device,
                          num_workers=cores(), decoder=DecoderOptions(hw_decoder_load=hw_decoder_load))
    it = iter(loader)
    next(it)
    sync()
    n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() < t0 + seconds:
        try:
            b = next(it)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
            it = iter(loader)
            continue
        n += len(b.labels)
    sync()
    wall, cpu_ms = time.perf_counter() - t0, 1000 * (time.process_time() - cpu0) / max(n, 1)
    return dict(batch=batch, hw_decoder_load=hw_decoder_load, images_per_s=round(n / wall, 1),
                host_cpu_ms_per_image=round(cpu_ms, 3), images_per_s_per_gpu_at_12_cores=round(12000 / cpu_ms),
                views="2x224 + 6x98", threads=cores())


def section_dali(args) -> None:
    if importable("nvidia.dali") is None:
        emit("dali", skipped="nvidia-dali not installed")
        return
    data, what = _dali_data()
    # hw_decoder_load: DALI's default share for the A100/H100 JPEG engines, then every JPEG on them
    for batch, load in ((64, 0.65), (256, 0.65), (256, 1.0)):
        emit("dali", data=what, **dali_figures(data, batch, load, 10 if not args.quick else 4))

    from pipelines.spec import SPEC_PRESETS
    from trainer import TrainConfig, run

    spec = SPEC_PRESETS["seed"]

    with tempfile.TemporaryDirectory() as out:
        steps = 30 if not args.quick else 10
        cfg = TrainConfig(arch="vit_s", preset="seed", data=data, backend="dali", out=out, batch_size=128,
                          steps=steps, log_every=steps // 3, image_every=0, ckpt_every=10**6, lr=5e-4,
                          spec=spec, proj_dim=128, hidden_dim=2048, num_slices=1024)
        summary = run(cfg)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(Path(out) / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        ips = [e.value for e in acc.Scalars("perf/images_per_s")][1:]  # the first window holds the warm-up
        wait = [e.value for e in acc.Scalars("perf/data_wait_frac")][1:]
        emit("dali_train", arch="vit_s", batch=128, status=summary["status"],
             images_per_s=round(statistics.median(ips), 1), data_wait_frac=round(statistics.median(wait), 4))


def section_pytest(args) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    emit("pytest", returncode=proc.returncode, summary=lines[-1] if lines else proc.stderr.strip()[-300:],
         failures=[ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20])


def markdown(results: list[dict]) -> str:
    rows = ["| section | figures |", "|---|---|"]
    for r in results:
        figures = ", ".join(f"{k}={v}" for k, v in r.items() if k != "section")
        rows.append(f"| {r['section']} | {figures} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="all sections' JSON records (default gpu_check.json)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="fewer repeats and archs (a smoke run)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    failed = 0
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            globals()[f"section_{name}"](args)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others' figures
            failed += 1
            emit(name, error=f"{type(e).__name__}: {e}"[:2000])
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"\nwrote {args.out}\n\n{markdown(RESULTS)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
