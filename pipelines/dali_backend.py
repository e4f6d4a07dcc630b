"""NVIDIA DALI backend: one pipeline definition for both devices.

- CUDA device: `fn.decoders.image(device="mixed")` (nvJPEG; on A100/H100 a share `hw_decoder_load` of the
  images goes to the hardware JPEG decoder) decodes each image once; every crop, colour op, blur, solarize,
  normalise and the stacking of views runs on the GPU; the batch is handed to torch via DLPack, bound to
  the training stream, which waits for DALI's work (no host sync, no host copy, no copy at all).
- CPU device: the same graph; DALI picks each operator's CPU implementation from where its input lives.
  No GPU-only operator is used.

The feed (`Feed`): the encoded bytes and labels of the samples that `sources.epoch_batches` assigns to this
rank and step, and three small arrays per sample (int32 [V, NUM_INTS], float32 [V, NUM_FLOATS], bool
[V, NUM_FLAGS]) that the graph slices per view, come in through one `fn.external_source`. A thread
prepares them ahead of the pipeline, off the training thread: it reads the samples
(`sources.read_replacing_bad` with `check_encoded`: bytes a plain RGB decoder accepts, and the image size
from the header), draws every view's parameters with the sampler all backends share (pipelines/params.py)
and derives the graph's arguments from them (`graph_args`, vectorised). The DALI callback only takes the next prepared step from
a queue. Every step is a pure function of (seed, epoch, step), so running ahead changes nothing: shuffling,
sharding, drop_last, `set_epoch` and a mid-epoch resume are exact, the order and the random choices are
the torchvision reference's, and a sample's views do not depend on the batch or step it lands in. (DALI's
operator arguments are typed: a slice window must be an integer tensor, a branch predicate a boolean one,
hence three arrays rather than one.)

The feed reads its steps from a *sample provider*: any iterator of `Step` (the step's checked encoded
samples, labels, the sampler key of each sample, image sizes, and the position a checkpoint taken after
that step records). `indexed_steps` is the provider of indexed sources (ImageFolder, tar shards read by
offset); `stream_steps` that of a streamed source (a `ShardStream`'s batches in stream order, its sample ids
as keys; the stream's position is kept by `sources.StreamedLoader`). `DaliLoader.position` is the position
of the last batch handed to the trainer (DALI returns batches in the order it was fed them), not the
provider's, which runs ahead.

Cost choices (CPU time per image on 2 cores, see ../shared/DESIGN.md "Leads worth measuring"; the resize
is now about a third of it, blur a fifth):
- decode once, cut 8 views from it;
- colour ops only on views that are jittered or greyed (a DALI conditional splits the batch), on the
  uint8 source crop *before* the resize whenever the crop is smaller than the view (local crops nearly
  always are), after it otherwise; `hsv` with float output, then `brightness_contrast` back to uint8:
  DALI's uint8 `hsv` rounds every value through a libm call (over twice the cost of its float output), and a
  non-jittered view gets identity arguments instead of another branch;
- Gaussian blur window 2*ceil(3 sigma)+1 (capped at torchvision's kernel size for the view, whose
  truncation it then reproduces), and, when the crop is upsampled to the view, applied to the source
  crop with sigma scaled by crop/view (blur and DALI's colour ops are linear per pixel, so the order is
  free; blur-then-upsample equals upsample-then-blur up to sampling);
- solarize as a conditional lookup table, only on the views that draw it;
- views stay uint8 to the end: the mirror is the resize's (a reversed window), each group of views is
  stacked in uint8 and normalised once ([B, V, 3, H, W] float leaves DALI in one piece, zero-copy via
  DLPack: the dynamic executor never reuses an output buffer that torch still references).
- on the CPU, one-thread copies of the graph side by side, taking the steps in turn (`_DaliPasses`): one
  pipeline runs an operator at a time and each waits for its slowest sample, which kept 1.7 of 2 cores
  busy; side by side they keep ~1.95 busy (+21 % images/s on 2 cores).
Measured on imagenette160, seed recipe, 2 loaded cores: ~4.5 ms of CPU per source image, 4-8 % less than
the graph before the float `hsv` and uint8 stacking (interleaved A/B, minimum of 6-8 runs; callgrind: 3 %
fewer instructions, the rest is memory traffic); the torchvision reference ~28. What remains is DALI's
kernels (perf, one thread): resize ~28 % of the CPU, blur ~12 %, colour ~11 %, normalise + stack ~12 %,
float-to-uint8 rounding through libm ~5 %, DALI's executor ~11 %, decoding only ~2 % at 160 px.

Where DALI's colour maths differs from torchvision's (bounded in tests/test_pipelines.py and
tests/test_cross_backend.py):
- contrast pivots on the fixed mid-grey 128 (`brightness_contrast.contrast_center`) instead of the
  image's mean grey;
- hue and saturation are one linear transform in a YIQ-like space (`fn.hsv`), not HSV; with brightness
  and contrast it makes one affine colour transform (the drawn order P_ORDER is not followed), clamped
  to [0, 255] and rounded once at its end rather than after each op;
- greyscale (`hsv` saturation 0) keeps the luma Y = .299R + .587G + .114B, as torchvision does;
- resize is DALI's antialiased linear filter (torchvision: PIL's antialiased bilinear), and the blur
  window is the one above.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import queue
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

from pipelines.batch import Batch, batch_device
from pipelines.params import (
    P_BLUR, P_BRIGHT, P_CONTRAST, P_FLIP, P_GRAY, P_H, P_HUE, P_JITTER, P_SAT, P_SIGMA, P_SOLAR, P_W, P_X, P_Y,
    sample_views,
)
from pipelines.sources import (
    ShardedLoader, StreamedLoader, check_encoded, decode_batch_replacing_bad, read_replacing_bad,
)
from pipelines.spec import MultiCropSpec
from pipelines.streaming import ShardStream
from pipelines.threads import cpus_per_rank

# The graph's per-view arguments (`graph_args`), one array per dtype. Columns:
I_START, I_SHAPE = slice(0, 2), slice(2, 4)  # int32: crop top-left (y, x) and (h, w) in source pixels
I_WINDOW = slice(4, 6)  # blur window (y, x), odd
NUM_INTS = 6
F_BRIGHT, F_CONTRAST, F_HUE, F_SAT = 0, 1, 2, 3  # float32: 1, 1, 0, 1 when not jittered; hue in degrees;
F_SIGMA = slice(4, 6)  # saturation 0 greys; blur sigma (y, x) in the pixels of whichever image is blurred
F_ROI_START, F_ROI_END = slice(6, 8), slice(8, 10)  # the resize's window (y, x) in the crop: (0, 0) to
NUM_FLOATS = 10  # (h, w), or (0, w) to (h, 0) to mirror the view
B_COLOUR_FIRST = 0  # jitter or grey, and the crop has fewer pixels than the view: colour, then resize
B_COLOUR_AFTER = 1  # jitter or grey, and the crop is larger: resize, then colour
B_BLUR_FIRST = 2  # blurred, and the crop is no larger than the view in either axis: blur at source scale
B_BLUR_AFTER = 3  # blurred, and the crop is larger in some axis: blur the resized view
B_SOLAR = 4
NUM_FLAGS = 5

# CPU graphs side by side, one thread each, at most (`_DaliPasses`): each holds ~400 MB at batch 64.
MAX_CPU_PIPELINES = 8


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
    ints = np.stack([params[..., P_Y], params[..., P_X], h, w, *window], -1).astype(np.int32)
    flip, zero = params[..., P_FLIP] != 0, np.zeros_like(h)
    floats = np.stack([
        np.where(jitter, params[..., P_BRIGHT], 1.0), np.where(jitter, params[..., P_CONTRAST], 1.0),
        np.where(jitter, params[..., P_HUE] * 360.0, 0.0),  # a fraction of a turn -> degrees
        np.where(grey, 0.0, np.where(jitter, params[..., P_SAT], 1.0)),
        sigma * f_y, sigma * f_x,
        zero, np.where(flip, w, 0.0), h, np.where(flip, 0.0, w),
    ], -1).astype(np.float32)
    flags = np.stack([colour & small, colour & ~small, blur & up, blur & ~up, params[..., P_SOLAR] != 0], -1)
    return ints, floats, flags


# ---- the feed --------------------------------------------------------------------------------------------
class Step(NamedTuple):
    """One step's samples as a sample provider hands them to the `Feed`."""

    encoded: list  # per sample, uint8 arrays of bytes a plain RGB decoder accepts (sources.check_encoded)
    labels: np.ndarray  # int64 [B], -1 where unlabelled
    keys: np.ndarray  # int [B]: the sampler's sample index of each (pipelines/params.py)
    heights: np.ndarray  # int [B]: image sizes, which the crop windows are drawn for
    widths: np.ndarray
    position: object  # what a checkpoint taken after this step records


