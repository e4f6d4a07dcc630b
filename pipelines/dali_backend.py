"""NVIDIA DALI backend: one pipeline definition for both devices.

- CUDA device: `fn.decoders.image(device="mixed")` (nvJPEG) decodes each image once; every crop, colour op,
  blur, solarize, normalise and the stacking of views runs on the GPU; the batch is handed to
  torch via DLPack, the training stream waiting on DALI's (no host copy, no copy at all).
- CPU device: the same graph; DALI picks each operator's CPU implementation from where its input lives.
  No GPU-only operator is used (grey = `hsv` with saturation 0, solarize = `lookup_table`).

Data and random choices come in through one `fn.external_source` fed from Python: the encoded bytes of the
samples that `sources.epoch_batches` assigns to this rank and step, and every per-view random parameter,
drawn with a vectorised counter-based generator from (seed, epoch, sample index, view). So shuffling,
sharding, drop_last, `set_epoch` and a
mid-epoch resume are exact and identical to the torchvision reference's order, and a sample's views do not
depend on the batch or step it lands in. The crop window follows torchvision's RandomResizedCrop sampling
exactly (needs the image size: parsed from the header, ~30 us).

Cost choices (CPU ms per image measured on 2 cores, see ../shared/DESIGN.md "Leads worth measuring"):
- decode once, cut 8 views from it;
- colour ops only on views that are jittered or greyed (DALI conditionals split the batch), and on the
  uint8 source crop *before* the resize whenever the crop is smaller than the view (local crops nearly
  always are), after the resize otherwise;
- Gaussian blur window 2*ceil(3 sigma)+1 (capped at torchvision's kernel size for the view, whose
  truncation it then reproduces), and, when the crop is upsampled to the view, applied to the source
  crop with sigma scaled by crop/view (blur and DALI's colour ops are linear per pixel, so the order is
  free; blur-then-upsample equals upsample-then-blur up to sampling);
- solarize as a conditional lookup table, only on the views that draw it;
- views stacked inside the graph ([B, V, 3, H, W] leaves DALI in one piece, zero-copy via DLPack: the
  dynamic executor never reuses an output buffer that torch still references).
Measured (CPU ms per source image, seed recipe, imagenette160, 2 busy cores): this graph 5.8 (4.1 of it
with every random op off; the Python feed is ~0.7 of that), the torchvision reference ~26-29.

Where DALI's colour maths differs from torchvision's (bounded in tests/test_pipelines.py):
- contrast pivots on the fixed mid-grey 128 (`brightness_contrast.contrast_center`) instead of the
  image's mean grey; brightness and contrast are applied in one op without the intermediate clamp;
- hue and saturation are one linear transform in a YIQ-like space (`fn.hsv`), not HSV, and always
  after brightness/contrast (torchvision applies the four jitters in a random order);
- greyscale (`hsv` saturation 0) keeps the luma Y = .299R + .587G + .114B, as torchvision does.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from pipelines.batch import Batch
from pipelines.sources import BadImage, check_encoded
from pipelines.sources import ShardedLoader
from pipelines.spec import MultiCropSpec

MAX_REPLACEMENTS = 16
# Per-view parameters fed to the graph, in this order (name, numpy dtype).
VIEW_PARAMS = (
    ("start", np.int32),  # crop top-left (y, x) in source pixels
    ("shape", np.int32),  # crop (h, w)
    ("color_first", np.bool_),  # jitter/grey needed and the crop is smaller than the view: colour, then resize
    ("color_after", np.bool_),  # jitter/grey needed and the crop is larger: resize, then colour
    ("jitter", np.bool_),
    ("brightness", np.float32),
    ("contrast", np.float32),
    ("hue", np.float32),  # degrees
    ("saturation", np.float32),  # 0 when the view is greyed
    ("blur_first", np.bool_),  # blurred and the crop is no larger than the view: blur at source scale
    ("blur_after", np.bool_),  # blurred, crop larger in some axis: blur the resized view
    ("sigma", np.float32),  # (sigma_y, sigma_x) in the pixels of whichever image is blurred
    ("window", np.int32),  # (window_y, window_x), odd
    ("solarize", np.bool_),
    ("flip", np.int32),  # crop_mirror_normalize's mirror
)


def used_params(spec: MultiCropSpec) -> tuple[tuple[str, type], ...]:
    """The VIEW_PARAMS the graph reads: ops with probability 0 get no branch and no inputs."""
    off = set()
    if spec.jitter_p == 0:
        off |= {"jitter", "brightness", "contrast"}
        if spec.grayscale_p == 0:
            off |= {"color_first", "color_after", "hue", "saturation"}
    if spec.blur_p == 0:
        off |= {"blur_first", "blur_after", "sigma", "window"}
    if spec.solarize_p == 0 or spec.solarize_threshold > 255:
        off.add("solarize")
    return tuple((n, t) for n, t in VIEW_PARAMS if n not in off)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a counter-based random generator."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices, views: int, slots: int) -> np.ndarray:
    """[B, views, slots] uniforms in [0, 1) that depend only on (seed, epoch, sample index, view, slot):
    a sample's choices do not depend on its batch, its position or the resume point. Vectorised, so a
    batch costs microseconds (the per-sample Generator it replaces cost ~70 us per view)."""
    key = _mix(_mix(np.full(1, seed, np.uint64)) ^ np.uint64(epoch))
    key = _mix(key ^ np.asarray(indices, np.uint64))[:, None]
    counter = np.arange(views * slots, dtype=np.uint64)[None, :]
    bits = _mix(key ^ _mix(counter + np.uint64(1)))
    return ((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(len(indices), views, slots)


TRIES = 10  # torchvision RandomResizedCrop: 10 tries, then a centre crop
SLOTS = 2 * TRIES + 2 + 5 + 5  # crop tries (area, ratio), crop position, 5 coins, 5 strengths


def draw_params(spec: MultiCropSpec, seed: int, epoch: int, indices, heights, widths) -> list[dict]:
    """Every random choice of every view of a batch (torchvision's probabilities and ranges), per view a
    dict name -> array [B, ...]. The crop follows torchvision's RandomResizedCrop.get_params exactly:
    the first of 10 (area, log-ratio) tries that fits, else a centre crop of the clamped ratio. Every draw
    is made whatever the probabilities, so switching one op off leaves the others' choices intact."""
    plan = view_plan(spec)
    n, nv = len(indices), len(plan)
    u = uniforms(seed, epoch, indices, nv, SLOTS)
    H = np.asarray(heights, np.float64)[:, None]
    W = np.asarray(widths, np.float64)[:, None]
    out = []
    lr = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for v, (size, (lo, hi)) in enumerate(plan):
        uv = u[:, v]
        area = H * W * (lo + (hi - lo) * uv[:, :TRIES])
        aspect = np.exp(lr[0] + (lr[1] - lr[0]) * uv[:, TRIES: 2 * TRIES])
        w = np.round(np.sqrt(area * aspect))  # round half to even, as Python's round()
        h = np.round(np.sqrt(area / aspect))
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        k = ok.argmax(1)[:, None]
        h, w, found = np.take_along_axis(h, k, 1)[:, 0], np.take_along_axis(w, k, 1)[:, 0], ok.any(1)
        Hs, Ws = H[:, 0], W[:, 0]
        in_ratio = Ws / Hs
        ch = np.where(in_ratio < spec.ratio[0], np.round(Ws / spec.ratio[0]), np.where(in_ratio > spec.ratio[1], Hs, Hs))
        cw = np.where(in_ratio < spec.ratio[0], Ws, np.where(in_ratio > spec.ratio[1], np.round(Hs * spec.ratio[1]), Ws))
        h, w = np.where(found, h, ch), np.where(found, w, cw)
        y = np.where(found, np.floor(uv[:, 2 * TRIES] * (Hs - h + 1)), (Hs - h) // 2)
        x = np.where(found, np.floor(uv[:, 2 * TRIES + 1] * (Ws - w + 1)), (Ws - w) // 2)
        coin = uv[:, 2 * TRIES + 2: 2 * TRIES + 7]
        b, c, sat, hue, sig = (uv[:, 2 * TRIES + 7 + j] for j in range(5))
        jitter, grey, blur = coin[:, 1] < spec.jitter_p, coin[:, 2] < spec.grayscale_p, coin[:, 3] < spec.blur_p

        def factor(strength: float, u01: np.ndarray) -> np.ndarray:  # torchvision: U[max(0, 1 - x), 1 + x]
            f0 = max(0.0, 1.0 - strength)
            return np.where(jitter, f0 + (1.0 + strength - f0) * u01, 1.0)

        sigma = spec.blur_sigma[0] + (spec.blur_sigma[1] - spec.blur_sigma[0]) * sig
        colour = jitter | grey
        small = h * w < size * size
        up = (h <= size) & (w <= size)
        # Blur window 2*ceil(3 sigma)+1, never wider than torchvision's kernel for the view (whose
        # truncation is then reproduced). When the crop is upsampled, blurring the crop with sigma scaled
        # by crop/view and then resizing equals (up to sampling) blurring the view, on fewer pixels.
        half = (spec.blur_kernel(size) - 1) // 2
        f_yx = np.stack([np.where(up, h / size, 1.0), np.where(up, w / size, 1.0)], 1)
        sig_yx = sigma[:, None] * f_yx
        win = 2 * np.minimum(np.ceil(3 * sig_yx), np.maximum(1, np.round(half * f_yx))) + 1
        out.append({
            "start": np.stack([y, x], 1), "shape": np.stack([h, w], 1),
            "color_first": colour & small, "color_after": colour & ~small, "jitter": jitter,
            "brightness": factor(spec.brightness, b), "contrast": factor(spec.contrast, c),
            "hue": np.where(jitter, spec.hue * (2 * hue - 1) * 360.0, 0.0),  # fraction of a turn -> degrees
            "saturation": np.where(grey, 0.0, factor(spec.saturation, sat)),
            "blur_first": blur & up, "blur_after": blur & ~up, "sigma": sig_yx, "window": win,
            "solarize": (coin[:, 4] < spec.solarize_p) & (spec.solarize_threshold <= 255),
            "flip": coin[:, 0] < spec.flip_p, "sigma_view": sigma,
        })
    return out


def view_plan(spec: MultiCropSpec) -> list[tuple[int, tuple[float, float]]]:
    return [(spec.global_size, spec.global_scale)] * spec.global_views + \
        [(spec.local_size, spec.local_scale)] * spec.local_views


def define_pipeline(spec: MultiCropSpec, source_cb, batch_size: int, num_threads: int, device_id: int | None,
                    gpu: bool, seed: int):
    """The one graph for both devices. `gpu` only changes where decoding happens (and so every op after)."""
    from nvidia.dali import fn, pipeline_def, types

    views = view_plan(spec)
    params = used_params(spec)
    n_out = 2 + len(views) * len(params)
    solarize_lut = [255 - v if v >= spec.solarize_threshold else v for v in range(256)]

    colour_on = spec.jitter_p > 0 or spec.grayscale_p > 0
    blur_on, solarize_on = spec.blur_p > 0, spec.solarize_p > 0 and spec.solarize_threshold <= 255

    def colour(img, p):
        if spec.jitter_p > 0 and p["jitter"]:
            img = fn.brightness_contrast(img, brightness=p["brightness"], contrast=p["contrast"],
                                         contrast_center=128.0)
        return fn.hsv(img, hue=p["hue"], saturation=p["saturation"])

    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id, seed=seed, prefetch_queue_depth=2, exec_dynamic=True)
    def multicrop():
        inputs = fn.external_source(source=source_cb, num_outputs=n_out, batch=True, batch_info=True)
        encoded, label = inputs[0], inputs[1]
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)
        outs = []
        for v, (size, _scale) in enumerate(views):
            p = dict(zip((n for n, _ in params), inputs[2 + v * len(params): 2 + (v + 1) * len(params)]))
            # Branches whose probability is 0 in the spec are not built at all (a conditional costs a
            # split and a merge of the batch even when no sample takes it).
            x = fn.slice(image, start=p["start"], shape=p["shape"], axis_names="HW")
            if blur_on and p["blur_first"]:  # blur and DALI's colour ops are linear per pixel: order is free
                x = fn.gaussian_blur(x, sigma=p["sigma"], window_size=p["window"])
            if colour_on and p["color_first"]:
                x = colour(x, p)
            x = fn.resize(x, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
            if colour_on and p["color_after"]:
                x = colour(x, p)
            if blur_on and p["blur_after"]:
                x = fn.gaussian_blur(x, sigma=p["sigma"], window_size=p["window"])
            if solarize_on and p["solarize"]:
                x = fn.lookup_table(x, keys=list(range(256)), values=solarize_lut, dtype=types.UINT8)
            outs.append(fn.crop_mirror_normalize(
                x, mirror=p["flip"], dtype=types.FLOAT, output_layout="CHW",
                mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std]))
        g = fn.stack(*outs[: spec.global_views])
        loc = fn.stack(*outs[spec.global_views:]) if spec.local_views else g
        if gpu:
            label = label.gpu()
        return g, loc, label

    return multicrop()


class DaliLoader(ShardedLoader):
    """Loader protocol (see pipelines/__init__.py) over one DALI pipeline, built once and reset per epoch."""

    def __init__(self, source, spec: MultiCropSpec, batch_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0, num_workers: int | None = None,
                 drop_last: bool = True):
        super().__init__(source, spec, batch_size, torch.device(device), rank, world_size, seed, epoch, drop_last)
        self.num_threads = max(1, num_workers if num_workers else min(os.cpu_count() or 1, 8))
        self.gpu = self.device.type == "cuda"
        self._pipe = None
        self._plan: list[np.ndarray] = []
        self._exhausted = True  # False while a pass is in flight: its prefetched batches would be stale

    # -- feeding -------------------------------------------------------------------------------------
    def _load(self, index: int) -> tuple[bytes, int, int, int]:
        """(plain encoded bytes, height, width, sample index actually used): bad files are replaced."""
        for k in range(MAX_REPLACEMENTS):
            i = (index + k) % len(self.source)
            try:
                data, h, w = check_encoded(self.source.read(i), self.source.name(i))
                return data, h, w, i
            except (BadImage, OSError) as e:
                self.bad_files.add(self.source.name(i), str(e))
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive unreadable images in {self.source.root!r} from {index}")

    def _feed(self, info):
        """external_source callback: the batch for iteration `info.iteration` of the current plan."""
        if info.iteration >= len(self._plan):
            raise StopIteration
        indices = self._plan[info.iteration]
        encoded, labels, heights, widths = [], [], [], []
        for index in indices:
            data, h, w, used = self._load(int(index))
            encoded.append(np.frombuffer(data, np.uint8))
            labels.append(self.source.labels[used])
            heights.append(h)
            widths.append(w)
        out = [encoded, np.asarray(labels, np.int64)]
        for p in draw_params(self.spec, self.seed, self.epoch_in_flight, indices, heights, widths):
            out += [np.ascontiguousarray(p[name], dtype) for name, dtype in used_params(self.spec)]
        return tuple(out)

    # -- iteration -----------------------------------------------------------------------------------
    def _build(self):
        gpu_id = (self.device.index or 0) if self.gpu else None
        pipe = define_pipeline(self.spec, self._feed, self.batch_size, self.num_threads, gpu_id, self.gpu, self.seed)
        pipe.build()
        return pipe

    def _to_torch(self, out) -> torch.Tensor:
        # The views were stacked in the graph: one contiguous tensor per output. On the GPU, torch passes
        # its current stream to __dlpack__, so the training stream waits for DALI's work (no host sync).
        return torch.from_dlpack(out.as_tensor())

    def __iter__(self):
        self._plan = self.next_pass()
        self.epoch_in_flight = self.epoch
        if self._pipe is None or not self._exhausted:
            self._pipe = None  # a pass left mid-way holds stale prefetched batches: rebuild (~1.5 s)
            self._pipe = self._build()
        self._exhausted = False
        while True:
            try:
                outs = self._pipe.run()
            except StopIteration:
                self._pipe.reset()
                self._exhausted = True
                return
            # Dynamic executor: outputs are reference-counted, so DLPack hands the stacked views to torch
            # without a copy and DALI will not reuse that memory while the tensor lives.
            tensors = [self._to_torch(out) for out in outs]
            g, loc, labels = tensors
            if not self.spec.local_views:
                s = self.spec.local_size
                loc = torch.empty(g.shape[0], 0, 3, s, s, device=self.device)
            yield Batch(g, loc, labels)


def build(source, spec: MultiCropSpec, *, batch_size: int, device, rank: int = 0, world_size: int = 1,
          seed: int = 0, epoch: int = 0, num_workers: int | None = None, drop_last: bool = True):
    return DaliLoader(source, spec, batch_size, device, rank, world_size, seed, epoch, num_workers, drop_last)
