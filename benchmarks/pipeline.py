"""Multi-crop input pipeline throughput: source images/s with every view delivered to the training device.

    python benchmarks/pipeline.py --data .cache/data/imagenette160/train --backends torchvision,dali \
        --seconds 20 --batch-size 64 --json pipeline.json [--repeats 3] [--preset seed] [--beton X.beton]

Backends run interleaved in one process (torchvision, dali, ... then again, `--repeats` times); each run
iterates the backend's loader (built once, epochs chained with `set_epoch`) for `--seconds` after one warm-up
batch per loader. Every run starts on idle cores and leaves the loader's look-ahead untimed: loaders stay
alive between runs, and each keeps preparing batches after its run ends (DataLoader workers x
prefetch_factor, DALI pipelines x their queue), on the cores of the next backend's run. Until 2026-12-01
that look-ahead was timed (torchvision's 4-6 CPU s ran inside each 20 s DALI run, and each run started with
its own prepared batches): DALI's ratio read ~1.4x lower than it is (BENCHMARKS.md).

Reported: median images/s, its ratio to torchvision measured in the same process, peak RSS (this process +
its worker processes) while that backend ran (all loaders stay alive for the
interleaving, so it is a process-wide peak, not one backend's footprint), a decode-only ceiling (the same
source decoded with the backend's decoder and threads, no augmentation) and, for DALI, the ceiling of its
one-thread Python feed. One JSON line per backend on
stdout, a JSON list in `--json`, a table appended to BENCHMARKS.md.

Adding a backend: register a loader factory in LOADERS (and optionally a decode-only function in
DECODE_ONLY); `ffcv` reads the `.beton` given by `--beton`.

    python benchmarks/pipeline.py --host-cost --data .cache/data/imagenette160/train --beton X.beton \
        [--host-batches 40] [--repeats 3] [--batch-size 64]

`--host-cost` measures instead the host CPU work per source image of the two GPU paths, with their own
code and this machine's CPU, as CPU time (all threads of the process; insensitive to other load, unlike
wall-clock): DALI `mixed` = the loader's feed (read, `check_encoded`, sampler, packing; the GPU decodes
and augments; nvJPEG's own host work is not in it: `make gpu-check` measures the whole on a GPU node);
FFCV with colour on the device = its decoder in uint8 mode (decode, crop + resize, flip) plus the host
part of the batch (sampler, colour-op plan). Each is turned into source images/s per GPU with 8, 12 and
16 cores per GPU (cores / ms per image), and a table is appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import append_rows, emit, machine  # noqa: E402
from pipelines import SPEC_PRESETS, available, build_loader  # noqa: E402
from pipelines.sources import open_source  # noqa: E402
from pipelines.threads import cpus_per_rank  # noqa: E402


# ---- loaders -----------------------------------------------------------------------------------------

def make_loader(backend: str, args, spec, device):
    source = args.beton if backend == "ffcv" else args.data
    if source is None:
        raise SystemExit(f"--backends {backend}: needs --beton PATH (a .beton made by pipelines/convert_ffcv.py)")
    return build_loader(source, spec, backend=backend, batch_size=args.batch_size, device=device,
                        num_workers=args.workers, seed=0)


LOADERS = {"torchvision": make_loader, "dali": make_loader, "ffcv": make_loader}


# ---- decode-only ceilings ----------------------------------------------------------------------------

class DecodeDataset(torch.utils.data.Dataset):
    """Sample i -> its decoded size (the decoded pixels stay in the worker: only decoding is measured)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        from pipelines.sources import decode_pil

        return torch.tensor(decode_pil(self.source.read(i)).size)


def decode_only_torchvision(args, device, seconds: float) -> float:
    """PIL decode (what the reference backend does per sample) in the same number of worker processes."""
    from torch.utils.data import DataLoader

    workers = args.workers if args.workers is not None else cpus_per_rank()
    context = "forkserver" if workers and "nvidia.dali" in sys.modules else None
    dl = DataLoader(DecodeDataset(open_source(args.data)), batch_size=args.batch_size, shuffle=True, drop_last=True,
                    num_workers=workers, multiprocessing_context=context, persistent_workers=bool(workers))
    return _rate(lambda: iter(dl), seconds, device)


