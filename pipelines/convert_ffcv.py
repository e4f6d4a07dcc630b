"""Convert an image dataset to an FFCV `.beton` (fields: `image` RGBImageField as JPEG, `label` IntField).

    python pipelines/convert_ffcv.py SRC OUT.beton [--max-resolution 256] [--jpeg-quality 90]
                                     [--num-workers N] [--split train]
    python pipelines/convert_ffcv.py --dataset Flowers102 --root DIR OUT.beton [--split train]

SRC is an ImageFolder tree (SRC/<class>/*.jpg, or SRC/<split>/<class>/*.jpg), a webdataset tar shard, a
folder of shards or a brace pattern (pipelines/sources.py). `--dataset NAME --root DIR` reads a
torchvision dataset class from its local root (download=False).

Every image is fully decoded first: FFCV's writer does not skip bad inputs (its worker dies on a text
file named .jpg and the main process then spins forever), so broken files are reported and left out
here. The writer runs in its own process (its threads/pools never meet a later training process) and
writes a temporary file in the output folder, renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/convert_ffcv.py` from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from common.io import fsync_dir  # noqa: E402
from pipelines.sources import BadImage, decode_rgb, open_source, worker_start_method  # noqa: E402
from pipelines.threads import cpus_per_rank  # noqa: E402


class TorchvisionSource:
    """A torchvision dataset class read from a local root, with the (name, read, label) face of `Source`."""

    def __init__(self, name: str, root: str, split: str):
        import inspect

        import torchvision.datasets as tvd

        cls = getattr(tvd, name, None)
        if not isinstance(cls, type):
            valid = sorted(n for n in dir(tvd) if n[0].isupper() and isinstance(getattr(tvd, n), type))
            raise ValueError(f"--dataset {name!r} is not a torchvision dataset class; e.g. {valid[:12]}")
        if not Path(root).is_dir():
            raise ValueError(f"--root {root!r} (for --dataset {name}) is not a directory")
        params = inspect.signature(cls).parameters
        kw = {"download": False} if "download" in params else {}
        if "split" in params:
            kw["split"] = split
        elif "train" in params:
            kw["train"] = split == "train"
        try:
            self.dataset = cls(root, **kw)
        except Exception as e:
            raise ValueError(f"--dataset {name} --root {root!r}: cannot open it locally ({type(e).__name__}: {e})") from e
        self.root, self.kind = f"{name}:{root}", "torchvision"
        classes = getattr(self.dataset, "classes", None)
        self.classes = list(classes) if classes is not None else []

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, i: int) -> str:
        return f"{self.root}[{i}]"

    def load(self, i: int) -> tuple[np.ndarray, int]:
        try:
            img, label = self.dataset[i]
            return np.array(img.convert("RGB")), int(label)
        except Exception as e:
            raise BadImage(f"{self.name(i)}: {type(e).__name__}: {e}") from e


def load_item(source, i: int) -> tuple[np.ndarray, int]:
    """Fully decoded RGB uint8 HWC image + label of item `i`; BadImage when it cannot be decoded."""
    if isinstance(source, TorchvisionSource):
        return source.load(i)
    rgb = decode_rgb(source.read(i), source.name(i))
    if rgb.shape[0] > 65535 or rgb.shape[1] > 65535:  # FFCV stores sizes as uint16
        raise BadImage(f"{source.name(i)}: {rgb.shape[1]}x{rgb.shape[0]} px is too large for FFCV")
    return rgb, int(source.labels[i])


def open_any(src: str | None, dataset: str | None, root: str | None, split: str):
    """The source object for the CLI arguments; ValueError naming the bad argument."""
    if dataset:
        if root is None:
            raise ValueError(f"--dataset {dataset} needs --root DIR (the dataset's local folder)")
        return TorchvisionSource(dataset, root, split)
    if src is None:
        raise ValueError("give SRC (ImageFolder / webdataset shards) or --dataset NAME --root DIR")
    path = Path(src)
    if split and (path / split).is_dir():
        path = path / split
    return open_source(path)


# ---- validation (a pool of forked workers) ---------------------------------------------------------
_SOURCE = None


def _init_worker(source) -> None:
    global _SOURCE
    _SOURCE = source


def _check(i: int) -> tuple[int, int, str | None]:
    """(index, label, None) when the image decodes, (index, -1, reason) otherwise."""
    try:
        _, label = load_item(_SOURCE, i)
        return i, label, None
    except BadImage as e:
        return i, -1, str(e)
    except Exception as e:  # anything else the decoder throws is a bad file too, not a crash
        return i, -1, f"{_SOURCE.name(i)}: {type(e).__name__}: {e}"


def validate(source, num_workers: int) -> tuple[list[int], list[tuple[str, str]]]:
    """Decode every image; return the good indices (in source order) and (name, reason) of the bad."""
    from tqdm import tqdm

    good, bad = [], []
    ctx = mp.get_context(worker_start_method() or "fork")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(source,)) as pool:
        results = pool.imap_unordered(_check, range(len(source)), chunksize=32)
        for i, _, reason in tqdm(results, total=len(source), unit="img", desc="validate", smoothing=0.1):
            (good.append(i) if reason is None else bad.append((source.name(i), reason)))
    return sorted(good), bad


# ---- the FFCV writer (its own process) ------------------------------------------------------------
class _WriterDataset:
    """What FFCV's writer indexes: item k -> (RGB uint8 HWC, label) of the k-th validated image."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        try:
            return load_item(self.source, self.indices[k])
        except Exception as e:
            # A worker that dies makes FFCV's writer spin forever: fail the whole writer process instead.
            print(f"convert_ffcv: {self.source.name(self.indices[k])} became unreadable after validation: {e}",
                  file=sys.stderr, flush=True)
            os.kill(os.getppid(), signal.SIGTERM)
            raise


