"""FFCV backend and conversion, on real JPEGs (imagenette160 / dtd10 from ../shared/data).

One small .beton (4 classes x 16 images + 3 deliberately broken files) is written once per session.
The colour kernels are checked pixel-wise against torchvision.transforms.v2.functional; the GPU path's
torch colour code (pipelines/ffcv_gpu.py) is run on CPU tensors here -- no GPU on this machine -- and
checked against the fused numba op given the same parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import available  # noqa: E402

if not available("ffcv"):  # find_spec, not an import: importing ffcv directly would set torch to 1 thread
    pytest.skip("ffcv is not installed", allow_module_level=True)

from torchvision.transforms.v2 import functional as TF  # noqa: E402

from pipelines import SPEC_PRESETS, build_loader  # noqa: E402
from pipelines import ffcv_ops as ops  # noqa: E402
from pipelines import params  # noqa: E402
from pipelines.convert_ffcv import convert  # noqa: E402
from pipelines.ffcv_backend import _libffcv_jit, open_beton  # noqa: E402
from pipelines.ffcv_gpu import augment_views  # noqa: E402
from pipelines.sources import decode_rgb, open_source  # noqa: E402

pytestmark = pytest.mark.ffcv
REPO = Path(__file__).resolve().parents[1]
SPEC = SPEC_PRESETS["cpu-small"]
CLASSES, PER_CLASS = 4, 16


@pytest.fixture(scope="session")
def small_folder(imagenette, tmp_path_factory) -> Path:
    """4 imagenette classes x 16 images (symlinks) + a truncated, a zero-byte and a text file named .jpg."""
    root = tmp_path_factory.mktemp("ffcv_src")
    for wnid in sorted(p.name for p in (imagenette / "train").iterdir())[:CLASSES]:
        (root / wnid).mkdir()
        for f in sorted((imagenette / "train" / wnid).iterdir())[:PER_CLASS]:
            (root / wnid / f.name).symlink_to(f)
    first = sorted(root.iterdir())[0]
    data = next(iter(sorted(first.iterdir()))).read_bytes()
    (first / "zz_truncated.jpg").write_bytes(data[: len(data) // 3])
    (first / "zz_empty.jpg").write_bytes(b"")
    (first / "zz_text.jpg").write_text("this is not an image\n")
    return root


@pytest.fixture(scope="session")
def beton(small_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ffcv_out") / "small.beton"
    report = convert(str(small_folder), out, max_resolution=256, jpeg_quality=90, num_workers=2)
    return out, report


@pytest.fixture(scope="session")
def loader0(beton):
    loader = build_loader(beton[0], SPEC, backend="ffcv", batch_size=8, device="cpu", rank=0, world_size=2,
                          seed=3, num_workers=2)
    yield loader
    loader.close()


def read_beton_jpeg(path: Path, i: int) -> np.ndarray:
    """Image `i` of a .beton, decoded from its stored JPEG bytes with PIL (independent of our decoder)."""
    reader = open_beton(path)
    meta = reader.metadata[f"f{reader.field_names.index('image')}"][i]
    table = reader.alloc_table
    size = int(table["size"][table["ptr"] == meta["data_ptr"]][0])
    raw = np.memmap(path, np.uint8, mode="r")[int(meta["data_ptr"]): int(meta["data_ptr"]) + size]
    return decode_rgb(raw.tobytes())


# ---- conversion ----------------------------------------------------------------------------------
def test_convert_round_trip_and_bad_file_report(beton, small_folder):
    path, report = beton
    assert report["images_written"] == CLASSES * PER_CLASS and report["classes"] == CLASSES
    reasons = {Path(s["file"]).name: s["reason"] for s in report["skipped_files"]}
    assert set(reasons) == {"zz_truncated.jpg", "zz_empty.jpg", "zz_text.jpg"}
    assert "zero-byte" in reasons["zz_empty.jpg"] and "truncated" in reasons["zz_truncated.jpg"]
    assert "cannot identify" in reasons["zz_text.jpg"]
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # temp file renamed away

    reader = open_beton(path)
    assert reader.num_samples == CLASSES * PER_CLASS
    source = open_source(small_folder)
    good = [i for i in range(len(source)) if not Path(source.name(i)).name.startswith("zz_")]
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    assert labels.tolist() == source.labels[good].tolist()
    for k in (0, 17, 63):  # content: the stored JPEG re-decodes to the source image within JPEG error
        stored, original = read_beton_jpeg(path, k), decode_rgb(source.read(good[k]))
        assert stored.shape == original.shape  # 160-px images stay below --max-resolution 256
        assert np.abs(stored.astype(float) - original).mean() < 3.0


def test_validation_of_tar_shards_and_torchvision_datasets(tmp_path, small_folder):
    """The other two source kinds, up to the writer: webdataset shards and a torchvision dataset class."""
    import io
    import tarfile

    from pipelines.convert_ffcv import open_any, validate

    files = sorted(small_folder.glob("*/ILSVRC*"))[:6]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for k, f in enumerate(files + [small_folder / sorted(p.name for p in small_folder.iterdir())[0] / "zz_text.jpg"]):
            for name, data in ((f"s{k:03d}.jpg", f.read_bytes()), (f"s{k:03d}.cls", str(k % 3).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    good, bad = validate(open_any(str(tmp_path / "shard-000.tar"), None, None, "train"), num_workers=2)
    assert good == list(range(6)) and len(bad) == 1 and "cannot identify" in bad[0][1]

    source = open_any(None, "ImageFolder", str(small_folder), "train")
    good, bad = validate(source, num_workers=2)
    assert len(good) == CLASSES * PER_CLASS and len(bad) == 3 and source.classes == sorted(
        p.name for p in small_folder.iterdir())


def test_convert_rejects_bad_arguments(tmp_path, small_folder):
    with pytest.raises(ValueError, match="does-not-exist"):
        convert(str(tmp_path / "does-not-exist"), tmp_path / "x.beton")
    with pytest.raises(ValueError, match="no-such-folder"):
        convert(str(small_folder), tmp_path / "no-such-folder" / "x.beton")
    with pytest.raises(ValueError, match=r"\.beton"):
        convert(str(small_folder), tmp_path / "x.ffcv")
    with pytest.raises(ValueError, match="NoSuchDataset"):
        convert(None, tmp_path / "x.beton", dataset="NoSuchDataset", root=str(tmp_path))


def test_loader_rejects_bad_beton(tmp_path):
    with pytest.raises(ValueError, match="missing.beton"):
        build_loader(tmp_path / "missing.beton", SPEC, backend="ffcv", device="cpu")
    (tmp_path / "junk.beton").write_text("not a beton")
    with pytest.raises(ValueError, match="junk.beton.*not a readable"):
        build_loader(tmp_path / "junk.beton", SPEC, backend="ffcv", device="cpu")
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter

    # A real .beton without an image field.
    DatasetWriter(str(tmp_path / "labels.beton"), {"label": IntField()}, num_workers=1).from_indexed_dataset(
        [(k,) for k in range(4)])
    with pytest.raises(ValueError, match="labels.beton.*RGBImageField named 'image'"):
        build_loader(tmp_path / "labels.beton", SPEC, backend="ffcv", device="cpu")


# ---- the loader ------------------------------------------------------------------------------------
@pytest.mark.slow  # first loader: numba compiles the pipeline (~10-25 s on 2 cores)
def test_shards_disjoint_and_batches_well_formed(beton, loader0):
    loader1 = build_loader(beton[0], SPEC, backend="ffcv", batch_size=8, device="cpu", rank=1, world_size=2,
                           seed=3, num_workers=2)
    assert len(loader0) == len(loader1) == (CLASSES * PER_CLASS) // 16
    seen = []
    for loader in (loader0, loader1):
        loader.set_epoch(0)
        for batch in loader:
            assert batch.global_views.shape == (8, 2, 3, 64, 64) and batch.global_views.is_contiguous()
            assert batch.local_views.shape == (8, 6, 3, 32, 32) and batch.local_views.is_contiguous()
            assert torch.isfinite(batch.global_views).all() and torch.isfinite(batch.local_views).all()
            reader_labels = open_beton(beton[0]).metadata["f1"][loader.batch_indices]
            assert batch.labels.tolist() == reader_labels.tolist()
            seen.append(loader.batch_indices.copy())
    loader1.close()
    everything = np.concatenate(seen)
    assert len(everything) == len(set(everything.tolist())) == CLASSES * PER_CLASS  # disjoint, complete
    assert loader0.num_classes == CLASSES


def test_resume_mid_epoch_is_exact_and_batches_stay_valid(loader0):
    loader0.set_epoch(1)
    full = [(b.global_views.clone(), b.local_views.clone(), loader0.batch_indices.copy()) for b in loader0]
    assert loader0.epoch == 2  # a finished pass moves on to the next epoch
    loader0.set_epoch(1, start_step=2)
    kept = []  # hold every handed-out Batch: FFCV must not reuse their memory
    for k, batch in enumerate(loader0, start=2):
        g, loc, idx = full[k]
        assert np.array_equal(loader0.batch_indices, idx)
        assert torch.equal(batch.global_views, g) and torch.equal(batch.local_views, loc)
        kept.append((batch, g))
    for batch, g in kept:
        assert torch.equal(batch.global_views, g)
    loader0.set_epoch(2)
    other = next(iter(loader0))
    assert not torch.equal(other.global_views, full[0][0])  # another epoch, another order and views


@pytest.mark.slow  # a second FFCV pipeline (numba compile)
def test_held_batches_survive_ffcv_reusing_its_slots(beton):
    """An epoch of 13 batches (12 x 5 + a short one of 4, drop_last=False) -- 3x FFCV's output slots
    (batches_ahead + 2) -- all held: none is overwritten; batches dropped as a trainer drops them are
    recycled, so the buffer pool stays small."""
    torch.set_num_threads(2)
    loader = build_loader(beton[0], SPEC, backend="ffcv", batch_size=5, device="cpu", seed=3, num_workers=2,
                          drop_last=False)
    held, seen = [], []
    for batch in loader:
        held.append((batch, batch.global_views.clone(), batch.local_views.clone()))
        seen.append(loader.batch_indices.copy())
    assert torch.get_num_threads() == 2  # FFCV's Loader and epoch thread set torch's count: we restore it
    assert len(held) == len(loader) == 13 and [len(b) for b in seen[-2:]] == [5, 4]
    assert sorted(np.concatenate(seen).tolist()) == list(range(CLASSES * PER_CLASS))
    assert held[-1][0].global_views.shape[0] == 4 and len(loader._outputs.buffers) >= 13
    for batch, g, loc in held:
        assert torch.equal(batch.global_views, g) and torch.equal(batch.local_views, loc)
    held.clear()
    for batch in loader:  # another epoch, each batch dropped when the next arrives
        pass
    assert len(loader._outputs.buffers) <= 14  # nothing new: the released buffers were reused
    loader.close()


def test_recycled_buffers_hand_out_only_unreferenced_memory():
    from pipelines.ffcv_backend import RecycledBuffers

    pool = RecycledBuffers((2, 5), np.float32)
    view = pool[0][:1]  # like FFCV's destination[:count] kept by a Batch
    other = pool[1]
    assert not np.shares_memory(view, other) and len(pool.buffers) == 2
    del other
    assert len(pool.buffers) == 2 and not np.shares_memory(view, pool[2])  # the released one is reused
    del view
    assert len(pool.buffers) == 2


def test_quasi_random_order_is_a_seeded_permutation(loader0):
    from pipelines.ffcv_backend import quasi_random_order

    pages = loader0._loader.memory_manager.page_to_samples  # the real .beton's page -> samples map
    n = loader0.num_samples
    a, b = quasi_random_order(pages, n, seed=1, epoch=0), quasi_random_order(pages, n, seed=1, epoch=1)
    assert sorted(a.tolist()) == list(range(n)) and sorted(b.tolist()) == list(range(n))
    assert np.array_equal(a, quasi_random_order(pages, n, seed=1, epoch=0)) and not np.array_equal(a, b)
    loader0.order = "quasi_random"
    try:
        steps = loader0.epoch_batches(0)
        assert len(steps) == len(loader0) and all(len(s) == 8 for s in steps)
    finally:
        loader0.order = "random"


def test_dropping_the_iterator_stops_ffcv(loader0):
    loader0.set_epoch(0)
    it = iter(loader0)
    next(it)
    thread = loader0._running
    assert thread is not None and thread.is_alive()
    del it  # generator finaliser closes FFCV's thread
    assert loader0._running is None and not thread.is_alive()


# ---- kernels -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(dtd10) -> np.ndarray:
    """A real 64x64 texture crop, float32 CHW in [0, 1] (the kernels' layout)."""
    path = sorted((dtd10 / "train").glob("*/*.jpg"))[5]
    hwc = decode_rgb(path.read_bytes())[:64, :64].astype(np.float32) / 255.0
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


PLAIN = SPEC.replace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), solarize_threshold=128)