def indexed_steps(source, plan: list[np.ndarray], first_step: int, on_bad) -> Iterator[Step]:
    """The sample provider of an indexed source (`sources.Source`): the steps of `plan`, the first being
    step `first_step` of the epoch; a step's position is the index of the step after it. An unreadable
    image is replaced (`read_replacing_bad`); the replacement keeps its slot's key (its random choices),
    drawn for the image it shows."""
    for step, indices in enumerate(plan, first_step):
        encoded, labels, heights, widths = [], [], [], []
        for index in indices:
            (data, h, w), used = read_replacing_bad(source, int(index), check_encoded, on_bad)
            encoded.append(np.frombuffer(data, np.uint8))
            labels.append(source.labels[used])
            heights.append(h)
            widths.append(w)
        yield Step(encoded, np.asarray(labels, np.int64), np.asarray(indices), np.asarray(heights),
                   np.asarray(widths), step + 1)


_END = object()


class Feed:
    """The graph's inputs, prepared on a daemon thread up to `depth` steps ahead of the pipelines.

    `steps` is a sample provider (an iterator of `Step`); the thread draws each step's view parameters
    (`sample_views` at `epoch`) and packs them (`graph_args`). Step i goes to pipeline i % `outputs` (the loader
    runs its pipelines in turn, so batches come back in step order). The DALI external_source callback of
    pipeline k (`take`, via `source(k)`, on whichever thread runs that pipeline) only takes k's next prepared step, and
    records its position in `positions[k]` (FIFO: a pipeline returns batches in the order it was fed). An
    error in the thread is raised by the callbacks; `close()` stops the thread (a pass left mid-way)."""

    def __init__(self, steps: Iterator[Step], spec: MultiCropSpec, seed: int, epoch: int, depth: int = 4,
                 outputs: int = 1):
        self.spec, self.seed, self.epoch = spec, seed, epoch
        self.positions = [collections.deque() for _ in range(outputs)]
        self._queues = [queue.Queue(depth) for _ in range(outputs)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(steps,), daemon=True, name="dali-feed")
        self._thread.start()

    def _run(self, steps: Iterator[Step]) -> None:
        queues = self._queues
        try:
            for i, step in enumerate(steps):
                params = sample_views(self.spec, self.seed, self.epoch, step.keys, step.heights, step.widths)
                inputs = (step.encoded, step.labels, *graph_args(self.spec, params))
                if not self._put(queues[i % len(queues)], (inputs, step.position)):
                    return
            end = _END
        except BaseException as e:  # noqa: BLE001 - raised again by the callbacks, on the pipelines' threads
            end = e
        for q in queues:  # every pipeline learns of the end (or the error) after its last step
            self._put(q, end)

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def source(self, k: int = 0):
        """The external_source callback of pipeline k (DALI wants a callable of one positional argument)."""
        return lambda info=None: self.take(k, info)

    def take(self, k: int, info=None):
        q = self._queues[k]
        while True:
            try:
                item = q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and q.empty():
                    raise RuntimeError("the DALI feed thread ended without a result") from None
        if item is _END:
            q.put(_END)  # DALI may ask again after the end (prefetch): answer the same
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        inputs, position = item
        self.positions[k].append(position)
        return inputs

    def close(self) -> None:
        self._stop.set()


