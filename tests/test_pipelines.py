"""Multi-crop pipelines on real JPEGs (imagenette160): DALI (its CPU graph; the GPU graph needs CUDA) and the
torchvision reference. Statistical checks use a 4-sigma binomial tolerance."""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as F

import pipelines
from pipelines import SPEC_PRESETS, MultiCropSpec, build_loader
from pipelines.params import (
    NUM_PARAMS, P_BRIGHT, P_CONTRAST, P_FLIP, P_H, P_HUE, P_JITTER, P_SAT, P_SIGMA, P_SOLAR, P_W, P_X, P_Y,
    sample_views,
)
from pipelines.sources import check_encoded, decode_rgb, epoch_batches, open_source

torch.set_num_threads(1)  # several OpenMP threads on 2 busy cores slow small convs down 40x
SMALL = SPEC_PRESETS["cpu-small"]
BACKENDS = [pytest.param("dali", marks=pytest.mark.dali), "torchvision"]
dali_only = pytest.mark.skipif(not pipelines.available("dali"), reason="nvidia-dali not installed")


@pytest.fixture(scope="module")
def small_folder(imagenette, tmp_path_factory) -> Path:
    """96 real JPEGs in 3 classes (imagenette160/val), small enough for full epochs in tests."""
    root = tmp_path_factory.mktemp("small")
    for cls in sorted((imagenette / "val").iterdir())[:3]:
        (root / cls.name).mkdir()
        for f in sorted(cls.glob("*.jpg"))[:32]:
            shutil.copy(f, root / cls.name / f.name)
    return root


def loader(source, spec, backend, batch_size=32, **kw):
    # torchvision in-process by default: worker start-up would dominate these tiny runs (tests that are
    # about workers ask for them)
    kw.setdefault("num_workers", 2 if backend == "dali" else 0)
    if backend == "dali" and not pipelines.available("dali"):
        pytest.skip("nvidia-dali not installed")
    return build_loader(source, spec, backend=backend, batch_size=batch_size, device="cpu", **kw)


def first(ld):
    return next(iter(ld))