def _tv(img: np.ndarray, fn, *args, **kw) -> np.ndarray:
    return fn(torch.from_numpy(img), *args, **kw).numpy()


@pytest.mark.parametrize("name, ours, theirs", [
    ("brightness 1.3", lambda x: ops.adjust_brightness(x, 1.3), lambda x: _tv(x, TF.adjust_brightness, 1.3)),
    ("brightness 0.6", lambda x: ops.adjust_brightness(x, 0.6), lambda x: _tv(x, TF.adjust_brightness, 0.6)),
    ("contrast 1.4", lambda x: ops.adjust_contrast(x, 1.4), lambda x: _tv(x, TF.adjust_contrast, 1.4)),
    ("contrast 0.6", lambda x: ops.adjust_contrast(x, 0.6), lambda x: _tv(x, TF.adjust_contrast, 0.6)),
    ("saturation 1.2", lambda x: ops.adjust_saturation(x, 1.2), lambda x: _tv(x, TF.adjust_saturation, 1.2)),
    ("saturation 0.0", lambda x: ops.adjust_saturation(x, 0.0), lambda x: _tv(x, TF.adjust_saturation, 0.0)),
    ("hue +0.1", lambda x: ops.adjust_hue(x, 0.1), lambda x: _tv(x, TF.adjust_hue, 0.1)),
    ("hue -0.07", lambda x: ops.adjust_hue(x, -0.07), lambda x: _tv(x, TF.adjust_hue, -0.07)),
    ("hue +0.5", lambda x: ops.adjust_hue(x, 0.5), lambda x: _tv(x, TF.adjust_hue, 0.5)),
    ("grayscale", ops.to_grayscale, lambda x: _tv(x, TF.rgb_to_grayscale, num_output_channels=3)),
    ("blur 0.7", lambda x: ops.gaussian_blur(x, 0.7, 9, np.empty(x[0].size, np.float32)),
     lambda x: _tv(x, TF.gaussian_blur, [9, 9], [0.7, 0.7])),
    ("blur 2.0", lambda x: ops.gaussian_blur(x, 2.0, 9, np.empty(x[0].size, np.float32)),
     lambda x: _tv(x, TF.gaussian_blur, [9, 9], [2.0, 2.0])),
    # solarize is fused into normalise: with mean 0 and std 1 normalising is the identity
    ("solarize", lambda x: ops.normalise(x, True, params.constants(PLAIN)[0]),
     lambda x: _tv(x, TF.solarize, 128 / 255)),
])
def test_kernel_matches_torchvision(photo, name, ours, theirs):
    expected = theirs(photo.copy())
    got = photo.copy()
    ours(got)
    assert np.abs(got - expected).max() < 2e-5, name