# ---- the graph -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderOptions:
    """Knobs of the `mixed` (GPU) JPEG decoder, passed to `fn.decoders.image`; the CPU graph ignores them.
    `pipelines.build_loader(..., decoder=DecoderOptions(...))`; `benchmarks/gpu_check.py` measures them."""

    hw_decoder_load: float = 0.65  # share of the images sent to the A100/H100 hardware decoder (DALI's default)
    preallocate_width_hint: int = 0  # largest image expected, for the hardware decoder's buffers (0: none)
    preallocate_height_hint: int = 0
    device_memory_padding: int = 16 << 20  # nvJPEG's device / pinned host buffers, preallocated per thread
    host_memory_padding: int = 8 << 20
    # DALI's default (True) pins each decoder thread to a core picked from the GPU's affinity, which ignores
    # this rank's share of the node (SLURM binding, several ranks per node): let the OS place them.
    affine: bool = False


def define_pipeline(spec: MultiCropSpec, source_cb, batch_size: int, num_threads: int, device_id: int | None,
                    gpu: bool, seed: int, decoder: DecoderOptions = DecoderOptions()):
    """The one graph for both devices. `gpu` only changes where decoding happens (and so every op after)."""
    from nvidia.dali import fn, pipeline_def, types

    on = spec.enabled_ops
    colour_on = "jitter" in on or "grayscale" in on

    solarize_lut = [255 - v if v >= spec.solarize_threshold else v for v in range(256)]

    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id, seed=seed, prefetch_queue_depth=2, exec_dynamic=True)
    def multicrop():
        encoded, label, ints, floats, flags = fn.external_source(source=source_cb, num_outputs=5, batch=True,
                                                                 batch_info=True)
        mixed = asdict(decoder) if gpu else {}
        image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                  adjust_orientation=False, **mixed)

        def colour(img, v):
            img = fn.hsv(img, hue=floats[v, F_HUE], saturation=floats[v, F_SAT], dtype=types.FLOAT)
            return fn.brightness_contrast(img, brightness=floats[v, F_BRIGHT], contrast=floats[v, F_CONTRAST],
                                          contrast_center=128.0, dtype=types.UINT8)

        def blur(img, v):
            return fn.gaussian_blur(img, sigma=floats[v, F_SIGMA], window_size=ints[v, I_WINDOW])

        views = []
        for v, view in enumerate(spec.views):
            # Branches of ops the spec switches off are not built at all (a conditional costs a split and
            # a merge of the batch even when no sample takes it).
            x = fn.slice(image, start=ints[v, I_START], shape=ints[v, I_SHAPE], axis_names="HW")
            if colour_on and flags[v, B_COLOUR_FIRST]:
                x = colour(x, v)
            if "blur" in on and flags[v, B_BLUR_FIRST]:  # blur and DALI's colour ops are linear: order is free
                x = blur(x, v)
            x = fn.resize(x, size=[view.size, view.size], roi_start=floats[v, F_ROI_START],
                          roi_end=floats[v, F_ROI_END], interp_type=types.INTERP_LINEAR, antialias=True)
            if colour_on and flags[v, B_COLOUR_AFTER]:
                x = colour(x, v)
            if "blur" in on and flags[v, B_BLUR_AFTER]:
                x = blur(x, v)
            if "solarize" in on and flags[v, B_SOLAR]:
                x = fn.lookup_table(x, keys=list(range(256)), values=solarize_lut, dtype=types.UINT8)
            views.append(x)

        def normalise(group):  # uint8 [V, H, W, 3] -> float [V, 3, H, W]
            return fn.crop_mirror_normalize(fn.stack(*group, axis_name="F"), dtype=types.FLOAT, output_layout="FCHW",
                                            mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std])

        g = normalise(views[: spec.global_views])
        loc = normalise(views[spec.global_views:]) if spec.local_views else g
        if gpu:
            label = label.gpu()
        return g, loc, label

    return multicrop()


