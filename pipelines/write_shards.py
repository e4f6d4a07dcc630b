"""Write an ImageFolder as webdataset tar shards (`KEY.jpg` + `KEY.cls`) plus their index file.

    python pipelines/write_shards.py SRC OUT_PATTERN [--max-size 1GB] [--max-count N] [--seed 0]

SRC is an ImageFolder tree (SRC/<class>/*.jpg); the label is the class's index among the sorted class
folders, as when SRC is read directly. OUT_PATTERN names the shards with a printf field, e.g.
`/data/shards/train-%06d.tar`. A shard is closed before it would exceed `--max-size` (it holds at least
one sample) or `--max-count` samples. Samples are written in a seeded random order so that every shard
holds a mix of classes: a streaming reader's shuffle buffer then only has to mix a few shards.

Each shard is written to a temporary name, fsynced and renamed when complete; the index
(`<dir>/<prefix>.index.json`, e.g. `train.index.json`: samples and bytes of every shard, class names)
is written last, the same way. Readers of the shards (pipelines/streaming.py) find it beside them and
take the epoch length from it. The brace pattern that reads the shards back is printed at the end.
Image bytes are copied as they are (no re-encoding); an unreadable file is reported and left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, not pipelines/, goes on sys.path
    # (pipelines/ holds modules such as inspect.py that would shadow the standard library's)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import io
import json
import os
import re
import tarfile

import numpy as np
from tqdm import tqdm

from pipelines.sources import open_source  # noqa: E402
from pipelines.streaming import INDEX_FORMAT, index_name  # noqa: E402

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29, '1e6' -> 10**6 (bytes)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--max-size {text!r}: expected a size such as 1GB, 500MB, 64MiB or 1e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _split_pattern(out_pattern: str) -> tuple[str, str, int]:
    """'dir/train-%06d.tar' -> ('dir/train-', '.tar', 6)."""
    m = re.fullmatch(r"(.*?)%(0?\d*)d(.*)", out_pattern)
    if not m or "%" in m.group(1) + m.group(3) or "/" in m.group(3):
        raise ValueError(f"OUT_PATTERN {out_pattern!r}: needs one printf field in the file name, "
                         f"e.g. /data/shards/train-%06d.tar")
    return m.group(1), m.group(3), int(m.group(2) or 0)


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: the same input gives the same bytes
    return info, io.BytesIO(data)


def _tar_size(n: int) -> int:
    return 512 + -(-n // 512) * 512  # header + data padded to the block size


def _final_size(n: int) -> int:
    """Size of a closed tar whose members take n bytes: + end-of-archive blocks, padded to a record."""
    return -(-(n + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardFile:
    """One shard being written under a temporary name; `commit` fsyncs and renames it into place."""

    def __init__(self, path: str):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.GNU_FORMAT)
        self.samples = 0

    def add(self, key: str, ext: str, image: bytes, label: int) -> None:
        self.tar.addfile(*_member(f"{key}.{ext}", image))
        self.tar.addfile(*_member(f"{key}.cls", str(label).encode()))
        self.samples += 1

    def commit(self) -> int:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        size = self.file.tell()
        self.file.close()
        os.replace(self.tmp, self.path)
        return size

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shards(src: str | os.PathLike, out_pattern: str, max_size: int = 10**9, max_count: int | None = None,
                 seed: int = 0, progress: bool = True) -> dict:
    """Write ImageFolder `src` as shards named by `out_pattern`; returns the index (plus `pattern`, the
    brace pattern of the shards, `index` its path and `skipped`, the unreadable files with reasons)."""
    head, tail, width = _split_pattern(str(out_pattern))
    if max_size < 1 or (max_count is not None and max_count < 1):
        raise ValueError(f"--max-size {max_size} and --max-count {max_count} must be >= 1")
    source = open_source(src)
    if source.kind != "folder":
        raise ValueError(f"SRC {str(src)!r} is already webdataset shards; give an ImageFolder (SRC/<class>/<image>)")
    out_dir = Path(head).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(source))
    shards, skipped, used_keys = [], [], set()
    shard: _ShardFile | None = None

    def close_shard() -> None:
        nonlocal shard
        size = shard.commit()
        shards.append({"name": Path(shard.path).name, "samples": shard.samples, "bytes": size})
        shard = None

    try:
        for i in tqdm(order, desc=f"write {Path(head).name}*{tail}", unit="img", disable=not progress):
            path = Path(source.members[i])
            try:
                image = path.read_bytes()
            except OSError as e:
                skipped.append({"file": str(path), "reason": e.strerror or str(e)})
                continue
            if not image:
                skipped.append({"file": str(path), "reason": "zero-byte file"})
                continue
            label = int(source.labels[i])
            # key: the class folder + the file stem without dots (a dot would end a webdataset key)
            key = f"{source.classes[label]}/{path.stem.replace('.', '_')}"
            if key in used_keys:
                key = f"{key}_{i}"
            used_keys.add(key)
            ext = path.suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            need = _tar_size(len(image)) + _tar_size(len(str(label)))
            if shard is not None and shard.samples and (
                    _final_size(shard.file.tell() + need) > max_size
                    or (max_count is not None and shard.samples >= max_count)):
                close_shard()
            if shard is None:
                shard = _ShardFile(f"{head}{len(shards):0{width}d}{tail}")
            shard.add(key, ext, image, label)
        if shard is not None and shard.samples:
            close_shard()
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    if not shards:
        raise ValueError(f"SRC {str(src)!r}: no readable image to write ({len(skipped)} unreadable)")
    last = len(shards) - 1
    pattern = f"{head}{{{0:0{width}d}..{last:0{width}d}}}{tail}"
    index = {"format": INDEX_FORMAT, "pattern": Path(pattern).name, "classes": list(source.classes),
             "num_samples": sum(s["samples"] for s in shards), "shards": shards}
    index_path = out_dir / index_name(Path(head).name)
    _atomic_write(index_path, json.dumps(index, separators=(",", ":")).encode())
    dir_fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames themselves survive a crash
    finally:
        os.close(dir_fd)
    return dict(index, pattern=pattern, index=str(index_path), skipped=skipped)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", metavar="SRC", help="ImageFolder tree (SRC/<class>/<image>)")
    ap.add_argument("out_pattern", metavar="OUT_PATTERN", help="shard names, e.g. /data/shards/train-%%06d.tar")
    ap.add_argument("--max-size", default="1GB", help="largest shard (default 1GB; also MB, MiB, plain bytes)")
    ap.add_argument("--max-count", type=int, default=None, help="most samples per shard")
    ap.add_argument("--seed", type=int, default=0, help="of the order in which samples are written")
    args = ap.parse_args(argv)
    try:
        report = write_shards(args.src, args.out_pattern, parse_size(args.max_size), args.max_count, args.seed)
    except ValueError as e:
        ap.exit(2, f"write_shards: error: {e}\n")
    for item in report["skipped"]:
        print(f"skipped {item['file']}: {item['reason']}", file=sys.stderr)
    print(f"wrote {report['num_samples']} samples ({len(report['classes'])} classes) in {len(report['shards'])} "
          f"shard(s); skipped {len(report['skipped'])} unreadable file(s); index {report['index']}", file=sys.stderr)
    print(report["pattern"])
    return report


if __name__ == "__main__":
    main()