def pixels(views: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    """Normalised views [..., 3, H, W] -> uint8-scale floats (0..255)."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (views * std + mean) * 255


def all_views(batch, spec) -> list[torch.Tensor]:
    """Every view of a batch as 0..255 [3, h, w] tensors (globals, then locals, sample by sample)."""
    out = []
    for b in range(batch.labels.shape[0]):
        out += list(pixels(batch.global_views[b], spec)) + list(pixels(batch.local_views[b], spec))
    return out


def within_binomial(hits: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


# ------------------------------------------------------------------------------------------------
# Shapes, dtypes, normalisation


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_dtypes_normalisation(backend, small_folder):
    ld = loader(small_folder, SMALL, backend)
    assert len(ld) == 96 // 32 and ld.num_classes == 3
    b = first(ld)
    assert b.global_views.shape == (32, 2, 3, 64, 64) and b.local_views.shape == (32, 6, 3, 32, 32)
    assert b.global_views.dtype == b.local_views.dtype == torch.float32 and b.labels.dtype == torch.int64
    assert set(b.labels.tolist()) <= {0, 1, 2}
    for v in (b.global_views, b.local_views):
        px = pixels(v, SMALL)
        assert px.min() >= -1.0 and px.max() <= 256.0  # de-normalises into the uint8 range
        assert abs(v.mean().item()) < 0.6 and 0.5 < v.std().item() < 1.6  # ImageNet mean/std applied


def test_seed_recipe_full_size(small_folder):
    """The one test on the full seed recipe (2x224 + 6x98), both backends, a batch of 4."""
    seed = SPEC_PRESETS["seed"]
    for backend in ("dali", "torchvision"):
        if not pipelines.available(backend):
            continue
        b = first(loader(small_folder, seed, backend, batch_size=2))
        assert b.global_views.shape == (2, 2, 3, 224, 224) and b.local_views.shape == (2, 6, 3, 98, 98)
        assert torch.isfinite(b.global_views).all() and torch.isfinite(b.local_views).all()


# ------------------------------------------------------------------------------------------------
# Rate of each random op, with the other ops off: detected by comparing each view with the same view
# drawn with that op off (same seed -> same crop).

OPS = {  # op -> spec changes that switch it on at the seed recipe's probability
    "flip": dict(flip_p=0.5),
    "jitter": dict(jitter_p=0.8),
    "grayscale": dict(grayscale_p=0.2),
    "blur": dict(blur_p=0.5),
    "solarize": dict(solarize_p=0.2),
}
# Blur sigma >= 1 so that every blurred view differs from the sharp one (sigma 0.1 is invisible in uint8).
RATE_BASE = SMALL.without_randomness().replace(blur_sigma=(1.0, 2.0))


def detect(op: str, x: torch.Tensor, ref: torch.Tensor, spec: MultiCropSpec) -> bool | None:
    """Was `op` applied to view x (0..255), given the same view with the op off? None = undecidable."""
    changed = (x - ref).abs().max().item() > 1.5
    if op == "flip":
        return (x - ref.flip(-1)).abs().max().item() < 1.5 and changed
    if op == "grayscale":
        if (ref.max(0).values - ref.min(0).values).max() <= 2.5:
            return None  # the view is grey already
        return (x.max(0).values - x.min(0).values).max().item() <= 2.5
    if op == "solarize":
        if ref.round().max() < spec.solarize_threshold:
            return None  # no pixel to invert
    return changed


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_op_rates(backend, imagenette):
    # Every draw is made whatever the probabilities (pipelines/params.py), so the same view with the op
    # off has the same crop and the same other choices.
    base, n_samples = RATE_BASE, 48
    src = imagenette / "val"
    ref = all_views(first(loader(src, base, backend, batch_size=n_samples)), base)
    failures = []
    for op, change in OPS.items():
        spec = base.replace(**change)
        got = all_views(first(loader(src, spec, backend, batch_size=n_samples)), spec)
        verdicts = [d for d in (detect(op, x, r, spec) for x, r in zip(got, ref)) if d is not None]
        p = next(iter(change.values()))
        hits = sum(verdicts)
        if not within_binomial(hits, len(verdicts), p):
            failures.append(f"{op}: {hits}/{len(verdicts)} = {hits / len(verdicts):.3f}, p = {p}")
    assert not failures, failures


# ------------------------------------------------------------------------------------------------
# The shared sampler (pipelines/params.py), the reference's rendering, DALI's agreement with torchvision's maths


def test_sampler_crops_respect_scale_and_ratio():
    """The crop windows every backend uses (torchvision's RandomResizedCrop sampling) on a 160x213 image."""
    n = 3000
    params = sample_views(SMALL, 0, 0, np.arange(n), [160] * n, [213] * n)
    for p, scale in ((params[:, 0], SMALL.global_scale), (params[:, -1], SMALL.local_scale)):
        y, x, h, w = p[:, P_Y], p[:, P_X], p[:, P_H], p[:, P_W]
        assert (y >= 0).all() and (y + h <= 160).all() and (x >= 0).all() and (x + w <= 213).all()
        areas, ratios = h * w / (160 * 213), w / h
        # integer rounding of h and w moves area and ratio by at most a pixel's worth
        assert areas.min() >= scale[0] * 0.95 and areas.max() <= scale[1] * 1.05
        assert ratios.min() >= 3 / 4 * 0.95 and ratios.max() <= 4 / 3 * 1.05
        assert areas.min() < scale[0] + 0.05 * (scale[1] - scale[0])  # the whole range is used
        assert areas.max() > scale[1] - 0.2 * (scale[1] - scale[0])
        # same distribution as torchvision's own sampler: means of area and log-ratio within 4 SE
        tv = np.array([T.RandomResizedCrop.get_params(torch.empty(1, 160, 213), list(scale), list(SMALL.ratio))
                       for _ in range(n)], np.float64)
        tv_areas, tv_logr = tv[:, 2] * tv[:, 3] / (160 * 213), np.log(tv[:, 3] / tv[:, 2])
        for ours, ref in ((areas, tv_areas), (np.log(ratios), tv_logr)):
            se = math.sqrt(ours.var() / n + ref.var() / n)
            assert abs(ours.mean() - ref.mean()) < 4 * se
    # a sample's choices depend on (seed, epoch, index) only, not on the batch it is drawn in
    again = sample_views(SMALL, 0, 0, np.arange(n)[::-1][:5], [160] * 5, [213] * 5)
    assert np.array_equal(again, params[::-1][:5])
    other_epoch = sample_views(SMALL, 0, 1, np.arange(n), [160] * n, [213] * n)
    assert not np.array_equal(other_epoch[:, 0, :4], params[:, 0, :4])


def test_sampler_draws_every_choice_whatever_the_probabilities():
    """Switching one op off changes its own coin only: every other column stays bit-equal."""
    spec = SPEC_PRESETS["seed"]
    idx, h, w = np.arange(200), np.full(200, 160), np.full(200, 213)
    base = sample_views(spec, 5, 2, idx, h, w)
    assert base.shape == (200, spec.num_views, NUM_PARAMS)
    for change, column in ((dict(flip_p=0.0), P_FLIP), (dict(jitter_p=0.0), P_JITTER)):
        other = sample_views(spec.replace(**change), 5, 2, idx, h, w)
        assert base[..., column].any() and not other[..., column].any()
        keep = [k for k in range(NUM_PARAMS) if k != column]
        assert np.array_equal(base[..., keep], other[..., keep])
    off = spec.replace(solarize_threshold=256)  # nothing reaches 256: solarize is off
    assert "solarize" not in off.enabled_ops and base[..., P_SOLAR].any()
    assert not sample_views(off, 5, 2, idx, h, w)[..., P_SOLAR].any()


def test_torchvision_reference_is_torchvision_transforms(imagenette):
    """`render_view` with a parameter row = torchvision's own transform classes with those choices forced
    (p = 1 or 0, one-point ranges of float32-exact values; ColorJitter's order is its first draw,
    randperm(4), under a seed, which the row copies)."""
    from torchvision.transforms import v2

    from pipelines.params import P_BLUR, P_GRAY, P_ORDER
    from pipelines.sources import decode_pil
    from pipelines.torchvision_backend import render_view

    image = decode_pil(sorted((imagenette / "val").glob("*/*.jpg"))[3].read_bytes())
    spec, view = SMALL, SMALL.views[0]
    for seed in range(4):
        torch.manual_seed(seed)
        order = torch.randperm(4)
        p = np.zeros(NUM_PARAMS)
        p[[P_Y, P_X, P_H, P_W]] = 10, 20, 90, 120
        p[[P_FLIP, P_JITTER, P_GRAY, P_BLUR, P_SOLAR]] = 1, 1, seed % 2, 1, seed < 2
        p[[P_BRIGHT, P_CONTRAST, P_SAT, P_HUE, P_SIGMA]] = 1.25, 0.75, 1.125, -0.0625, 1.5
        p[P_ORDER:P_ORDER + 4] = order.numpy()
        ours = render_view(image, p, view, spec)
        b, c, s, h = p[[P_BRIGHT, P_CONTRAST, P_SAT, P_HUE]]
        expected = v2.Compose([
            v2.ColorJitter((b, b), (c, c), (s, s), (h, h)),
            v2.RandomGrayscale(1.0 if p[P_GRAY] else 0.0),
            v2.GaussianBlur(view.blur_kernel, (1.5, 1.5)),
            v2.RandomSolarize(spec.solarize_threshold, 1.0 if p[P_SOLAR] else 0.0),
            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std)),
        ])
        crop = F.horizontal_flip(F.resized_crop(image, 10, 20, 90, 120, [view.size, view.size], antialias=True))
        torch.manual_seed(seed)  # ColorJitter draws randperm(4) first: the same order as above
        assert torch.equal(ours, expected(crop)), seed


