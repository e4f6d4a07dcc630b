"""FFCV backend: multi-crop views from a `.beton` (written by pipelines/convert_ffcv.py).

One custom FFCV decoder (`MultiCropDecoder`) decodes each JPEG once and writes every view of the recipe:
crop + resize (FFCV's libffcv, OpenCV INTER_AREA), flip, colour jitter, grayscale, blur, solarize and
normalise (numba kernels in pipelines/ffcv_ops.py), each view made in place in its slot of one float buffer
per batch whose first part is the contiguous global block [B,G,3,H,W] and the rest the local block
[B,L,3,h,w]. The buffers are recycled (`RecycledBuffers`): one is reused only once no Batch refers to it.

On CUDA the decoder stops after crop + resize + flip (uint8), FFCV moves the batch with
`ToDevice(non_blocking=True)`, and the colour ops run batched on the GPU (pipelines/ffcv_gpu.py) with the
very same per-view random parameters (`colour_ops="torch"`; "auto" picks it on CUDA, "fused" on CPU; the
torch path also runs on CPU tensors, which is how tests/test_ffcv.py checks it end to end). They run on a
side stream, so they overlap whatever the training stream still has queued, and the training stream
waits for them with an event (no host sync). FFCV's thread makes this rank's GPU its current device
(FFCV leaves it at GPU 0: every rank of a node would create a context there). `colour_ops="fused"` on
CUDA fills pinned buffers and copies them without blocking.

The pipeline, as FFCV declares it (ffcv-imagenet style):
    image -> MultiCropDecoder(spec, seed, uint8=on_gpu) [-> ToTensor -> ToDevice(device, non_blocking)]
    label -> LabelKeyDecoder  (label, key) where key = epoch << 40 | sample index

Randomness and order: our own traversal order hands FFCV keys instead of bare indices (the decoders mask
the epoch off), and the decoder draws every view's parameters with the sampler all backends share
(pipelines/params.py) from (seed, epoch, sample index) -- exact resume, the same views whatever the rank,
batch or thread, and the same as the other backends'. Epoch, shard and resume position are
`sources.ShardedLoader`'s; the order is `sources.epoch_batches`' seeded shuffle (`order="random"`, as
the other backends), or a page-local shuffle (`order="quasi_random"`) for datasets that do not fit in the
page cache, sliced into steps and ranks by the same function.

Deviations from torchvision (the reference backend): the crop is resized with OpenCV INTER_AREA instead of
antialiased bilinear, and colour ops run in float32 without rounding to uint8 between ops.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipelines.batch import Batch, batch_device
from pipelines.ffcv_ops import block_sizes, render_views
from pipelines.params import EPOCH_SHIFT, INDEX_MASK, constants, draw_batch, make_key
from pipelines.sources import ShardedLoader
from pipelines.spec import MultiCropSpec
from pipelines.threads import cpus_per_rank

IMAGE_FIELD, LABEL_FIELD = "image", "label"
ORDERS = ("random", "quasi_random")


def _import_ffcv() -> None:
    """Import ffcv without its side effect on torch: importing ffcv.pipeline.compiler calls
    torch.set_num_threads(1), which left the trainer's forward/backward on one core (~20 % slower steps
    on 2 cores). Every entry point of this module calls this first."""
    if "ffcv" not in sys.modules:
        threads = torch.get_num_threads()
        import ffcv  # noqa: F401
        torch.set_num_threads(threads)


def open_beton(path: str | os.PathLike):
    """FFCV Reader of `path`, with clear errors for a missing/non-.beton file or unexpected fields."""
    _import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    path = Path(path)
    if path.suffix != ".beton":
        raise ValueError(f"FFCV source {str(path)!r} is not a .beton file (convert with pipelines/convert_ffcv.py)")
    if not path.is_file():
        raise ValueError(f"FFCV source {str(path)!r} does not exist")
    try:
        reader = Reader(str(path))
    except Exception as e:  # FFCV raises assorted errors (AssertionError, IndexError) on a foreign file
        raise ValueError(f"FFCV source {str(path)!r} is not a readable .beton ({type(e).__name__}: {e})") from e
    fields = {name: type(h).__name__ for name, h in reader.handlers.items()}
    if not isinstance(reader.handlers.get(IMAGE_FIELD), RGBImageField):
        raise ValueError(f"FFCV source {str(path)!r}: needs an RGBImageField named {IMAGE_FIELD!r}; it has {fields}")
    if not isinstance(reader.handlers.get(LABEL_FIELD), IntField):
        raise ValueError(f"FFCV source {str(path)!r}: needs an IntField named {LABEL_FIELD!r}; it has {fields}")
    if reader.num_samples == 0:
        raise ValueError(f"FFCV source {str(path)!r} holds no samples")
    return reader


def split_views(flat: torch.Tensor, count: int, spec: MultiCropSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """[count * (Dg + Dl)] buffer -> contiguous global [B,G,3,H,W] and local [B,L,3,h,w] views of it."""
    dg, _ = block_sizes(constants(spec))
    flat = flat.reshape(-1)
    g = flat[: count * dg].view(count, spec.global_views, 3, spec.global_size, spec.global_size)
    loc = flat[count * dg:].view(count, spec.local_views, 3, spec.local_size, spec.local_size)
    return g, loc


_LIBFFCV_JIT: list = []


def _libffcv_jit():
    """FFCV's imdecode / crop-resize as numba functions, made once per process: a new dispatcher per
    Loader would make numba recompile render_views for each one."""
    _import_ffcv()
    from ffcv.libffcv import imdecode, resize_crop
    from numba import njit

    if not _LIBFFCV_JIT:
        _LIBFFCV_JIT.extend([njit(nogil=True)(imdecode), njit(nogil=True)(resize_crop)])
    return _LIBFFCV_JIT


def _decoder_classes():
    """FFCV Operations, defined lazily so that importing this module does not need ffcv."""
    _import_ffcv()
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class MultiCropDecoder(Operation):
        """Decode each JPEG once and write all views of the recipe (module docstring)."""

        def __init__(self, spec: MultiCropSpec, seed: int, uint8: bool):
            super().__init__()
            self.spec, self.seed, self.uint8 = spec, seed, uint8

        def declare_state_and_memory(self, previous_state):
            dg, dl = block_sizes(constants(self.spec))
            shape, dtype = (dg + dl,), np.dtype("uint8" if self.uint8 else "float32")
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype))

        def generate_code(self):
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c, resize_c = _libffcv_jit()
            dg, dl = block_sizes(constants(self.spec))
            seed, table = np.uint64(self.seed), constants(self.spec)
            index_mask = np.uint64(INDEX_MASK)
            jpg = IMAGE_MODES["jpg"]

            def decode_one(b, key, count, metadata, storage_state, out_f32, out_u8):
                field = metadata[key & index_mask]
                height, width = np.int64(field["height"]), np.int64(field["width"])
                data = mem_read(field["data_ptr"], storage_state)
                # 3-d buffers only: FFCV's OSCacheManager.state_type flips numba's *interned* uint8[::1] type
                # to read-only, so later-compiled code cannot write through any 1-d uint8 array.
                src = np.empty((height, width, 3), np.uint8)
                if field["mode"] == jpg:
                    imdecode_c(data, src, height, width, height, width, 0, 0, 1, 1, False, False)
                else:  # raw pixels
                    for y in range(height):
                        for x in range(width):
                            for c in range(3):
                                src[y, x, c] = data[(y * width + x) * 3 + c]
                render_views(src, key, b, count, seed, table, out_f32, out_u8, resize_c)

            decode_one = Compiler.compile(decode_one)

            if self.uint8:
                def decode(batch_indices, destination, metadata, storage_state):
                    count = len(batch_indices)
                    out_u8 = destination.reshape(count * (dg + dl), 1)  # 2-d on purpose, see decode_one
                    out_f32 = np.empty(0, np.float32)
                    for b in my_range(count):
                        decode_one(b, np.uint64(batch_indices[b]), count, metadata, storage_state, out_f32, out_u8)
                    return destination[:count]
            else:
                def decode(batch_indices, destination, metadata, storage_state):
                    count = len(batch_indices)
                    out_f32 = destination.reshape(count * (dg + dl))
                    out_u8 = np.empty((0, 1), np.uint8)
                    for b in my_range(count):
                        decode_one(b, np.uint64(batch_indices[b]), count, metadata, storage_state, out_f32, out_u8)
                    return destination[:count]

            decode.is_parallel = True
            return decode

    class LabelKeyDecoder(Operation):
        """label field -> fresh int64 [B, 2] of (label, key): the key tells the GPU path which sample and
        epoch each row is (to draw the same random parameters), and the tests which samples they got."""

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=True, shape=(2,), dtype=np.dtype("int64")), None

        def generate_code(self):
            index_mask = np.uint64(INDEX_MASK)

            def decode(batch_indices, destination, metadata, storage_state):
                out = np.empty((len(batch_indices), 2), np.int64)
                for b in range(len(batch_indices)):
                    key = np.uint64(batch_indices[b])
                    out[b, 0] = metadata[key & index_mask]
                    out[b, 1] = np.int64(key)
                return out

            return decode

    return MultiCropDecoder, LabelKeyDecoder


class RecycledBuffers:
    """Output buffers of the fused decoder, standing in for FFCV's ring of `batches_ahead + 2` slots.

    FFCV's ring is rewritten a few batches later, under a trainer that may still hold the Batch; a fresh
    array per batch is safe but costs page faults on ~120 MB per batch (seed recipe, batch 64): 40 % of the
    loader's throughput on 2 cores. FFCV looks up `buffers[slot]` once per batch, from its thread; we hand
    out a buffer that nothing outside this pool refers to (every Batch, and FFCV's queue, holds a view,
    hence a reference, of its buffer), or a new one when all are in use.
    """

    def __init__(self, shape: tuple[int, ...], dtype, pinned: bool = False) -> None:
        # pinned: page-locked memory (for asynchronous copies to a GPU)
        self.shape, self.dtype, self.pinned, self.buffers = tuple(shape), np.dtype(dtype), pinned, []
        self.buffers.append(np.empty(0, self.dtype))
        self._idle_refs = self._refs(0)  # the count of a buffer only the pool holds (same call path)
        self.buffers.clear()

    def _refs(self, k: int) -> int:
        return sys.getrefcount(self.buffers[k])

    def __getitem__(self, slot: int) -> np.ndarray:
        for k in range(len(self.buffers)):
            if self._refs(k) <= self._idle_refs:
                return self.buffers[k]
        if self.pinned:
            self.buffers.append(torch.empty(self.shape, dtype=torch.from_numpy(np.empty(0, self.dtype)).dtype,
                                            pin_memory=True).numpy())
        else:
            self.buffers.append(np.empty(self.shape, self.dtype))
        return self.buffers[-1]


def _recycle_outputs(graph, outputs: RecycledBuffers) -> None:
    """Make FFCV (1.0.2) allocate `outputs` for the decoder's memory: each epoch's iterator asks the graph for
    its ring before its thread starts, and in float mode the decoder is the only operation asking."""
    allocate = graph.allocate_memory

    def allocate_recycled(batch_size, slots):
        memory = allocate(batch_size, slots)
        asking = [node for node, buffer in memory["operation"].items() if buffer is not None]
        if len(asking) != 1:
            raise RuntimeError(f"FFCV pipeline: expected one operation asking for memory, got {len(asking)}")
        memory["operation"][asking[0]] = outputs
        return memory

    graph.allocate_memory = allocate_recycled


class _KeyOrder:
    """FFCV traversal order that returns the keys we set before each epoch. (FFCV 1.0.2's Loader cannot
    take a custom TraversalOrder class -- it calls `order(self)` on an instance -- so we swap it in.)"""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.keys


def quasi_random_order(page_to_samples: dict, n: int, seed: int, epoch: int, window: int = 8) -> np.ndarray:
    """A permutation that reads the file a few pages at a time: shuffle the pages, then the samples
    within each window of `window` consecutive (shuffled) pages."""
    rng = np.random.default_rng([seed, epoch, 1])
    pages = sorted(page_to_samples)
    pages = [pages[k] for k in rng.permutation(len(pages))]
    seen, parts = set(), []
    for w in range(0, len(pages), window):
        group = sorted({s for p in pages[w:w + window] for s in page_to_samples[p]} - seen)
        seen.update(group)  # a sample spanning two pages is taken once
        parts.append(rng.permutation(np.asarray(group, np.int64)))
    order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    missing = np.setdiff1d(np.arange(n), order)  # samples with no data pages (should not happen)
    return np.concatenate([order, missing])


def _epoch_iterator(loader, device: torch.device):
    """FFCV 1.0.2's `Loader.__iter__`, with an EpochIterator whose thread makes `device` its current CUDA
    device: a new thread starts on device 0, so FFCV's stream switches and events (and the CUDA context
    they create) would land on GPU 0 for every rank of a node."""
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline.compiler import Compiler

    class EpochIteratorOnDevice(EpochIterator):
        def run(self):
            if device.type == "cuda":
                torch.cuda.set_device(device)
            super().run()

    Compiler.set_num_threads(loader.num_workers)
    order = loader.next_traversal_order()
    selected = order[:len(loader) * loader.batch_size]
    loader.next_epoch += 1
    if loader.code is None or loader.recompile:
        loader.generate_code()
    if device.type == "cuda":  # its streams are made here, in the consumer's thread
        with torch.cuda.device(device):
            return EpochIteratorOnDevice(loader, selected)
    return EpochIteratorOnDevice(loader, selected)


def _next_output(iterator, stream=None):
    """FFCV's EpochIterator.__next__ (None at the end of the epoch), except that an exception in FFCV's
    thread raises here instead of leaving the consumer waiting forever on the queue. With CUDA, `stream`
    (default: the current one) waits for FFCV's work on the batch."""
    while True:
        try:
            item = iterator.output_queue.get(timeout=0.5)
            break
        except queue.Empty:
            if not iterator.is_alive() and iterator.output_queue.empty():
                raise RuntimeError("FFCV's loader thread died (its traceback is printed above)") from None
    if item is None:
        return None
    slot, result = item
    if torch.cuda.is_available():  # FFCV ran this batch on its own stream
        (stream or torch.cuda.current_stream()).wait_stream(iterator.cuda_streams[slot])
    return result