class _DaliPasses:
    """The DALI side of a loader, shared by the indexed and the streamed one: its pipelines, built once and
    reset per pass, fed by one `Feed` over a sample provider.

    On the GPU one pipeline does the work (the device runs the ops). On the CPU, `pipelines` copies of the
    graph with one thread each take the steps in turn (why: the module docstring's cost choices), ~400 MB
    each at batch 64. Batches still come back in step order, so every step stays a pure function of (seed,
    epoch, step) whatever the count."""

    def _init_dali(self, num_workers: int | None, decoder: DecoderOptions | None, feed_depth: int,
                   pipelines: int | None) -> None:
        threads = num_workers if num_workers and num_workers > 0 else cpus_per_rank()
        self.gpu = self.device.type == "cuda"
        if pipelines is not None and pipelines < 1:
            raise ValueError(f"pipelines={pipelines}: need at least 1")
        self.num_pipelines = 1 if self.gpu else min(pipelines or MAX_CPU_PIPELINES, threads)
        self.num_threads = max(1, threads // self.num_pipelines)  # per pipeline
        self.decoder = decoder or DecoderOptions()
        self.feed_depth = feed_depth
        self._pipes: list = []
        self._feed: Feed | None = None
        self._exhausted = True  # False while a pass is in flight: its prefetched batches would be stale

    def _build(self, k: int):
        gpu_id = self.device.index if self.gpu else None
        # The pipeline keeps this callback for its life; it reads whichever feed the current pass has.
        pipe = define_pipeline(self.spec, lambda info: self._feed.take(k, info), self.batch_size,
                               self.num_threads, gpu_id, self.gpu, self.seed, self.decoder)
        with warnings.catch_warnings():  # a recipe with some ops off leaves an argument array unread (a few bytes)
            warnings.filterwarnings("ignore", message="The external source node .* not used")
            pipe.build()
        return pipe

    def _to_torch(self, out) -> torch.Tensor:
        # The views were stacked in the graph: one contiguous tensor per output. On the GPU, torch passes
        # its current stream to __dlpack__, so the training stream waits for DALI's work (no host sync).
        return torch.from_dlpack(out.as_tensor())

    def _passes(self, steps: Iterator[Step], epoch: int):
        """One pass over `steps` (a sample provider): (Batch, position) in step order, the position being what
        the provider gave that step."""
        if self._feed is not None:
            self._feed.close()
        if not self._pipes or not self._exhausted:
            self._pipes = []  # a pass left mid-way holds stale prefetched batches: rebuild (~1.5 s each)
            self._pipes = [self._build(k) for k in range(self.num_pipelines)]
        self._feed = feed = Feed(steps, self.spec, self.seed, epoch, self.feed_depth, self.num_pipelines)
        self._exhausted = False
        try:
            for k in itertools.cycle(range(self.num_pipelines)):  # step i is pipeline i % num_pipelines's
                try:
                    # On the GPU the outputs are bound to the training stream (it waits for DALI's work); without
                    # a stream, run() would block the host until the batch is computed, every step.
                    outs = self._pipes[k].run(torch.cuda.current_stream(self.device) if self.gpu else None)
                except StopIteration:
                    # No step here means no step anywhere after it: the others have delivered all theirs and
                    # answer StopIteration too; each is reset for the next pass.
                    for j, pipe in enumerate(self._pipes):
                        if j != k:
                            with contextlib.suppress(StopIteration):
                                pipe.run()
                        pipe.reset()
                    self._exhausted = True
                    return
                # Dynamic executor: outputs are reference-counted, so DLPack hands the stacked views to torch
                # without a copy and DALI will not reuse that memory while the tensor lives.
                g, loc, labels = [self._to_torch(out) for out in outs]
                if not self.spec.local_views:
                    s = self.spec.local_size
                    loc = torch.empty(g.shape[0], 0, 3, s, s, device=self.device)
                yield Batch(g, loc, labels), feed.positions[k].popleft()
        finally:  # also when the consumer drops the pass mid-way: stop reading ahead
            feed.close()


class DaliLoader(_DaliPasses, ShardedLoader):
    """Loader protocol (see pipelines/__init__.py) over DALI pipelines and an indexed source."""

    def __init__(self, source, spec: MultiCropSpec, batch_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0, num_workers: int | None = None,
                 drop_last: bool = True, decoder: DecoderOptions | None = None, feed_depth: int = 4,
                 pipelines: int | None = None):
        ShardedLoader.__init__(self, source, spec, batch_size, batch_device(device), rank, world_size, seed, epoch,
                               drop_last)
        self._init_dali(num_workers, decoder, feed_depth, pipelines)
        self.position = None  # the position (see Step) of the last batch handed out

    def __iter__(self):
        first = self.start_step
        plan = self.next_pass()
        for batch, self.position in self._passes(indexed_steps(self.source, plan, first, self.bad_files.add),
                                                 self.epoch):
            yield batch


def stream_steps(batches, on_bad) -> Iterator[Step]:
    """The sample provider of a streamed source: `StreamedLoader.next_pass()` batches in stream order. A
    sample whose bytes do not decode is replaced within its batch (`decode_batch_replacing_bad`); every slot
    keeps its own sample id as its key (its random choices). Positions are the StreamedLoader's (None here)."""
    for samples in batches:
        checked, used = decode_batch_replacing_bad([(s.data, s.name) for s in samples], check_encoded, on_bad)
        yield Step([np.frombuffer(data, np.uint8) for data, _, _ in checked],
                   np.asarray([samples[u].label for u in used], np.int64),
                   np.asarray([s.sample_id for s in samples], np.int64),
                   np.asarray([h for _, h, _ in checked]), np.asarray([w for _, _, w in checked]), None)


class DaliStreamLoader(_DaliPasses, StreamedLoader):
    """Loader protocol over DALI pipelines and a `ShardStream` (sources.StreamedLoader keeps the position of
    the last batch delivered; batches come back in the order the feed read them)."""

    def __init__(self, stream: ShardStream, spec: MultiCropSpec, device, num_workers: int | None = None,
                 decoder: DecoderOptions | None = None, feed_depth: int = 4, pipelines: int | None = None):
        StreamedLoader.__init__(self, stream, spec, batch_device(device))
        self._init_dali(num_workers, decoder, feed_depth, pipelines)

    def __iter__(self):
        epoch = self.stream.epoch
        for batch, _ in self._passes(stream_steps(self.next_pass(), self.bad_files.add), epoch):
            self.delivered()
            yield batch

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()
        super().close()


def build(source, spec: MultiCropSpec, *, batch_size: int, device, rank: int = 0, world_size: int = 1,
          seed: int = 0, epoch: int = 0, num_workers: int | None = None, drop_last: bool = True,
          decoder: DecoderOptions | None = None, pipelines: int | None = None):
    """`source`: a path (indexed), or a `ShardStream` that `pipelines.build_loader` opened (streamed; its batch
    size, sharding and seed are the stream's). `pipelines`: CPU graphs run side by side (`_DaliPasses`)."""
    if isinstance(source, ShardStream):
        return DaliStreamLoader(source, spec, device, num_workers, decoder, pipelines=pipelines)
    return DaliLoader(source, spec, batch_size, device, rank, world_size, seed, epoch, num_workers, drop_last,
                      decoder, pipelines=pipelines)
