"""Shared fixtures: the real image sets from ../shared/data, extracted once into a git-ignored cache."""

from __future__ import annotations

import fcntl
import os
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LEJEPA_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = REPO / ".cache" / "data"


def extract(name: str) -> Path:
    """Extract ../shared/data/<name>.tar into .cache/data/<name>/ once (safe across xdist/processes)."""
    tar = SHARED_DATA / f"{name}.tar"
    root = CACHE / name
    done = CACHE / f".{name}.done"
    if done.exists():
        return root
    if not tar.exists():
        pytest.fail(f"test data {tar} not found: the tests need ../shared/data beside the repository")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            with tarfile.open(tar) as tf:
                tf.extractall(CACHE, filter="data")
            done.touch()
    return root


@pytest.fixture(scope="session")
def imagenette() -> Path:
    """imagenette160/{train,val}/<wnid>/*.jpg: 10 classes, 500 train + 100 val each."""
    return extract("imagenette160")


@pytest.fixture(scope="session")
def dtd10() -> Path:
    """dtd10/{train,test}/<texture>/*.jpg: 10 classes, 80 train + 40 test each."""
    return extract("dtd10")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; none on this machine (the CPU path is tested instead)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
