"""Streamed shards: start-up time against the number of shards, and read rates against the indexed source.

    python benchmarks/streaming.py --shards 10,100,1000,10000 [--repeats 3]
    python benchmarks/streaming.py --data '/tmp/shards/train-{000..049}.tar' --seconds 10 [--repeats 3]
    python benchmarks/streaming.py --data '/tmp/shards/train-{000..049}.tar' --loader [--preset seed] \
        [--seconds 30] [--workers 2]

Start-up (`--shards`): n shards of `--shard-samples` tiny samples are written to a temporary folder; the
time to the first sample is measured for the indexed source (`sources.open_source` reads every shard's
headers, then one sample) and for a `ShardStream` over the same shards read from the local disk, over
HTTP from a loopback `http.server`, and through `pipe:cat` (counts given, so no shard is counted first);
then the time to the first batch of the torchvision loader (`pipelines.build_loader`, workers started),
indexed against streamed (`--stream`).
Read rate (`--data`, shards from pipelines/write_shards.py): encoded samples per second for one epoch
order, indexed (`Source.read` of `epoch_batches`' order: one seek per sample) against streamed (one
sequential read per shard, through the shuffle buffer); no decoding.
Loader rate (`--data ... --loader`): source images per second of multi-crop batches (the `--preset`
recipe) through the torchvision reference, indexed against streamed on the same shards, the two loaders
alive side by side and timed in turns; the issue's target is streamed >= 0.95x indexed.

One JSON line per result, a table appended to BENCHMARKS.md (unless --no-md), medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import http.server
import io
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import append_rows, emit  # noqa: E402
from pipelines import SPEC_PRESETS, StreamOptions, build_loader  # noqa: E402
from pipelines.sources import epoch_batches, open_source  # noqa: E402
from pipelines.streaming import ShardStream, open_stream_source  # noqa: E402


def tiny_shards(root: Path, n: int, samples: int) -> str:
    """n shards of `samples` samples (a 16x16 JPEG + label), the same bytes in each."""
    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 140, 30)).save(jpeg, format="JPEG")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for k in range(samples):
            for ext, data in (("jpg", jpeg.getvalue()), ("cls", b"0")):
                info = tarfile.TarInfo(f"s{k:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        end = tf.offset
    shard = out.getvalue()[: end + 1024]  # without tar's record padding
    root.mkdir(parents=True)
    for k in range(n):
        (root / f"t-{k:06d}.tar").write_bytes(shard)
    return f"t-{{000000..{n - 1:06d}}}.tar"


class Server:
    """A loopback http.server over `root` in a thread."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def first_sample_s(make) -> float:
    """Seconds `make()` takes; a callable it returns (tear-down) runs after the clock stops."""
    t0 = time.perf_counter()
    cleanup = make()
    elapsed = time.perf_counter() - t0
    if callable(cleanup):
        cleanup()
    return elapsed


def startup(args) -> list[list]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.shards:
            root = Path(tmp) / str(n)
            name = tiny_shards(root, n, args.shard_samples)
            server = Server(root)

            def streamed(pattern):
                def run():
                    stream = ShardStream(pattern, batch_size=1, readers=args.readers, shuffle_buffer=args.buffer,
                                         samples_per_shard=args.shard_samples)
                    next(iter(stream))
                    stream.close()
                return run

            def indexed():
                source = open_source(str(root / name))
                source.read(0)

            def first_batch(stream: bool):
                def run():
                    options = StreamOptions(shuffle_buffer=args.buffer, readers=args.readers,
                                            samples_per_shard=args.shard_samples) if stream else None
                    loader = build_loader(str(root / name), SPEC_PRESETS[args.preset], backend=args.backend,
                                          batch_size=min(args.batch_size, n * args.shard_samples), device="cpu",
                                          num_workers=args.workers, stream=options)
                    next(iter(loader))

                    def cleanup():  # the workers exit now, not in a later loader's forked worker
                        nonlocal loader
                        if stream:
                            loader.close()
                        loader = None
                        gc.collect()
                    return cleanup
                return run

            modes = {"indexed (local)": indexed, "streamed local": streamed(str(root / name)),
                     "streamed http": streamed(f"{server.url}/{name}"),
                     "streamed pipe:cat": streamed(f"pipe:cat {root}/{name}"),
                     f"first batch, {args.backend} loader, indexed": first_batch(False),
                     f"first batch, {args.backend} loader, streamed": first_batch(True)}
            times = {m: [] for m in modes}
            if n == args.shards[0]:  # once, untimed: imports, numba's cached kernels, the first worker fork
                for fn in modes.values():
                    first_sample_s(fn)
            for _ in range(args.repeats):  # interleaved
                for m, fn in modes.items():
                    times[m].append(first_sample_s(fn))
            server.close()
            for m, ts in times.items():
                med = statistics.median(ts)
                emit({"bench": "stream_startup", "shards": n, "mode": m, "first_sample_s": med})
                rows.append([n, m, f"{med:.3f}"])
    return rows


