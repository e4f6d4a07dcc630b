"""One recipe, one sampler, every backend: for the same seed, the first batch from the torchvision reference,
DALI (its CPU graph) and FFCV (a .beton converted from the same JPEGs) holds the same images in the same
order with the same labels, and each view's pixels agree (per-view correlation), on real photos.

The views are the same because every backend renders the parameters of one sampler (pipelines/params.py);
what remains are the documented rendering differences, which set the bounds below:
- interpolation: torchvision resizes with PIL's antialiased bilinear filter, DALI with its antialiased
  linear filter, FFCV with OpenCV's INTER_AREA; FFCV also reads a re-encoded JPEG (quality 95);
- blur: DALI's window is 2*ceil(3 sigma)+1 and blurs the source crop before an upsampling resize
  (FFCV cuts its kernel at 4 sigma);
- colour: FFCV follows torchvision's float definitions (its kernels are tested pixel-wise in
  tests/test_ffcv.py). DALI pivots contrast on a fixed 128 instead of the view's mean grey, turns hue and
  saturation in a YIQ-like space, and applies brightness/contrast before hue/saturation whatever the
  drawn order (pipelines/dali_backend.py). Its pixels then differ from torchvision's by up to
  |1 - contrast| * |mean grey - 128| levels, which correlation forgives -- unless the view is also
  solarized: the shift moves pixels across the threshold, and which pixels invert differs. So a DALI view
  that is both jittered and solarized is held only to a median bound.
Measured here (16 imagenette160 photos, seed 7, both presets): torchvision vs FFCV, every view >= 0.98
(median 0.998); vs DALI, views not both jittered and solarized >= 0.977 (median 0.998), the jittered and
solarized ones down to 0.69 (0.30 seen on other photos; median 0.98).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from pipelines import SPEC_PRESETS, MultiCropSpec, build_loader
from pipelines.params import P_JITTER, P_SOLAR, sample_views
from pipelines.sources import epoch_batches, open_source

SEED, BATCH = 7, 16
AGREE = 0.95  # per-view correlation with the torchvision reference
AGREE_MEDIAN_JITTER_SOLARIZE = 0.9  # DALI, views both jittered and solarized (module docstring)


@pytest.fixture(scope="module")
def photos(imagenette, tmp_path_factory) -> Path:
    """48 real JPEGs in 3 classes (imagenette160/val: 160 px on the long side)."""
    root = tmp_path_factory.mktemp("photos")
    for cls in sorted((imagenette / "val").iterdir())[:3]:
        (root / cls.name).mkdir()
        for f in sorted(cls.glob("*.jpg"))[:16]:
            shutil.copy(f, root / cls.name / f.name)
    return root


@pytest.fixture(scope="module")
def beton(photos, tmp_path_factory) -> Path:
    """The same photos as a .beton, stored at their own size (160 px < --max-resolution 256), in source order."""
    from pipelines.convert_ffcv import convert

    out = tmp_path_factory.mktemp("beton") / "photos.beton"
    convert(str(photos), out, max_resolution=256, jpeg_quality=95, num_workers=2)
    return out


def pixels(views: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    """Normalised [B, V, 3, H, W] -> the [0, 1] pixels, float64."""
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(3, 1, 1)
    return views.double() * std + mean


def correlations(a, b, spec: MultiCropSpec) -> np.ndarray:
    """[B, V] Pearson correlation of each view's pixels in batch a with the same view in batch b."""
    out = []
    for va, vb in ((a.global_views, b.global_views), (a.local_views, b.local_views)):
        x, y = pixels(va, spec).flatten(2), pixels(vb, spec).flatten(2)
        x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
        out.append((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)))
    return torch.cat(out, 1).numpy()


@pytest.fixture(scope="module")
def reference(photos):
    """preset -> the torchvision reference's first batch (computed once per preset)."""
    batches = {}

    def get(preset: str):
        if preset not in batches:
            ld = build_loader(photos, SPEC_PRESETS[preset], backend="torchvision", batch_size=BATCH, device="cpu",
                              seed=SEED, num_workers=0)
            batches[preset] = next(iter(ld))
        return batches[preset]

    return get


@pytest.mark.parametrize("backend", [
    pytest.param("dali", marks=pytest.mark.dali),
    pytest.param("ffcv", marks=[pytest.mark.ffcv, pytest.mark.slow]),  # FFCV compiles its pipeline (~20-30 s)
])
@pytest.mark.parametrize("preset", ["cpu-small", "seed"])  # seed: crops upsampled (DALI's colour/blur-first paths)
def test_same_seed_same_views_as_the_reference(backend, preset, photos, reference, request):
    if not pipelines.available(backend):
        pytest.skip(f"{backend} is not installed")
    spec = SPEC_PRESETS[preset]
    source = open_source(photos)
    first = epoch_batches(len(source), BATCH, 0, 1, SEED, 0)[0]
    sizes = [Image.open(source.members[i]).size for i in first]  # (width, height)
    params = sample_views(spec, SEED, 0, first, [h for _, h in sizes], [w for w, _ in sizes])
    jitter_solarize = (params[..., P_JITTER] != 0) & (params[..., P_SOLAR] != 0)

    ref = reference(preset)
    assert ref.labels.tolist() == source.labels[first].tolist()
    src = request.getfixturevalue("beton") if backend == "ffcv" else photos  # converted only when needed
    ld = build_loader(src, spec, backend=backend, batch_size=BATCH, device="cpu",
                      seed=SEED, num_workers=2)
    batch = next(iter(ld))
    if backend == "ffcv":
        # the same samples in the same order: the .beton holds the photos in source order, at their size
        assert np.array_equal(ld.batch_indices, first)
        assert np.array_equal(ld.source.heights[first], [h for _, h in sizes])
        ld.close()
    assert torch.equal(batch.labels, ref.labels)
    assert batch.global_views.shape == ref.global_views.shape and batch.local_views.shape == ref.local_views.shape
    corr = correlations(batch, ref, spec)
    print(f"{backend} {preset}: per-view correlation with torchvision: min {corr.min():.3f}, "
          f"median {np.median(corr):.4f}; not jittered+solarized min {corr[~jitter_solarize].min():.3f}")
    if backend == "dali":  # the contrast pivot and solarize (module docstring)
        assert corr[~jitter_solarize].min() > AGREE, np.sort(corr[~jitter_solarize])[:5]
        assert jitter_solarize.any() and np.median(corr[jitter_solarize]) > AGREE_MEDIAN_JITTER_SOLARIZE, \
            corr[jitter_solarize]
    else:
        assert corr.min() > AGREE, np.sort(corr.ravel())[:5]