def dali_views_and_params(src, spec, batch_size=16, seed=0):
    """First DALI batch as 0..255 views, plus the decoded sources and the per-view parameters it used."""
    b = first(loader(src, spec, "dali", batch_size=batch_size, seed=seed))
    source = open_source(src)
    idx = epoch_batches(len(source), batch_size, 0, 1, seed, 0)[0]
    images, hw = [], []
    for i in idx:
        data = source.read(int(i))
        hw.append(check_encoded(data)[1:])
        images.append(torch.from_numpy(decode_rgb(data)).permute(2, 0, 1).float())
    params = sample_views(spec, seed, 0, idx, *zip(*hw))
    views = [list(pixels(b.global_views[k], spec)) + list(pixels(b.local_views[k], spec)) for k in range(batch_size)]
    return views, images, params


def tv_crop(image, p, size):
    v = F.resized_crop(image, int(p[P_Y]), int(p[P_X]), int(p[P_H]), int(p[P_W]), [size, size], antialias=True)
    return v.flip(-1) if p[P_FLIP] else v


@dali_only
def test_dali_crop_flip_normalise_match_torchvision(imagenette):
    """DALI's crop window, resize, flip and normalisation = torchvision's resized_crop of the same window."""
    spec = SMALL.without_randomness().replace(flip_p=0.5)
    views, images, params = dali_views_and_params(imagenette / "val", spec)
    for v_s, img, ps in zip(views, images, params):
        for v, p, view in zip(v_s, ps, spec.views):
            diff = (v - tv_crop(img, p, view.size)).abs()
            assert diff.mean() < 2.0 and diff.max() < 40  # linear vs bilinear-antialias resampling only