def _render(spec, keys, images, seed=0) -> np.ndarray:
    """The fused float op on decoded images: [N, V] flattened views."""
    table = params.constants(spec)
    dg, dl = ops.block_sizes(table)
    out = []
    for key, img in zip(keys, images):
        buf = np.empty(dg + dl, np.float32)
        ops.render_views(img, np.uint64(key), 0, 1, np.uint64(seed), table, buf, np.empty((0, 1), np.uint8),
                         _libffcv_jit()[1])
        g = buf[:dg].reshape(spec.global_views, -1)
        loc = buf[dg:].reshape(spec.local_views, -1)
        out.append([*g, *loc])
    return out


@pytest.fixture(scope="module")
def photos(imagenette) -> list[np.ndarray]:
    files = sorted((imagenette / "val").glob("*/*.jpg"))
    return [decode_rgb(f.read_bytes()) for f in files[::25][:40]]


@pytest.mark.parametrize("op, changes", [
    ("flip", {"flip_p": 0.5}),
    ("jitter", {"jitter_p": 0.8}),
    ("grayscale", {"grayscale_p": 0.2}),
    ("blur", {"blur_p": 0.5, "blur_sigma": (1.0, 2.0)}),  # sigma ~0.1 would be invisible
    ("solarize", {"solarize_p": 0.2, "solarize_threshold": 64}),  # a view with no pixel >= 64 is rare
])
def test_each_random_op_rate(photos, op, changes):
    """With every other op off, the share of views the op changed matches its probability."""
    base = SPEC.without_randomness()
    keys = params.make_key(5, np.arange(len(photos)))
    off = _render(base.replace(**{k: v for k, v in changes.items() if not k.endswith("_p")}), keys, photos)
    on = _render(base.replace(**changes), keys, photos)
    changed = [not np.array_equal(a, b) for va, vb in zip(on, off) for a, b in zip(va, vb)]
    p, n = next(v for k, v in changes.items() if k.endswith("_p")), len(changed)
    assert abs(np.mean(changed) - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1 / n, (op, np.mean(changed), n)


def test_view_parameters_follow_the_spec():
    """Crop boxes inside the image with area/ratio in range; factors within torchvision's ranges."""
    spec = SPEC_PRESETS["seed"]
    table = params.constants(spec)
    keys = params.make_key(0, np.arange(400))
    h, w = np.full(400, 160), np.full(400, 213)
    p = params.draw_batch(np.uint64(7), keys, h, w, table)
    assert (p[..., params.P_Y] >= 0).all() and (p[..., params.P_Y] + p[..., params.P_H] <= 160).all()
    assert (p[..., params.P_X] >= 0).all() and (p[..., params.P_X] + p[..., params.P_W] <= 213).all()
    area = p[..., params.P_H] * p[..., params.P_W] / (160 * 213)
    assert area[:, :2].min() > 0.29 and area[:, 2:].max() < 0.31
    assert 0.6 <= p[..., params.P_BRIGHT].min() and p[..., params.P_BRIGHT].max() <= 1.4
    assert np.abs(p[..., params.P_HUE]).max() <= 0.1
    assert sorted(p[0, 0, params.P_ORDER:params.P_ORDER + 4]) == [0, 1, 2, 3]
    again = params.draw_batch(np.uint64(7), keys, h, w, table)
    assert np.array_equal(p, again)  # a pure function of (seed, key, view)
    assert not np.array_equal(p, params.draw_batch(np.uint64(8), keys, h, w, table))


def test_gpu_colour_path_matches_fused_op(photos):
    """pipelines/ffcv_gpu.py (run here on CPU tensors; it is the CUDA path) == the fused numba op."""
    spec = SPEC.replace(jitter_p=0.8, grayscale_p=0.3, blur_p=0.5, solarize_p=0.3)
    table = params.constants(spec)
    dg, dl = ops.block_sizes(table)
    keys = params.make_key(2, np.arange(len(photos)))
    u8 = np.empty((len(photos) * (dg + dl), 1), np.uint8)
    f32 = np.empty(len(photos) * (dg + dl), np.float32)
    resize = _libffcv_jit()[1]
    for b, (key, img) in enumerate(zip(keys, photos)):
        ops.render_views(img, key, b, len(photos), np.uint64(1), table, np.empty(0, np.float32), u8, resize)
        ops.render_views(img, key, b, len(photos), np.uint64(1), table, f32, np.empty((0, 1), np.uint8), resize)
    from pipelines.ffcv_backend import split_views

    g8, l8 = split_views(torch.from_numpy(u8), len(photos), spec)
    gf, lf = split_views(torch.from_numpy(f32), len(photos), spec)
    heights = np.array([p.shape[0] for p in photos])
    widths = np.array([p.shape[1] for p in photos])
    drawn = torch.from_numpy(params.draw_batch(np.uint64(1), keys, heights, widths, table))
    assert drawn[..., params.P_GRAY].any() and drawn[..., params.P_BLUR].any() and drawn[..., params.P_SOLAR].any()
    g = augment_views(g8, drawn[:, :2], spec, spec.global_size)
    loc = augment_views(l8, drawn[:, 2:], spec, spec.local_size)
    diff = torch.cat([(g - gf).abs().flatten(), (loc - lf).abs().flatten()])
    # Equal to float rounding, except where a value sits within rounding of the solarize threshold and
    # the two sides decide differently: that jump is |1 - 2 * 128/255| / std < 0.02.
    assert (diff > 1e-4).float().mean() < 1e-4 and diff.max() < 0.02


@pytest.mark.slow  # builds a second FFCV pipeline (numba compile)
def test_device_colour_path_end_to_end(beton, loader0):
    """The CUDA pipeline (FFCV makes uint8 views, torch does the colour ops), run on CPU tensors through a
    real FFCV Loader, gives the fused loader's batches (ToDevice is the one step that needs a GPU)."""
    from pipelines.ffcv_backend import build

    torch_path = build(beton[0], SPEC, batch_size=8, device="cpu", rank=0, world_size=2, seed=3, num_workers=2,
                       colour_ops="torch")
    loader0.set_epoch(4)
    torch_path.set_epoch(4)
    for fused, split in zip(loader0, torch_path):
        assert np.array_equal(loader0.batch_indices, torch_path.batch_indices)
        for a, b in ((fused.global_views, split.global_views), (fused.local_views, split.local_views)):
            diff = (a - b).abs()
            assert (diff > 1e-4).float().mean() < 1e-4 and diff.max() < 0.02  # see the test above
    torch_path.close()


@pytest.mark.gpu
def test_ffcv_on_cuda_matches_the_fused_cpu_loader(beton, loader0):
    """On CUDA, both colour paths deliver every tensor on the GPU and the same views as the fused CPU
    loader: "auto" (uint8 views, ToDevice, torch colour ops on the GPU) and "fused" (CPU views, copied).
    Tolerances cover TF32 convolutions in the GPU blur."""
    from pipelines.ffcv_backend import build

    for colour_ops in ("auto", "fused"):
        on_gpu = build(beton[0], SPEC, batch_size=8, device="cuda", rank=0, world_size=2, seed=3, num_workers=2,
                       colour_ops=colour_ops)
        loader0.set_epoch(4)
        on_gpu.set_epoch(4)
        for cpu, dev in zip(loader0, on_gpu):
            assert dev.global_views.is_cuda and dev.local_views.is_cuda and dev.labels.is_cuda
            if colour_ops == "fused":  # copied without blocking from page-locked buffers
                assert torch.from_numpy(on_gpu._outputs.buffers[0]).is_pinned()
            assert np.array_equal(loader0.batch_indices, on_gpu.batch_indices)
            for a, b in ((cpu.global_views, dev.global_views), (cpu.local_views, dev.local_views)):
                diff = (a - b.cpu()).abs()
                assert diff.mean() < 2e-3 and diff.max() < 0.05, colour_ops
        on_gpu.close()


def test_ffcv_thread_makes_the_rank_device_current(loader0, monkeypatch):
    """FFCV's epoch thread starts on CUDA device 0; ours makes the loader's device current first (else
    every rank of a node would put a context on GPU 0). No GPU here: torch.cuda.set_device / device are
    replaced by recorders and the real FFCV thread runs the CPU pipeline; test_ffcv_on_cuda_* runs it on
    a GPU."""
    import contextlib
    import threading

    from pipelines.ffcv_backend import _epoch_iterator, _next_output

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((threading.current_thread(), d)))
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    loader0.close()
    loader0._keys.keys = params.make_key(0, np.arange(16))
    it = _epoch_iterator(loader0._loader, torch.device("cuda", 1))
    try:
        assert _next_output(it) is not None
        assert calls == [(it, torch.device("cuda", 1))]  # in FFCV's thread, before its first batch
    finally:
        it.terminate_event.set()
        while it.is_alive():
            while not it.output_queue.empty():
                it.output_queue.get_nowait()
            it.join(timeout=0.05)
        it.close()


