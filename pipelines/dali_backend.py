"""NVIDIA DALI backend: one pipeline definition for both devices.

- CUDA device: `fn.decoders.image(device="mixed")` (nvJPEG) decodes each image once; every crop, colour op,
  blur, solarize, normalise and the stacking of views runs on the GPU; the batch is handed to
  torch via DLPack, the training stream waiting on DALI's (no host copy, no copy at all).
- CPU device: the same graph; DALI picks each operator's CPU implementation from where its input lives.
  No GPU-only operator is used (grey = `hsv` with saturation 0, solarize = `lookup_table`).

Data and random choices come in through one `fn.external_source` fed from Python: the encoded bytes and
labels of the samples that `sources.epoch_batches` assigns to this rank and step, and three small arrays
per sample (int32 [V, NUM_INTS], float32 [V, NUM_FLOATS], bool [V, NUM_FLAGS]) that the graph slices
per view. `graph_args` derives them, vectorised, from the common per-view parameters of
pipelines/params.py (the sampler every backend reads; it needs the image size: parsed from the header,
~30 us). So shuffling, sharding, drop_last, `set_epoch` and a mid-epoch resume are exact, the order and
the random choices are the torchvision reference's, and a sample's views do not depend on the batch or
step it lands in. (DALI's operator arguments are typed: a slice window or a mirror flag must be an
integer tensor, a branch predicate a boolean one, hence three arrays rather than one.)

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

Where DALI's colour maths differs from torchvision's (bounded in tests/test_pipelines.py and
tests/test_cross_backend.py):
- contrast pivots on the fixed mid-grey 128 (`brightness_contrast.contrast_center`) instead of the
  image's mean grey; brightness and contrast are applied in one op without the intermediate clamp;
- hue and saturation are one linear transform in a YIQ-like space (`fn.hsv`), not HSV, and always
  after brightness/contrast (the drawn order P_ORDER is not followed);
- greyscale (`hsv` saturation 0) keeps the luma Y = .299R + .587G + .114B, as torchvision does;
- resize is DALI's antialiased linear filter (torchvision: PIL's antialiased bilinear), and the blur
  window is the one above.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch

from pipelines.batch import Batch
from pipelines.params import (
    P_BLUR, P_BRIGHT, P_CONTRAST, P_FLIP, P_GRAY, P_H, P_HUE, P_JITTER, P_SAT, P_SIGMA, P_SOLAR, P_W, P_X, P_Y,
    sample_views,
)
from pipelines.sources import ShardedLoader, check_encoded, read_replacing_bad
from pipelines.spec import MultiCropSpec

# The graph's per-view arguments (`graph_args`), one array per dtype. Columns:
I_START, I_SHAPE = slice(0, 2), slice(2, 4)  # int32: crop top-left (y, x) and (h, w) in source pixels
I_WINDOW, I_FLIP = slice(4, 6), 6  # blur window (y, x), odd; crop_mirror_normalize's mirror
NUM_INTS = 7
F_BRIGHT, F_CONTRAST, F_HUE, F_SAT = 0, 1, 2, 3  # float32: 1, 1, 0, 1 when not jittered; hue in degrees;
F_SIGMA = slice(4, 6)  # saturation 0 greys; blur sigma (y, x) in the pixels of whichever image is blurred
NUM_FLOATS = 6
B_JITTER = 0  # bool branch predicates: brightness/contrast applies
B_COLOUR_FIRST = 1  # jitter or grey, and the crop has fewer pixels than the view: colour, then resize
B_COLOUR_AFTER = 2  # jitter or grey, and the crop is larger: resize, then colour
B_BLUR_FIRST = 3  # blurred, and the crop is no larger than the view: blur at source scale
B_BLUR_AFTER = 4  # blurred, and the crop is larger in some axis: blur the resized view
B_SOLAR = 5
NUM_FLAGS = 6


@functools.lru_cache(maxsize=64)
def _view_sizes(spec: MultiCropSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per view: the output side and half of torchvision's blur kernel, as float arrays (once per spec)."""
    return (np.array([view.size for view in spec.views], np.float64),
            np.array([(view.blur_kernel - 1) // 2 for view in spec.views], np.float64))


def graph_args(spec: MultiCropSpec, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Common parameters [B, V, P] (pipelines/params.py) -> the graph's int32 [B, V, NUM_INTS],
    float32 [B, V, NUM_FLOATS] and bool [B, V, NUM_FLAGS] arguments (vectorised: microseconds)."""
    size, half = _view_sizes(spec)
    h, w = params[..., P_H], params[..., P_W]
    jitter, grey, blur = params[..., P_JITTER] != 0, params[..., P_GRAY] != 0, params[..., P_BLUR] != 0
    colour = jitter | grey
    small = h * w < size * size
    up = (h <= size) & (w <= size)
    # Blur window 2*ceil(3 sigma)+1, never wider than torchvision's kernel for the view (whose truncation
    # is then reproduced). When the crop is upsampled, blurring the crop with sigma scaled by crop/view and
    # then resizing equals (up to sampling) blurring the view, on fewer pixels.
    f_y, f_x = np.where(up, h / size, 1.0), np.where(up, w / size, 1.0)
    sigma = params[..., P_SIGMA]
    window = [2 * np.minimum(np.ceil(3 * sigma * f), np.maximum(1, np.round(half * f))) + 1 for f in (f_y, f_x)]
    ints = np.stack([params[..., P_Y], params[..., P_X], h, w, *window, params[..., P_FLIP]], -1).astype(np.int32)
    floats = np.stack([
        np.where(jitter, params[..., P_BRIGHT], 1.0), np.where(jitter, params[..., P_CONTRAST], 1.0),
        np.where(jitter, params[..., P_HUE] * 360.0, 0.0),  # a fraction of a turn -> degrees
        np.where(grey, 0.0, np.where(jitter, params[..., P_SAT], 1.0)),
        sigma * f_y, sigma * f_x,
    ], -1).astype(np.float32)
    flags = np.stack([jitter, colour & small, colour & ~small, blur & up, blur & ~up, params[..., P_SOLAR] != 0], -1)
    return ints, floats, flags


def define_pipeline(spec: MultiCropSpec, source_cb, batch_size: int, num_threads: int, device_id: int | None,
                    gpu: bool, seed: int):
    """The one graph for both devices. `gpu` only changes where decoding happens (and so every op after)."""
    from nvidia.dali import fn, pipeline_def, types

    solarize_lut = [255 - v if v >= spec.solarize_threshold else v for v in range(256)]
    on = spec.enabled_ops
    colour_on = "jitter" in on or "grayscale" in on

    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id, seed=seed, prefetch_queue_depth=2, exec_dynamic=True)
    def multicrop():
        encoded, label, ints, floats, flags = fn.external_source(source=source_cb, num_outputs=5, batch=True,
                                                                 batch_info=True)
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False)

        def colour(img, v):
            if "jitter" in on and flags[v, B_JITTER]:
                img = fn.brightness_contrast(img, brightness=floats[v, F_BRIGHT],
                                             contrast=floats[v, F_CONTRAST], contrast_center=128.0)
            return fn.hsv(img, hue=floats[v, F_HUE], saturation=floats[v, F_SAT])

        def blur(img, v):
            return fn.gaussian_blur(img, sigma=floats[v, F_SIGMA], window_size=ints[v, I_WINDOW])

        outs = []
        for v, view in enumerate(spec.views):
            # Branches of ops the spec switches off are not built at all (a conditional costs a split and
            # a merge of the batch even when no sample takes it).
            x = fn.slice(image, start=ints[v, I_START], shape=ints[v, I_SHAPE], axis_names="HW")
            if "blur" in on and flags[v, B_BLUR_FIRST]:  # blur and DALI's colour ops are linear: order is free
                x = blur(x, v)
            if colour_on and flags[v, B_COLOUR_FIRST]:
                x = colour(x, v)
            x = fn.resize(x, resize_x=view.size, resize_y=view.size, interp_type=types.INTERP_LINEAR, antialias=True)
            if colour_on and flags[v, B_COLOUR_AFTER]:
                x = colour(x, v)
            if "blur" in on and flags[v, B_BLUR_AFTER]:
                x = blur(x, v)
            if "solarize" in on and flags[v, B_SOLAR]:
                x = fn.lookup_table(x, keys=list(range(256)), values=solarize_lut, dtype=types.UINT8)
            outs.append(fn.crop_mirror_normalize(
                x, mirror=ints[v, I_FLIP], dtype=types.FLOAT, output_layout="CHW",
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
    def _feed(self, info):
        """external_source callback: the batch for iteration `info.iteration` of the current plan."""
        if info.iteration >= len(self._plan):
            raise StopIteration
        indices = self._plan[info.iteration]
        encoded, labels, heights, widths = [], [], [], []
        for index in indices:
            (data, h, w), used = read_replacing_bad(self.source, int(index), check_encoded, self.bad_files.add)
            encoded.append(np.frombuffer(data, np.uint8))
            labels.append(self.source.labels[used])
            heights.append(h)
            widths.append(w)
        # A replaced sample keeps the random choices of its slot (index), drawn for the image it shows.
        params = sample_views(self.spec, self.seed, self.epoch_in_flight, indices, heights, widths)
        return (encoded, np.asarray(labels, np.int64), *graph_args(self.spec, params))

    # -- iteration -----------------------------------------------------------------------------------
    def _build(self):
        gpu_id = (self.device.index or 0) if self.gpu else None
        pipe = define_pipeline(self.spec, self._feed, self.batch_size, self.num_threads, gpu_id, self.gpu, self.seed)
        with warnings.catch_warnings():  # a recipe with some ops off leaves an argument array unread (a few bytes)
            warnings.filterwarnings("ignore", message="The external source node .* not used")
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