def decode_only_dali(args, device, seconds: float) -> float:
    """DALI's decoder alone (mixed = nvJPEG on CUDA, CPU otherwise), fed the same bytes, same threads."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    source = open_source(args.data)
    rng = np.random.default_rng(0)
    threads = args.workers or cpus_per_rank()

    def feed(info):
        idx = rng.integers(0, len(source), args.batch_size)
        return [np.frombuffer(source.read(int(i)), np.uint8) for i in idx]

    @pipeline_def(batch_size=args.batch_size, num_threads=threads,
                  device_id=(device.index or 0) if device.type == "cuda" else None, exec_dynamic=True)
    def decode():
        enc = fn.external_source(source=feed, batch=True, batch_info=True)
        img = fn.decoders.image(enc, device="mixed" if device.type == "cuda" else "cpu", output_type=types.RGB)
        return img.shape()  # tiny output: the cost measured is decoding

    pipe = decode()
    pipe.build()

    def batches():
        while True:
            out = pipe.run()[0]
            yield out.as_tensor() if hasattr(out, "as_tensor") else out

    return _rate(batches, seconds, device)


def decode_only_ffcv(args, device, seconds: float) -> float:
    """FFCV's JPEG decoder on the same .beton, same threads: its CenterCropRGBImageDecoder to a 64-px
    crop (FFCV has no decode-only operation; the small crop + resize adds little to the full decode)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    threads = args.workers or cpus_per_rank()
    torch_threads = torch.get_num_threads()  # FFCV sets torch's thread count as it builds
    loader = Loader(args.beton, batch_size=args.batch_size, num_workers=threads, order=OrderOption.RANDOM,
                    drop_last=True, os_cache=True,
                    pipelines={"image": [CenterCropRGBImageDecoder((64, 64), 1.0)], "label": [IntDecoder()]})
    torch.set_num_threads(torch_threads)
    return _rate(lambda: iter(loader), seconds, device)


DECODE_ONLY = {"torchvision": decode_only_torchvision, "dali": decode_only_dali, "ffcv": decode_only_ffcv}


def dali_feed(args, spec):
    """The DALI loader's feed alone (pipelines/dali_backend.Feed: read, check_encoded, sampler, packing), epochs
    chained, one prepared batch per `next`: the host's share of the GPU path, without DALI itself."""
    from pipelines.dali_backend import DaliLoader, Feed, indexed_steps

    loader = DaliLoader(args.data, spec, args.batch_size, torch.device("cpu"))  # its pipeline is never built
    for epoch in itertools.count():
        feed = Feed(indexed_steps(loader.source, loader.epoch_batches(epoch), 0, loader.bad_files.add), spec,
                    loader.seed, epoch)
        take = feed.source(0)
        try:
            while True:
                yield take()
        except StopIteration:
            pass


def feed_only_dali(args, device, seconds: float) -> float:
    """The most images/s one DALI loader can be fed (its feed thread, the other cores idle), whatever the device."""
    return _rate(lambda: dali_feed(args, SPEC_PRESETS[args.preset]), seconds, device)


FEED_ONLY = {"dali": feed_only_dali}


def _rate(make_iter, seconds: float, device) -> float:
    it = make_iter()
    next(it)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            next(it)
        except StopIteration:
            it = make_iter()
            continue
        n += 1
    return n / (time.perf_counter() - start)  # batches/s; the caller scales by the batch size


# ---- host cost of the GPU paths ------------------------------------------------------------------------

def ffcv_host(args, spec):
    """FFCV's GPU path up to the device: the decoder in uint8 mode (decode, crop + resize, flip, in FFCV's
    numba threads) and the host part of each batch (the sampler's parameters, the colour-op plans)."""
    from pipelines.ffcv_gpu import plan_group
    from pipelines.params import NUM_PARAMS

    loader = build_loader(args.beton, spec, backend="ffcv", batch_size=args.batch_size, device="cpu",
                          num_workers=args.workers, colour_ops="torch")
    g = spec.global_views
    while True:  # each pass moves the loader to the next epoch
        for _, _, label_keys in loader.raw_batches():
            drawn = loader.drawn_params(label_keys)
            plan_group(drawn[:, :g].reshape(-1, NUM_PARAMS))
            plan_group(drawn[:, g:].reshape(-1, NUM_PARAMS))
            yield


HOST_COST = {"dali": ("DALI mixed: feed (read, check_encoded, sampler, packing)", "data", dali_feed),
             "ffcv": ("FFCV, colour on the device: uint8 decoder + sampler + colour plan", "beton", ffcv_host)}
CORES_PER_GPU = (8, 12, 16)


def cpu_ms_per_image(batches, n: int, batch_size: int) -> float:
    """CPU time of this process (every thread) per source image over `n` batches, after one warm-up batch."""
    next(batches)
    start = time.process_time()
    for _ in range(n):
        next(batches)
    return 1000 * (time.process_time() - start) / (n * batch_size)