@pytest.mark.slow  # torch.compile (inductor, C++) of the colour blocks: ~70 s on 2 cores
def test_compiled_colour_ops_equal_eager():
    from pipelines.ffcv_gpu import ColourOps, synthetic_views

    spec = SPEC_PRESETS["cpu-small"].replace(jitter_p=0.8, grayscale_p=0.3, blur_p=0.5, solarize_p=0.3)
    (g8, l8), drawn = synthetic_views(spec, 6, "cpu")
    eager = ColourOps(spec, "cpu").both(g8, l8, drawn)
    compiled = ColourOps(spec, "cpu", compiled=True).both(g8, l8, drawn)
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max() < 1e-4


def test_colour_plan_runs_each_jitter_op_once_in_its_drawn_position():
    """The host-side work list: per order position, one affine op (brightness (f,0,0), contrast (f,0,1-f),
    saturation (f,1-f,0), identity (1,0,0)) and the hue views; each jittered view meets each of its ops
    exactly once, at the position its order gives (the numba op's definition, tested against it above)."""
    from pipelines.ffcv_gpu import plan_group

    drawn = params.draw_batch(np.uint64(3), params.make_key(0, np.arange(64)), np.full(64, 160), np.full(64, 213),
                              params.constants(SPEC_PRESETS["seed"])).reshape(-1, params.NUM_PARAMS)
    plan = plan_group(drawn)
    n = len(drawn)
    coef = plan.floats[: 12 * n].reshape(4, n, 3)
    hue_rows = np.split(plan.ints[: sum(plan.hue_counts)], np.cumsum(plan.hue_counts)[:-1])
    jitter = drawn[:, params.P_JITTER] != 0
    assert jitter.any() and (~jitter).any()
    for v in range(n):
        order = drawn[v, params.P_ORDER:params.P_ORDER + 4].astype(int)
        for position in range(4):
            op = order[position] if jitter[v] else -1
            f = drawn[v, params.P_BRIGHT + op] if op in (0, 1, 2) else 1.0
            expected = {0: (f, 0, 0), 1: (f, 0, 1 - f), 2: (f, 1 - f, 0)}.get(op, (1, 0, 0))
            assert np.allclose(coef[position, v], expected, atol=1e-6), (v, position)
            assert (v in hue_rows[position]) == (op == 3 and drawn[v, params.P_HUE] != 0)
    blurred = plan.ints[sum(plan.hue_counts):]
    assert blurred.tolist() == np.flatnonzero(drawn[:, params.P_BLUR] != 0).tolist()