def _write(tmp_path: str, source, indices: list[int], max_resolution: int, jpeg_quality: int,
           num_workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    # This process was spawned, so its default start method is spawn too: FFCV's workers would each
    # re-import torch and ffcv (~10 s). This fresh process has no threads, so forking them is safe.
    mp.set_start_method("fork", force=True)

    fields = {"image": RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality),
              "label": IntField()}
    writer = DatasetWriter(tmp_path, fields, num_workers=num_workers)
    writer.from_indexed_dataset(_WriterDataset(source, indices), chunksize=64)


def convert(src: str | None, out: str | os.PathLike, max_resolution: int = 256, jpeg_quality: int = 90,
            num_workers: int | None = None, split: str = "train", dataset: str | None = None,
            root: str | None = None) -> dict:
    """Validate, write and atomically publish `out`; returns the report (also printed by the CLI)."""
    out = Path(out)
    if out.suffix != ".beton":
        raise ValueError(f"output {str(out)!r} must end in .beton")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {str(out.parent)!r} does not exist")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality {jpeg_quality} must be in [1, 100]")
    if max_resolution < 8:
        raise ValueError(f"--max-resolution {max_resolution} must be >= 8")
    num_workers = num_workers or cpus_per_rank()
    source = open_any(src, dataset, root, split)

    t0 = time.perf_counter()
    good, bad = validate(source, num_workers)
    t_validate = time.perf_counter() - t0
    if not good:
        raise ValueError(f"source {source.root!r}: none of its {len(source)} images could be decoded")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        t1 = time.perf_counter()
        proc = mp.get_context("spawn").Process(
            target=_write, args=(str(tmp), source, good, max_resolution, jpeg_quality, num_workers))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"FFCV writer for {str(out)!r} failed (exit code {proc.exitcode}); see its output above")
        with open(tmp, "rb+") as f:  # FFCV's writer (another process) wrote it: make it durable, then publish
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
        t_write = time.perf_counter() - t1
    finally:
        tmp.unlink(missing_ok=True)

    labels = np.asarray([source.labels[i] for i in good]) if hasattr(source, "labels") else None
    n_classes = len(source.classes) or (int(labels.max()) + 1 if labels is not None else 0)
    return {
        "output": str(out), "source": source.root, "images_written": len(good), "skipped": len(bad),
        "skipped_files": [{"file": name, "reason": why} for name, why in bad], "classes": n_classes,
        "max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "bytes": out.stat().st_size,
        "validate_s": round(t_validate, 2), "write_s": round(t_write, 2),
        "images_per_s": round(len(good) / (time.perf_counter() - t0), 1),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="SRC OUT.beton", help="source (omit with --dataset) and output")
    ap.add_argument("--max-resolution", type=int, default=256, help="longest side stored (px)")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--num-workers", type=int, default=None, help="processes (default: the CPUs this process may use)")
    ap.add_argument("--split", default="train", help="SRC/<split> if it exists; the torchvision split")
    ap.add_argument("--dataset", default=None, help="torchvision dataset class, e.g. Flowers102")
    ap.add_argument("--root", default=None, help="local root of --dataset (never downloaded)")
    args = ap.parse_args(argv)
    want = 1 if args.dataset else 2
    if len(args.paths) != want:
        ap.error("expected OUT.beton with --dataset" if args.dataset else "expected SRC OUT.beton")
    src, out = (None, args.paths[0]) if args.dataset else args.paths
    try:
        report = convert(src, out, args.max_resolution, args.jpeg_quality, args.num_workers, args.split,
                         args.dataset, args.root)
    except ValueError as e:
        ap.exit(2, f"convert_ffcv: error: {e}\n")
    for item in report["skipped_files"]:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    summary = {k: v for k, v in report.items() if k != "skipped_files"}
    print(json.dumps(summary))
    print(f"wrote {report['images_written']} images ({report['classes']} classes) to {report['output']}; "
          f"skipped {report['skipped']} unreadable file(s)", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