@dali_only
def test_dali_colour_maths_bounded_against_torchvision(imagenette):
    """Documented differences (pipelines/dali_backend.py): contrast pivots on 128 rather than the mean grey,
    hue/saturation are a linear YIQ transform rather than HSV, fixed order. Bound them against torchvision's
    functional ops applied with the same factors, and check greyscale is torchvision's luma."""
    spec = SMALL.without_randomness().replace(jitter_p=1.0)
    views, images, params = dali_views_and_params(imagenette / "val", spec)
    errs = []
    for v_s, img, ps in zip(views, images, params):
        for v, p, view in zip(v_s, ps, spec.views):
            t = tv_crop(img, p, view.size).round().to(torch.uint8)
            t = F.adjust_brightness(t, float(p[P_BRIGHT]))
            t = F.adjust_contrast(t, float(p[P_CONTRAST]))
            t = F.adjust_saturation(t, float(p[P_SAT]))
            t = F.adjust_hue(t, float(p[P_HUE]))
            errs.append((v - t.float()).abs().mean().item())
    errs = np.array(errs) / 255
    q50, q95, top = np.quantile(errs, [0.5, 0.95, 1.0])
    print(f"DALI vs torchvision jitter, mean |error| per view: median {q50:.4f}, 95% {q95:.4f}, max {top:.4f}")
    # contrast alone: |c - 1| * |mean grey - 128| reaches 0.4 * 80 / 255 = 0.13 on dark or bright views
    assert q50 < 0.04 and q95 < 0.15 and top < 0.25, (q50, q95, top)

    spec = SMALL.without_randomness().replace(grayscale_p=1.0)
    views, images, params = dali_views_and_params(imagenette / "val", spec, batch_size=8)
    for v_s, img, ps in zip(views, images, params):
        for v, p, view in zip(v_s, ps, spec.views):
            grey = F.rgb_to_grayscale(tv_crop(img, p, view.size), num_output_channels=3)
            assert (v - grey).abs().mean() < 2.0


@dali_only
def test_dali_blur_matches_torchvision(imagenette):
    spec = SMALL.without_randomness().replace(blur_p=1.0)
    views, images, params = dali_views_and_params(imagenette / "val", spec, batch_size=8)
    for v_s, img, ps in zip(views, images, params):
        for v, p, view in zip(v_s, ps, spec.views):
            t = tv_crop(img, p, view.size).round().clamp(0, 255).to(torch.uint8)
            t = F.gaussian_blur(t, [view.blur_kernel] * 2, [float(p[P_SIGMA])] * 2).float()
            assert (v - t).abs().mean() < 2.0


@pytest.mark.gpu
@dali_only
def test_dali_gpu_graph_matches_cpu_graph(small_folder):
    """The same graph with mixed (nvJPEG) decoding: batch on the GPU, close to the CPU graph's batch
    (decoders and resampling kernels differ slightly)."""
    cpu = first(loader(small_folder, SMALL, "dali", batch_size=16))
    gpu = first(build_loader(small_folder, SMALL, backend="dali", batch_size=16, device="cuda"))
    assert gpu.global_views.is_cuda and gpu.local_views.is_cuda and gpu.labels.is_cuda
    assert torch.equal(gpu.labels.cpu(), cpu.labels)
    diff = (pixels(gpu.global_views.cpu(), SMALL) - pixels(cpu.global_views, SMALL)).abs()
    assert diff.mean() < 3.0


# ------------------------------------------------------------------------------------------------
# Order: sharding, determinism, resume


