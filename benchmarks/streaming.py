"""Streamed shards: start-up time against the number of shards, and read rate against the indexed source.

    python benchmarks/streaming.py --shards 10,100,1000,10000 [--repeats 3]
    python benchmarks/streaming.py --data '/tmp/shards/train-{000..049}.tar' --seconds 10 [--repeats 3]

Start-up (`--shards`): n shards of `--shard-samples` tiny samples are written to a temporary folder; the
time to the first sample is measured for the indexed source (`sources.open_source` reads every shard's
headers, then one sample) and for a `ShardStream` over the same shards read from the local disk, over
HTTP from a loopback `http.server`, and through `pipe:cat` (counts given, so no shard is counted first).
Read rate (`--data`, shards from pipelines/write_shards.py): encoded samples per second for one epoch
order, indexed (`Source.read` of `epoch_batches`' order: one seek per sample) against streamed (one
sequential read per shard, through the shuffle buffer); no decoding. Decoded multi-crop images/s through
a backend (the issue's >= 0.95x target) needs the backends' streaming integration.

One JSON line per result, a table appended to BENCHMARKS.md (unless --no-md), medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import functools
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
    t0 = time.perf_counter()
    make()
    return time.perf_counter() - t0


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

            modes = {"indexed (local)": indexed, "streamed local": streamed(str(root / name)),
                     "streamed http": streamed(f"{server.url}/{name}"),
                     "streamed pipe:cat": streamed(f"pipe:cat {root}/{name}")}
            times = {m: [] for m in modes}
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
    if args.data:
        rows = read_rate(args)
        if not args.no_md:
            append_rows("Streamed shards: encoded samples read per second", ["source", "samples", "samples/s", "ratio"],
                        rows, note="No decoding; indexed = one seek per sample in epoch order.")


if __name__ == "__main__":
    main()