def host_cost(args) -> list[dict]:
    spec = SPEC_PRESETS[args.preset]
    paths = [b for b in ("dali", "ffcv") if getattr(args, HOST_COST[b][1]) is not None]
    if not paths:
        raise SystemExit("--host-cost: give --data (DALI feed) and/or --beton (FFCV decoder)")
    torch.set_num_threads(1)
    runs = {b: [] for b in paths}
    iters = {b: HOST_COST[b][2](args, spec) for b in paths}
    for r in range(args.repeats):  # interleaved, as the throughput runs
        for b in paths:
            runs[b].append(cpu_ms_per_image(iters[b], args.host_batches, args.batch_size))
            print(f"# run {r + 1}/{args.repeats} {b}: {runs[b][-1]:.3f} CPU ms per image", file=sys.stderr, flush=True)
    results = []
    for b in paths:
        ms = statistics.median(runs[b])
        rec = {"host_cost": b, "what": HOST_COST[b][0], "cpu_ms_per_image": round(ms, 4),
               "runs": [round(x, 4) for x in runs[b]],
               **{f"images_per_s_per_gpu_at_{c}_cores": round(1000 * c / ms) for c in CORES_PER_GPU},
               "preset": args.preset, "batch_size": args.batch_size, "data": getattr(args, HOST_COST[b][1]),
               "machine": machine()}
        emit(rec)
        results.append(rec)
    if not args.no_md:
        append_rows(
            f"Host CPU cost per source image of the GPU paths ({args.preset}, batch {args.batch_size})",
            ["path", "data", "CPU ms per image (runs)"] + [f"img/s per GPU at {c} cores" for c in CORES_PER_GPU],
            [[r["what"], Path(r["data"]).name, f"{r['cpu_ms_per_image']} ({', '.join(map(str, r['runs']))})"]
             + [r[f"images_per_s_per_gpu_at_{c}_cores"] for c in CORES_PER_GPU] for r in results],
            note=f"CPU time of all threads over {args.host_batches} batches, median of {args.repeats} interleaved "
                 "runs; img/s per GPU = cores / (ms per image), every core on this work. Target: 10,000 img/s "
                 "per GPU (under 1.2 ms of one core per image at 12 cores per GPU).",
        )
    return results


# ---- measurement -------------------------------------------------------------------------------------

class PeakRSS:
    """Peak resident memory of this process plus its children (DataLoader workers), sampled every 0.1 s."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def sample(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:  # a worker may exit between listing and reading
                pass
        return total

    def __enter__(self):
        self.peak = self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.sample())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


def tree_cpu_seconds() -> float:
    """CPU time so far of this process and its children (DataLoader workers)."""
    import psutil

    total = 0.0
    for p in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except Exception:  # a worker may exit between listing and reading
            pass
    return total


def wait_idle(window: float = 0.5, busy: float = 0.1, limit: float = 60.0) -> float:
    """Wait until the process tree uses under `busy` cores over a `window`: the loaders that ran before are
    done with their look-ahead, which would otherwise run on the cores of the run being timed. Returns the
    CPU seconds spent meanwhile (that look-ahead)."""
    start, end = tree_cpu_seconds(), time.perf_counter() + limit
    before = start
    while time.perf_counter() < end:
        time.sleep(window)
        now = tree_cpu_seconds()
        if now - before < busy * window:
            return now - start
        before = now
    return tree_cpu_seconds() - start


def next_batch(state: dict):
    """The loader's next batch, chaining epochs as a trainer would."""
    while (batch := next(state["it"], None)) is None:
        state["epoch"] += 1
        state["loader"].set_epoch(state["epoch"])
        state["it"] = iter(state["loader"])
    return batch