def test_epoch_batches_shards_disjoint_and_covering():
    n, bs, world = 103, 8, 3
    shards = [epoch_batches(n, bs, r, world, seed=5, epoch=2) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // (bs * world)
    flat = [np.concatenate(s) for s in shards]
    assert all(len(np.unique(f)) == len(f) for f in flat)
    assert not set(flat[0]) & set(flat[1]) and not set(flat[1]) & set(flat[2])
    union = np.sort(np.concatenate(flat))
    perm = np.random.default_rng([5, 2]).permutation(n)
    assert np.array_equal(union, np.sort(perm[: len(union)]))  # the first steps*B*W of the epoch, all of it
    assert not np.array_equal(np.concatenate(epoch_batches(n, bs, 0, world, 5, 3)), flat[0])  # reshuffled
    assert [b.tolist() for b in epoch_batches(n, bs, 1, world, 5, 2, start_step=2)] == [b.tolist() for b in shards[1][2:]]
    with pytest.raises(ValueError, match="global batch"):
        epoch_batches(10, 8, 0, 2, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_disjoint(backend, small_folder):
    """Two ranks' first batches contain different images (labels differ as multisets, views differ)."""
    b0 = first(loader(small_folder, SMALL, backend, batch_size=16, rank=0, world_size=2))
    b1 = first(loader(small_folder, SMALL, backend, batch_size=16, rank=1, world_size=2))
    assert not torch.equal(b0.global_views, b1.global_views)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batch_and_exact_resume(backend, small_folder):
    full = [b for b in loader(small_folder, SMALL, backend, batch_size=16, seed=3, epoch=1)]
    assert len(full) == 6
    other = loader(small_folder, SMALL, backend, batch_size=16, seed=3, num_workers=1)  # workers differ
    other.set_epoch(1, start_step=4)
    tail = list(other)
    assert len(tail) == 2
    for a, b in zip(full[4:], tail):
        assert torch.equal(a.global_views, b.global_views) and torch.equal(a.local_views, b.local_views)
        assert torch.equal(a.labels, b.labels)
    again = list(other)  # the resume point applies once: the next pass is the whole epoch again
    assert len(again) == 6 and torch.equal(again[0].global_views, full[0].global_views)
    other.set_epoch(2)
    assert not torch.equal(first(other).global_views, full[0].global_views)
    diff_seed = first(loader(small_folder, SMALL, backend, batch_size=16, seed=4, epoch=1))
    assert not torch.equal(diff_seed.global_views, full[0].global_views)


@dali_only
def test_dali_abandoned_pass_then_new_epoch(small_folder):
    """Leaving a pass mid-way must not leak its prefetched batches into the next one."""
    ld = loader(small_folder, SMALL, "dali", batch_size=16)
    it = iter(ld)
    next(it)
    ld.set_epoch(1)
    fresh = loader(small_folder, SMALL, "dali", batch_size=16, epoch=1)
    assert torch.equal(first(ld).global_views, first(fresh).global_views)


@dali_only
def test_dali_feed_runs_off_the_consumer_thread_and_tracks_positions(small_folder, monkeypatch):
    """The graph's inputs are read, checked and packed by the feed thread ahead of the pipeline: the
    consumer (the training thread) reads no file. `position` is that of the batch last handed out (the
    feed runs ahead), and resuming there gives the rest of the epoch."""
    ld = loader(small_folder, SMALL, "dali", batch_size=16, seed=2)
    readers, read = set(), ld.source.read

    def spy(i):
        readers.add(threading.current_thread().name)
        return read(i)

    monkeypatch.setattr(ld.source, "read", spy)
    full, positions = [], []
    for batch in ld:
        full.append(batch.global_views.clone())
        positions.append(ld.position)
    assert readers == {"dali-feed"}
    assert positions == list(range(1, len(ld) + 1))
    it = iter(ld)
    next(it), next(it)
    ld.set_epoch(0, start_step=ld.position)  # "checkpoint" after two batches, resume
    rest = list(ld)
    assert len(rest) == len(ld) - 2 and all(torch.equal(a.global_views, b) for a, b in zip(rest, full[2:]))


@dali_only
def test_dali_cpu_pipelines_side_by_side_give_the_same_batches_in_the_same_order(small_folder):
    """The CPU graphs that take the steps in turn (one thread each) change nothing but speed: 4 pipelines over
    6 steps (2, 2, 1, 1 each) give the batches, labels and positions of one pipeline, and a resume mid-epoch
    with a different count continues the same epoch. The pass ends cleanly, so the next one reuses them."""

    def epoch(ld):
        return [(b.global_views.clone(), b.local_views.clone(), b.labels.clone(), ld.position) for b in ld]

    one = loader(small_folder, SMALL, "dali", batch_size=16, seed=3, num_workers=1)
    four = loader(small_folder, SMALL, "dali", batch_size=16, seed=3, num_workers=4, pipelines=4)
    assert (one.num_pipelines, four.num_pipelines, four.num_threads) == (1, 4, 1)
    a, b = epoch(one), epoch(four)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x[:3], y[:3])) and x[3] == y[3]
    pipes = four._pipes
    four.set_epoch(1)
    assert len(epoch(four)) == 6 and four._pipes is pipes  # not rebuilt: the last pass was drained
    three = loader(small_folder, SMALL, "dali", batch_size=16, seed=3, num_workers=3, pipelines=3)
    three.set_epoch(0, start_step=a[1][3])
    rest = epoch(three)
    assert [r[3] for r in rest] == [x[3] for x in a[2:]]
    assert all(torch.equal(r[0], x[0]) and torch.equal(r[2], x[2]) for r, x in zip(rest, a[2:]))