@dataclass
class BetonSource:
    """What the loader needs of a .beton besides FFCV's own reader: its size, labels and image sizes."""

    root: str
    field_names: list[str]
    labels: np.ndarray  # int64 [N]
    heights: np.ndarray  # int64 [N], as stored (the sampler draws crops from them)
    widths: np.ndarray

    @classmethod
    def open(cls, path) -> "BetonSource":
        reader = open_beton(path)
        image = reader.metadata[f"f{reader.field_names.index(IMAGE_FIELD)}"]
        labels = reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"]
        return cls(str(path), list(reader.field_names), np.asarray(labels, np.int64),
                   image["height"].astype(np.int64), image["width"].astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


class FFCVLoader(ShardedLoader):
    """The Loader protocol of pipelines/__init__.py over an FFCV `Loader` (see module docstring). A finished
    pass moves the loader on to the next epoch."""

    def __init__(self, path, spec: MultiCropSpec, batch_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0, num_workers: int | None = None,
                 drop_last: bool = True, order: str = "random", batches_ahead: int = 2, colour_ops: str = "auto",
                 compile_colour: bool = False):
        _import_ffcv()
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToDevice, ToTensor

        if order not in ORDERS:
            raise ValueError(f"FFCV order {order!r}: valid are {ORDERS}")
        if colour_ops not in ("auto", "fused", "torch"):
            raise ValueError(f"colour_ops={colour_ops!r}: valid are 'auto', 'fused', 'torch'")
        self._running = None  # before anything can fail: __del__ closes it
        super().__init__(BetonSource.open(path), spec, batch_size, batch_device(device), rank, world_size, seed,
                         epoch, drop_last)
        self.path, self.order = str(path), order
        # "torch": FFCV makes uint8 views, the colour ops run batched in torch on `device` (auto on CUDA);
        # "fused": everything in the numba decoder (auto on CPU).
        self.gpu = colour_ops == "torch" or (colour_ops == "auto" and self.device.type == "cuda")
        MultiCropDecoder, LabelKeyDecoder = _decoder_classes()
        to_gpu = [ToTensor()] if self.gpu else []
        if self.gpu and self.device.type == "cuda":
            to_gpu.append(ToDevice(self.device, non_blocking=True))
        pipelines = {name: None for name in self.source.field_names}  # other fields: not decoded
        pipelines[IMAGE_FIELD] = PipelineSpec(IMAGE_FIELD, MultiCropDecoder(spec, seed, uint8=self.gpu), to_gpu)
        pipelines[LABEL_FIELD] = PipelineSpec(LABEL_FIELD, LabelKeyDecoder())
        workers = num_workers if num_workers and num_workers > 0 else cpus_per_rank()
        self._keys = _KeyOrder()
        # Building the Loader compiles the numba pipeline (~10 s cold; kernels are cached on disk).
        # FFCV's Compiler.set_num_threads also sets torch's thread count: keep the trainer's.
        torch_threads = torch.get_num_threads()
        self._loader = Loader(self.path, batch_size=batch_size, num_workers=workers, os_cache=True,
                              order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=drop_last,
                              batches_ahead=batches_ahead)
        torch.set_num_threads(torch_threads)
        self._loader.traversal_order = self._keys
        cuda = self.device.type == "cuda"
        if not self.gpu:  # the float views go into recycled buffers that each Batch owns while it lives
            self._outputs = RecycledBuffers((batch_size, sum(block_sizes(constants(spec)))), np.float32, pinned=cuda)
            _recycle_outputs(self._loader.graph, self._outputs)
        self._copies: collections.deque = collections.deque()  # (event, host views) of copies in flight
        self._colour = None
        if self.gpu:
            from pipelines.ffcv_gpu import ColourOps

            self._colour = ColourOps(spec, self.device, compiled=compile_colour)
        self._side = torch.cuda.Stream(self.device) if self.gpu and cuda else None
        outputs = list(self._loader.pipeline_specs)
        self._image_pos, self._label_pos = outputs.index(IMAGE_FIELD), outputs.index(LABEL_FIELD)
        self.batch_indices = np.zeros(0, np.int64)  # dataset indices of the batch last handed out

    @property
    def num_samples(self) -> int:
        return len(self.source)

    # ---- Loader protocol --------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch, start_step)
        self.close()

    def epoch_order(self, epoch: int) -> np.ndarray | None:
        """`order="quasi_random"`: FFCV's page-local shuffle, sliced into steps and ranks as any order."""
        if self.order == "random":
            return None
        return quasi_random_order(self._loader.memory_manager.page_to_samples, len(self.source), self.seed, epoch)

    def __iter__(self):
        for step, images, label_keys in self.raw_batches():
            batch = self._to_batch(images, label_keys)
            self.start_step = step + 1  # where a checkpoint taken after this batch resumes
            yield batch

    def raw_batches(self):
        """This pass as FFCV hands it over: (step, views, label_keys) per step, the views uint8 (GPU path)
        or float (fused), still in FFCV's buffers. `__iter__` turns each into a Batch; benchmarks time this
        alone (the CPU side of the GPU path). A finished pass moves the loader on to the next epoch."""
        self.close()
        epoch, start = self.epoch, self.start_step
        batches = self.epoch_batches(epoch, start)
        if not batches:
            return
        self._keys.keys = make_key(epoch, np.concatenate(batches))
        # The last batch may be short (drop_last=False); FFCV cuts the key list into batch_size chunks.
        torch_threads = torch.get_num_threads()
        iterator = self._running = _epoch_iterator(self._loader, self.device)
        torch.set_num_threads(torch_threads)
        try:
            for step in itertools.count(start):
                out = _next_output(iterator, self._side)  # the colour stream waits for FFCV's copy
                if out is None:
                    break
                yield step, out[self._image_pos], out[self._label_pos]
            self.epoch, self.start_step = epoch + 1, 0
        finally:  # also runs when the consumer drops the generator mid-epoch
            self.close()

    def _to_batch(self, images, label_keys: np.ndarray) -> Batch:
        count = len(label_keys)
        keys = label_keys[:, 1].astype(np.uint64)
        self.batch_indices = (keys & np.uint64(INDEX_MASK)).astype(np.int64)
        cuda = self.device.type == "cuda"
        labels = torch.from_numpy(label_keys[:, 0].copy())
        labels = labels.pin_memory().to(self.device, non_blocking=True) if cuda else labels
        if not self.gpu:  # views made on the CPU; copied only when the device is a GPU (colour_ops="fused")
            g, loc = split_views(torch.from_numpy(images), count, self.spec)
            if not cuda:
                return Batch(g, loc, labels)
            g, loc = g.to(self.device, non_blocking=True), loc.to(self.device, non_blocking=True)
            self._keep_until_copied(images)
            return Batch(g, loc, labels)
        params = self.drawn_params(label_keys)
        g8, l8 = split_views(images, count, self.spec)
        if self._side is None:  # CPU tensors (tests)
            return Batch(*self._colour.both(g8, l8, params), labels)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._side):  # overlaps what the training stream still has queued
            g, loc = self._colour.both(g8, l8, params)
            done = self._side.record_event()
        main.wait_event(done)
        g.record_stream(main)  # made on the side stream, used on the training stream
        loc.record_stream(main)
        return Batch(g, loc, labels)

    def drawn_params(self, label_keys: np.ndarray) -> np.ndarray:
        """[B, V, P] (host): the very parameters the decoder drew for a batch's samples (same sampler, keys)."""
        keys = label_keys[:, 1].astype(np.uint64)
        indices = (keys & np.uint64(INDEX_MASK)).astype(np.int64)
        return draw_batch(np.uint64(self.seed), keys, self.source.heights[indices], self.source.widths[indices],
                          constants(self.spec))

    def _keep_until_copied(self, images: np.ndarray) -> None:
        """Hold the pinned host views of a non-blocking copy until it is done (`RecycledBuffers` hands a
        buffer out again only once nothing refers to it); released by polling events, never by a sync."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._copies.append((event, images))
        while self._copies and (self._copies[0][0].query() or len(self._copies) > 8):
            self._copies.popleft()[0].synchronize()  # done already, or (rarely) too many in flight

    def close(self) -> None:
        """Stop FFCV's worker thread now. (Dropping its iterator is not enough: the thread keeps decoding
        until its queue is full, and blocks forever on a full queue when the epoch ends.)"""
        it, self._running = self._running, None
        if it is None:
            return
        it.iter_ixes = iter(())  # no further batches are started
        it.terminate_event.set()
        while it.is_alive():
            while not it.output_queue.empty():
                it.output_queue.get_nowait()
            it.join(timeout=0.05)
        it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def build(source, spec: MultiCropSpec, batch_size: int = 64, device=None, rank: int = 0, world_size: int = 1,
          seed: int = 0, epoch: int = 0, num_workers: int | None = None, drop_last: bool = True,
          order: str = "random", colour_ops: str = "auto", compile_colour: bool = False) -> FFCVLoader:
    """`pipelines.build_loader(..., backend="ffcv")`: a multi-crop loader over a `.beton`. `compile_colour`:
    torch.compile the GPU colour ops (pipelines/ffcv_gpu.py; the first batches wait for the compiler)."""
    return FFCVLoader(source, spec, batch_size, batch_device(device), rank=rank, world_size=world_size, seed=seed,
                      epoch=epoch, num_workers=num_workers, drop_last=drop_last, order=order, colour_ops=colour_ops,
                      compile_colour=compile_colour)


__all__ = ["build", "FFCVLoader", "open_beton", "split_views", "quasi_random_order", "EPOCH_SHIFT"]