@pytest.mark.gpu
def test_device_colour_ops_make_no_host_sync():
    """ColourOps on CUDA, eager and compiled: set_sync_debug_mode("error") raises on any device->host
    sync; the parameters are uploaded from pinned memory without blocking."""
    from pipelines.ffcv_gpu import ColourOps, synthetic_views

    spec = SPEC_PRESETS["seed"]
    (g8, l8), drawn = synthetic_views(spec, 32, "cuda")
    for compiled in (False, True):
        ops = ColourOps(spec, "cuda", compiled=compiled)
        ops.both(g8, l8, drawn)  # compile, cuDNN plans
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            g, loc = ops.both(g8, l8, drawn)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cpu = ColourOps(spec, "cpu").both(g8.cpu(), l8.cpu(), drawn)
        for a, b in zip(cpu, (g, loc)):
            assert (a - b.cpu()).abs().mean() < 2e-3  # TF32 convolutions in the GPU blur


def test_importing_ffcv_through_us_keeps_torch_threads(beton):
    """ffcv's import sets torch.set_num_threads(1) -- a trainer would then run on one core."""
    code = ("import sys, torch\n"
            "torch.set_num_threads(2)\n"
            "from pipelines.ffcv_backend import open_beton\n"
            f"open_beton({str(beton[0])!r})\n"
            "assert 'ffcv' in sys.modules\n"
            "print(torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "2"


def test_modules_import_without_ffcv():
    """The project works without ffcv: our modules import, ffcv is only needed to build a loader."""
    code = ("import sys; sys.modules['ffcv'] = None\n"
            "import pipelines.ffcv_backend, pipelines.ffcv_gpu, pipelines.convert_ffcv, pipelines.ffcv_ops\n"
            "from pipelines import available; assert not available('ffcv')\n")
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)