@dali_only
def test_dali_feed_error_reaches_the_consumer(tmp_path):
    (tmp_path / "a").mkdir()
    for k in range(20):
        (tmp_path / "a" / f"{k:02d}.jpg").write_text("not an image\n")
    with pytest.raises(RuntimeError, match="consecutive unreadable images"):
        first(loader(tmp_path, SMALL, "dali", batch_size=8))


def test_threads_follow_affinity_slurm_and_local_ranks(small_folder, monkeypatch):
    """Loaders size their thread pools by this rank's CPUs: the affinity mask (taskset here), capped by
    SLURM_CPUS_PER_TASK, split by LOCAL_WORLD_SIZE -- never os.cpu_count()."""
    from pipelines.threads import cpus_per_rank

    code = "import os; from pipelines.threads import cpus_per_rank; print(cpus_per_rank(), os.cpu_count())"
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE")}
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "1" and int(out[1]) == os.cpu_count()
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpus_per_rank() == max(1, cpus // 2)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cpus_per_rank() == 1
    from pipelines.torchvision_backend import TorchvisionLoader

    assert TorchvisionLoader(small_folder, SMALL, 16, torch.device("cpu")).num_workers == 1
    if pipelines.available("dali"):
        from pipelines.dali_backend import DaliLoader

        assert DaliLoader(small_folder, SMALL, 16, torch.device("cpu")).num_threads == 1


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def messy_folder(imagenette, tmp_path_factory) -> tuple[Path, set[str]]:
    """Real JPEGs plus broken and odd files made from them. Returns (root, names of unreadable files)."""
    root = tmp_path_factory.mktemp("messy")
    good = sorted((imagenette / "val").glob("*/*.jpg"))[:40]
    (root / "a").mkdir()
    (root / "b").mkdir()
    for k, f in enumerate(good):
        shutil.copy(f, root / ("a" if k % 2 else "b") / f.name)
    data = good[0].read_bytes()
    rgb = Image.open(good[1]).convert("RGB")
    (root / "a" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "b" / "notes.jpg").write_text("this is not an image\n")
    rgb.convert("CMYK").save(root / "a" / "cmyk.jpg")
    rgb.convert("L").save(root / "b" / "grey.jpg")
    rgba = rgb.copy()
    rgba.putalpha(128)
    rgba.save(root / "a" / "rgba.png")
    grey16 = (np.asarray(rgb.convert("L"), np.uint16) * 257)
    Image.fromarray(grey16).save(root / "b" / "grey16.png")
    return root, {"truncated.jpg", "empty.jpg", "notes.jpg"}


def test_odd_modes_are_converted(messy_folder):
    root, _ = messy_folder
    for name in ("a/cmyk.jpg", "b/grey.jpg", "a/rgba.png", "b/grey16.png"):
        data = (root / name).read_bytes()
        rgb = decode_rgb(data, name)
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, name
        plain, h, w = check_encoded(data, name)
        assert (h, w) == rgb.shape[:2]
        assert Image.open(io.BytesIO(plain)).mode in ("RGB", "L"), name
    grey8 = decode_rgb((root / "b" / "grey.jpg").read_bytes())
    grey16 = decode_rgb((root / "b" / "grey16.png").read_bytes())
    assert abs(float(grey16.mean()) - float(grey8.mean())) < 3  # 16-bit scaled down, not clipped to white


def test_jpeg_header_size_agrees_with_pil(imagenette, dtd10, messy_folder):
    """check_encoded's marker walk (no PIL) gives PIL's size for plain 8-bit grey/RGB Huffman JPEGs, baseline
    or progressive, with or without EXIF, and declines everything else (then PIL decides, as before)."""
    from pipelines.sources import _plain_jpeg_size

    files = sorted((imagenette / "val").glob("*/*.jpg"))[::7] + sorted((dtd10 / "train").glob("*/*.jpg"))[::5]
    rgb = Image.open(files[0]).convert("RGB")
    variants = {}
    for name, kw in {"progressive": dict(progressive=True), "exif": dict(exif=rgb.getexif().tobytes()),
                     "q30-420": dict(quality=30, subsampling=2)}.items():
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", **kw)
        variants[name] = buf.getvalue()
    buf = io.BytesIO()
    rgb.convert("L").save(buf, format="JPEG")
    variants["grey"] = buf.getvalue()
    checked = 0
    for data in [f.read_bytes() for f in files] + list(variants.values()):
        with Image.open(io.BytesIO(data)) as img:
            assert img.mode in ("RGB", "L")
            assert _plain_jpeg_size(data) == (img.height, img.width)
        assert check_encoded(data)[0] is data  # passed through untouched
        checked += 1
    assert checked > 150
    root, _ = messy_folder
    cmyk = (root / "a" / "cmyk.jpg").read_bytes()
    assert _plain_jpeg_size(cmyk) is None and Image.open(io.BytesIO(check_encoded(cmyk)[0])).mode == "RGB"
    assert _plain_jpeg_size(b"\xff\xd8" + b"\x00" * 64) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_skipped_counted_logged_once(backend, messy_folder, caplog):
    root, broken = messy_folder
    ld = loader(root, SMALL, backend, batch_size=8, num_workers=1)
    n = len(ld)
    with caplog.at_level("WARNING"):
        for epoch in range(2):
            ld.set_epoch(epoch)
            batches = list(ld)
            assert len(batches) == n and all(torch.isfinite(b.global_views).all() for b in batches)
    seen = {Path(p).name for p in ld.bad_files.counts}
    covered = {Path(open_source(root).name(int(i))).name for b in epoch_batches(47, 8, 0, 1, 0, 0) for i in b}
    covered |= {Path(open_source(root).name(int(i))).name for b in epoch_batches(47, 8, 0, 1, 0, 1) for i in b}
    assert broken & covered <= seen <= broken  # the unreadable files met (a replacement may meet more)
    logged = [r for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(logged) == len(seen)  # each path logged once, even when met in both epochs


def test_source_errors_name_the_input(tmp_path):
    with pytest.raises(ValueError, match="does-not-exist"):
        open_source(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no class sub-folders"):
        open_source(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="noimg.*no image files"):
        open_source(tmp_path / "noimg")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"x\.txt.*not a \.tar"):
        open_source(tmp_path / "x.txt")
    with pytest.raises(ValueError, match=r"shard.*not found"):
        open_source(str(tmp_path / "s-{0..2}.tar"))
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        build_loader(tmp_path, SMALL, backend="nope")


def test_backend_choice_is_explained(tmp_path):
    """`auto` picks FFCV for a .beton, DALI when installed (GPU decode on CUDA, its CPU graph otherwise),
    else the reference; `describe_backend` says which and why, for the run plan."""
    from pipelines import describe_backend, resolve_backend

    folder = "auto -> dali" if pipelines.available("dali") else "auto -> torchvision (DALI not installed"
    assert describe_backend("auto", tmp_path, "cpu").startswith(folder)
    if pipelines.available("dali"):
        assert resolve_backend("auto", tmp_path, "cuda") == "dali"
        assert "CUDA device: mixed nvJPEG decode" in describe_backend("auto", tmp_path, "cuda")
        assert "no CUDA device: DALI's CPU graph" in describe_backend("auto", tmp_path, "cpu")
    if pipelines.available("ffcv"):
        assert describe_backend("auto", tmp_path / "x.beton", "cpu").startswith("auto -> ffcv (.beton source")
    assert describe_backend("torchvision", tmp_path, "cpu").startswith("torchvision -> torchvision (requested")
    with pytest.raises(ValueError, match=r"'torchvision' cannot read the FFCV file .*x\.beton"):
        resolve_backend("torchvision", tmp_path / "x.beton", "cpu")


@pytest.mark.parametrize("change, field", [
    (dict(global_scale=(0.0, 1.0)), "global_scale"), (dict(local_scale=(0.1, 1.5)), "local_scale"),
    (dict(blur_p=1.5), "blur_p"), (dict(flip_p=-0.1), "flip_p"), (dict(local_size=4), "local_size"),
])
def test_spec_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        SMALL.replace(**change)


# ------------------------------------------------------------------------------------------------
# Webdataset shards


@pytest.mark.parametrize("backend", BACKENDS)
def test_webdataset_shards(backend, small_folder, tmp_path):
    files = sorted(small_folder.glob("*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:02d}.tar", "w") as tf:
            for k, f in enumerate(files[s::2]):
                key = f"sample{s}_{k:04d}"
                tf.add(f, arcname=f"{key}.jpg")
                label = io.BytesIO(str(classes.index(f.parent.name)).encode())
                info = tarfile.TarInfo(f"{key}.cls")
                info.size = len(label.getvalue())
                tf.addfile(info, label)
    src = open_source(str(tmp_path / "shard-{00..01}.tar"))
    assert len(src) == len(files) and src.num_classes == 3
    assert len(open_source(tmp_path)) == len(files) and len(open_source(tmp_path / "shard-00.tar")) == len(files) // 2
    # the bytes read from a tar member are the original file
    i = 5
    assert src.read(i) in {f.read_bytes() for f in files}
    b = first(loader(str(tmp_path / "shard-{00..01}.tar"), SMALL, backend, batch_size=16))
    assert b.global_views.shape == (16, 2, 3, 64, 64) and set(b.labels.tolist()) <= {0, 1, 2}


# ------------------------------------------------------------------------------------------------
# Preview


def test_preview_writes_view_grid(small_folder, tmp_path):
    from pipelines.preview import main, view_grid

    b = first(loader(small_folder, SMALL, "torchvision", batch_size=4))
    grid = view_grid(b, SMALL, index=1)
    assert grid.shape == (3, SMALL.global_size + 4, 8 * (SMALL.global_size + 4))
    assert 0 <= grid.min() and grid.max() <= 1
    out = main(["--data", str(small_folder), "--backend", "torchvision", "--preset", "cpu-small",
                "--out", str(tmp_path / "views.png"), "--rows", "2"])
    assert Image.open(out).size == (8 * (SMALL.global_size + 4), 2 * (SMALL.global_size + 4))


# ------------------------------------------------------------------------------------------------
# `make gpu-check`'s pipeline sections (benchmarks/gpu_check.py): their measuring code, run here on CPU so that a
# GPU day does not find it broken (on CUDA the same functions time the GPU)


def test_gpu_check_pipeline_figures_run_on_cpu(small_folder, monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.delenv("DATA", raising=False)
    data, what = gpu_check._dali_data(count=8, side=500)  # photos the repository reaches, ImageNet-sized
    images = sorted(Path(data).glob("*/*.jpg"))
    assert len(images) == 8 and "upscaled to 500 px" in what and max(Image.open(images[0]).size) == 500
    shutil.rmtree(data)
    colour = gpu_check.ffcv_colour_figures("cpu", batch=2, compiled=False, repeats=1)
    assert colour["batch"] == 2 and colour["ms_per_batch"] > 0 and colour["host_syncs"] is None
    if pipelines.available("dali"):
        dali = gpu_check.dali_figures(str(small_folder), batch=8, hw_decoder_load=0.65, seconds=1.0, device="cpu")
        assert dali["images_per_s"] > 0 and dali["host_cpu_ms_per_image"] > 0


def test_batch_device_names_the_cuda_device():
    """A loader's threads must name the rank's GPU ("cuda" alone is the current device of the thread that
    asks, and a new thread starts on device 0)."""
    from pipelines.batch import batch_device

    cuda = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    assert batch_device("cpu") == torch.device("cpu")
    assert batch_device(None) == (cuda or torch.device("cpu"))
    if cuda is not None:
        assert batch_device("cuda") == cuda
    assert batch_device(torch.device("cuda", 3)) == torch.device("cuda", 3)  # named: kept (no CUDA call)