def timed_run(state: dict, seconds: float, device, skip: int) -> float:
    """Images/s of one run: iterate for `seconds`, every batch already on `device`, after taking `skip` batches
    untimed (those the loader prepared while it waited: DataLoader workers x prefetch_factor, DALI pipelines x
    their queue; counting them would credit the run with work done before its clock started)."""
    for _ in range(skip):
        next_batch(state)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += next_batch(state).labels.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="ImageFolder dir or webdataset tar(s) (torchvision, dali)")
    ap.add_argument("--beton", help="FFCV .beton of the same images (ffcv)")
    ap.add_argument("--backends", default="torchvision,dali")
    ap.add_argument("--seconds", type=float, default=20.0, help="per run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="seed", choices=sorted(SPEC_PRESETS))
    ap.add_argument("--workers", type=int, default=None, help="workers / threads per backend (default: cores)")
    ap.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    ap.add_argument("--decode-seconds", type=float, default=None, help="decode-only run length (default --seconds/2)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-md", action="store_true", help="do not append to BENCHMARKS.md (smoke runs)")
    ap.add_argument("--host-cost", action="store_true",
                    help="measure the host CPU cost per image of the GPU paths instead (module docstring)")
    ap.add_argument("--host-batches", type=int, default=40, help="--host-cost: batches per run")
    args = ap.parse_args(argv)
    if args.host_cost:
        return host_cost(args)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in LOADERS:
            ap.error(f"--backends: unknown {b!r}; known: {', '.join(LOADERS)}")
        if not available(b):
            ap.error(f"--backends: {b!r} is not installed")
    if args.data is None and any(b != "ffcv" for b in backends):
        ap.error("--data is required for " + ", ".join(b for b in backends if b != "ffcv"))
    if args.data is not None:
        open_source(args.data)  # clear error naming the path before any work
    torch.set_num_threads(1)  # the loaders own the cores; the consumer only counts
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = SPEC_PRESETS[args.preset]

    states, rates, peaks = {}, {b: [] for b in backends}, {b: 0 for b in backends}
    for b in backends:
        loader = LOADERS[b](b, args, spec, device)
        it = iter(loader)
        next(it)  # warm-up: pipeline build, worker start, JIT
        states[b] = {"loader": loader, "it": it, "epoch": 0}
    # Every run starts on idle cores (the previous backend's look-ahead finished, `wait_idle`) and leaves its own
    # look-ahead untimed (`skip` batches, enough for either backend's at this core count).
    skip = 2 * (args.workers or cpus_per_rank()) + 2
    for r in range(args.repeats):
        for b in backends:
            leftover = wait_idle()
            with PeakRSS() as rss:
                rates[b].append(timed_run(states[b], args.seconds, device, skip))
            peaks[b] = max(peaks[b], rss.peak)
            print(f"# run {r + 1}/{args.repeats} {b}: {rates[b][-1]:.1f} images/s (waited for {leftover:.1f} CPU s "
                  "of look-ahead before it)", file=sys.stderr, flush=True)
    decode, feed = {}, {}
    for b in backends:
        states.pop(b)  # free the augmenting loader (and its workers) first
        short = args.decode_seconds or args.seconds / 2
        fn = DECODE_ONLY.get(b)
        decode[b] = fn(args, device, short) * args.batch_size if fn else None
        fn = FEED_ONLY.get(b)
        feed[b] = fn(args, device, short) * args.batch_size if fn else None

    ref = statistics.median(rates["torchvision"]) if "torchvision" in rates else None
    results = []
    for b in backends:
        med = statistics.median(rates[b])
        rec = {
            "backend": b, "images_per_s": round(med, 1), "runs": [round(x, 1) for x in rates[b]],
            "ratio_to_torchvision": round(med / ref, 2) if ref else None,
            "peak_rss_mb": round(peaks[b] / 2**20), "decode_only_images_per_s": round(decode[b], 1) if decode[b] else None,
            "feed_only_images_per_s": round(feed[b], 1) if feed[b] else None,
            "preset": args.preset, "batch_size": args.batch_size, "device": str(device), "seconds": args.seconds,
            "data": args.beton if b == "ffcv" else args.data, "machine": machine(),
        }
        emit(rec)
        results.append(rec)
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.json)
    if not args.no_md:
        images = ", ".join(f"{Path(r['data']).name} ({len(open_source(r['data'])) if r['backend'] != 'ffcv' else 'beton'})"
                           for r in results[:1])
        append_rows(
            f"Multi-crop pipeline ({args.preset}, batch {args.batch_size}, {device})",
            ["backend", "images", "median images/s (runs)", "ratio to torchvision", "decode-only images/s",
             "Python feed images/s", "peak RSS MB"],
            [[r["backend"], images, f"{r['images_per_s']} ({', '.join(map(str, r['runs']))})",
              r["ratio_to_torchvision"], r["decode_only_images_per_s"], r["feed_only_images_per_s"] or "—",
              r["peak_rss_mb"]] for r in results],
            note=f"{args.repeats} interleaved runs of {args.seconds:g} s per backend; source images/s with all "
                 f"{spec.num_views} views delivered to {device}.",
        )
    return results


if __name__ == "__main__":
    main()