def read_rate(args) -> list[list]:
    source = open_source(args.data)
    stream_source = open_stream_source(args.data)
    order = [int(i) for b in epoch_batches(len(source), args.batch_size, 0, 1, seed=0, epoch=0) for i in b]

    def indexed(seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for i in order:
                source.read(i)
                n += 1
                if n % 256 == 0 and time.perf_counter() - t0 >= seconds:
                    break
        return n / (time.perf_counter() - t0)

    def streamed(seconds: float) -> float:
        stream = ShardStream(stream_source, batch_size=args.batch_size, readers=args.readers,
                             shuffle_buffer=args.buffer)
        n, t0, epoch = 0, time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            stream.set_epoch(epoch)
            for _ in stream:
                n += 1
                if n % 256 == 0 and time.perf_counter() - t0 >= seconds:
                    break
            epoch += 1
        stream.close()
        return n / (time.perf_counter() - t0)

    rates = {"indexed": [], "streamed": []}
    for _ in range(args.repeats):
        rates["indexed"].append(indexed(args.seconds))
        rates["streamed"].append(streamed(args.seconds))
    ref = statistics.median(rates["indexed"])
    rows = []
    for m, rs in rates.items():
        med = statistics.median(rs)
        emit({"bench": "stream_read_rate", "mode": m, "samples_per_s": med, "ratio_to_indexed": med / ref})
        rows.append([m, len(source), f"{med:.0f}", f"{med / ref:.2f}"])
    return rows


def loader_rate(args) -> list[list]:
    """Images/s of `--backend` over the same shards, indexed and streamed, timed in turns."""
    spec = SPEC_PRESETS[args.preset]
    loaders = {mode: build_loader(args.data, spec, backend=args.backend, batch_size=args.batch_size, device="cpu",
                                  num_workers=args.workers, seed=0, stream=options)
               for mode, options in (("indexed", None),
                                     ("streamed", StreamOptions(shuffle_buffer=args.buffer, readers=args.readers)))}
    running = {mode: iter(loader) for mode, loader in loaders.items()}
    epochs = {mode: 0 for mode in loaders}

    def take(mode: str) -> None:
        try:
            next(running[mode])
        except StopIteration:
            epochs[mode] += 1
            loaders[mode].set_epoch(epochs[mode])
            running[mode] = iter(loaders[mode])
            next(running[mode])

    def timed(mode: str, seconds: float) -> float:
        for _ in range(2 * (args.workers or 1)):  # refill the workers' prefetch after the other loader's turn
            take(mode)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            take(mode)
            n += args.batch_size
        return n / (time.perf_counter() - t0)

    rates = {mode: [] for mode in loaders}
    for mode in loaders:
        take(mode)  # start the workers (and the stream) before timing
    for _ in range(args.repeats):
        for mode in loaders:
            rates[mode].append(timed(mode, args.seconds))
    for loader in loaders.values():
        if hasattr(loader, "close"):
            loader.close()
    ref = statistics.median(rates["indexed"])
    rows = []
    for mode, rs in rates.items():
        med = statistics.median(rs)
        emit({"bench": "stream_loader_rate", "mode": mode, "preset": args.preset, "workers": args.workers,
              "images_per_s": med, "ratio_to_indexed": med / ref})
        rows.append([mode, args.preset, args.workers, f"{med:.1f}", f"{med / ref:.3f}"])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="start-up: comma-separated shard counts, e.g. 10,100,1000,10000")
    ap.add_argument("--shard-samples", type=int, default=10, help="start-up: samples per shard")
    ap.add_argument("--data", default=None, help="read rate: a shard pattern written by pipelines/write_shards.py")
    ap.add_argument("--seconds", type=float, default=10.0, help="read rate: per run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--buffer", type=int, default=1000, help="shuffle buffer (samples)")
    ap.add_argument("--loader", action="store_true",
                    help="with --data: multi-crop images/s through the --backend loader, indexed vs streamed")
    ap.add_argument("--preset", default="seed", choices=sorted(SPEC_PRESETS), help="--loader and start-up: views")
    ap.add_argument("--workers", type=int, default=2, help="--loader and start-up: DataLoader workers")
    ap.add_argument("--backend", default="torchvision", choices=("torchvision", "dali"),
                    help="--loader and start-up: the backend that reads the shards")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-md", action="store_true", help="JSON lines only, no BENCHMARKS.md table")
    args = ap.parse_args(argv)
    if not args.shards and not args.data:
        ap.error("give --shards N,N,... and/or --data PATTERN")
    if args.shards:
        rows = startup(args)
        if not args.no_md:
            header = ["shards", "source", f"median of {args.repeats} s"]
            note = (f"Shards of {args.shard_samples} tiny samples on the local disk / a loopback http.server; "
                    f"readers {args.readers}, shuffle buffer {args.buffer} (the first sample waits for one buffer).")
            append_rows("Streamed shards: time to the first sample", header, rows, note=note)
    if args.data and args.loader:
        rows = loader_rate(args)
        if not args.no_md:
            append_rows(f"Streamed shards: {args.backend} loader images/s, indexed vs streamed",
                        ["source", "preset", "workers", "images/s", "ratio to indexed"], rows,
                        note=f"Same shards ({args.data}), batch {args.batch_size}, shuffle buffer {args.buffer}, "
                             f"readers {args.readers}; {args.seconds:g} s per turn, the two loaders in turns. "
                             "Target: streamed >= 0.95x indexed.")
    elif args.data:
        rows = read_rate(args)
        if not args.no_md:
            append_rows("Streamed shards: encoded samples read per second", ["source", "samples", "samples/s", "ratio"],
                        rows, note="No decoding; indexed = one seek per sample in epoch order.")


if __name__ == "__main__":
    main()
