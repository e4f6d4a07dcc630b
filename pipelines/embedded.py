"""The embedded default dataset: a balanced subset of Debian's `dataset-fashion-mnist` as a JPEG ImageFolder.

`apt install dataset-fashion-mnist` (done by `make install`) ships the 70,000 labelled 28x28 images as IDX
files in /usr/share/datasets/fashion-mnist/. `materialise()` writes the first `per_class` train and
`test_per_class` test images of every class as `ROOT/{train,test}/<class>/<index>.jpg`, once: it builds in
a temp dir beside ROOT and renames it into place, so a crash or a concurrent run never sees half a tree.

    python -m pipelines.embedded      # prints ROOT
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    got, n = struct.unpack(">II", data[:8])
    if got != magic:
        raise ValueError(f"{path}: not an IDX file with magic {magic} (got {got})")
    if magic == 2051:  # images: n x rows x cols uint8
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    return np.frombuffer(data, np.uint8, offset=8)  # labels


def default_root(per_class: int, test_per_class: int) -> Path:
    base = os.environ.get("LEJEPA_EMBEDDED_ROOT")
    if base:
        return Path(base)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "lejepa-throughput" / f"fashion-mnist-{per_class}-{test_per_class}"


def materialise(root: str | Path | None = None, per_class: int = 500, test_per_class: int = 200,
                source_dir: str | Path = DEBIAN_DIR) -> Path:
    """Return ROOT holding `train/` (per_class x 10) and `test/` (test_per_class x 10), writing it if absent."""
    root = Path(root) if root is not None else default_root(per_class, test_per_class)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    source_dir = Path(source_dir)
    missing = [name for pair in FILES.values() for name in pair if not (source_dir / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"embedded dataset: {source_dir} lacks {missing}; install the Debian package "
            "`dataset-fashion-mnist` (`make install` does) or pass --data"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for split, count in (("train", per_class), ("test", test_per_class)):
            images = _read_idx(source_dir / FILES[split][0], 2051)
            labels = _read_idx(source_dir / FILES[split][1], 2049)
            for c, name in enumerate(CLASSES):
                (tmp / split / name).mkdir(parents=True)
                idx = np.flatnonzero(labels == c)[:count]
                if len(idx) < count:
                    raise ValueError(f"embedded dataset: only {len(idx)} {split} images of class {name}")
                for i in idx:
                    Image.fromarray(images[i], mode="L").save(tmp / split / name / f"{i:05d}.jpg", quality=95)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep theirs
            if not (root / "train").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


if __name__ == "__main__":
    print(materialise())
