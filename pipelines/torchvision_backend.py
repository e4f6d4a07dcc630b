"""The torchvision reference backend: `torchvision.transforms.v2.functional` with its exact semantics + a DataLoader.

It is the behavioural reference for the other backends and the benchmark baseline. Each image is decoded
once (PIL) and all views are cut from it. The random choices come from the one sampler that every backend
reads (pipelines/params.py: torchvision's distributions, drawn from a hash of (seed, epoch, sample index,
view)); this backend renders them with the functional ops in the order of torchvision's recipe
(`render_view`). So the same seed gives the same views as DALI and FFCV up to their documented rendering
differences, and a resumed epoch is exactly the tail of an uninterrupted one, whatever the number of
workers.

Streamed shards (`TorchvisionStreamLoader`): the stream runs in the main process (reader threads, the
shuffle buffer, the position) and hands each batch's encoded samples to the DataLoader workers through
the batch sampler; workers decode and render whole batches. A sample that does not decode is replaced by
the next decodable one of its batch, so every batch stays the stream's batch and the checkpointed
position stays exact.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from pipelines.batch import Batch
from pipelines.params import (
    P_BLUR, P_BRIGHT, P_FLIP, P_GRAY, P_H, P_JITTER, P_ORDER, P_SIGMA, P_SOLAR, P_W, P_X, P_Y, sample_views,
)
from pipelines.sources import (
    ShardedLoader, Source, StreamedLoader, decode_batch_replacing_bad, decode_pil, read_replacing_bad,
    worker_start_method,
)
from pipelines.spec import MultiCropSpec, View
from pipelines.streaming import ShardStream
from pipelines.threads import cpus_per_rank

# ColorJitter's ops by their id in P_ORDER (brightness, contrast, saturation, hue); the factor is in column
# P_BRIGHT + id.
_JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def render_view(image, p, view: View, spec: MultiCropSpec) -> torch.Tensor:
    """One view of a PIL image from its parameter row `p` (pipelines/params.py), in the order of
    torchvision's recipe: RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter),
    RandomGrayscale, RandomApply(GaussianBlur), RandomSolarize, then to float and Normalize.

    On PIL images, as torchvision's ImageFolder recipes do: on these 160-px photos it is ~15 % less CPU
    than the same ops on uint8 tensors, so the reference is the faster of the two."""
    x = F.resized_crop(image, int(p[P_Y]), int(p[P_X]), int(p[P_H]), int(p[P_W]), [view.size, view.size],
                       antialias=True)
    if p[P_FLIP]:
        x = F.horizontal_flip(x)
    if p[P_JITTER]:
        strengths = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
        for op in p[P_ORDER:P_ORDER + 4].astype(int):
            if strengths[op] > 0:  # ColorJitter skips an op whose range is the identity
                x = _JITTER[op](x, float(p[P_BRIGHT + op]))
    if p[P_GRAY]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p[P_BLUR]:
        x = F.gaussian_blur(x, [view.blur_kernel, view.blur_kernel], [float(p[P_SIGMA])] * 2)
    if p[P_SOLAR]:
        x = F.solarize(x, spec.solarize_threshold)
    x = F.to_dtype(F.pil_to_tensor(x), torch.float32, scale=True)
    return F.normalize(x, list(spec.mean), list(spec.std))


def render_sample(image, params, spec: MultiCropSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(global [G,3,H,W], local [L,3,h,w]) views of a PIL image from its parameters `params` [V, P]."""
    views = [render_view(image, params[v], view, spec) for v, view in enumerate(spec.views)]
    g, size = spec.global_views, spec.local_size
    local = torch.stack(views[g:]) if spec.local_views else torch.empty(0, 3, size, size)
    return torch.stack(views[:g]), local


class MultiCropDataset(Dataset):
    """Item key (epoch, index) -> (global [G,3,H,W], local [L,3,h,w], label, (name, reason) of replaced bad files)."""

    def __init__(self, source: Source, spec: MultiCropSpec, seed: int):
        self.source, self.spec, self.seed = source, spec, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        bad = []
        image, used = read_replacing_bad(self.source, index, decode_pil, lambda name, why: bad.append((name, why)))
        # A replaced sample keeps the random choices of its slot (index), drawn for the image it shows.
        params = sample_views(self.spec, self.seed, epoch, [index], [image.height], [image.width])[0]
        return *render_sample(image, params, self.spec), int(self.source.labels[used]), bad


class StreamBatchDataset(Dataset):
    """Whole batches of a stream: `__getitems__` takes the keys (epoch, sample id, encoded bytes, label,
    name) of one batch, as the stream's batch sampler sends them to a worker, and returns
    `MultiCropDataset`'s items. Views draw from (seed, epoch, sample id): the id is the sample index of
    the parameter sampler. A sample that does not decode is replaced by the next decodable one of the
    same batch (cyclically), its slot keeping its own random choices; a batch without any is an error."""

    def __init__(self, spec: MultiCropSpec, seed: int):
        self.spec, self.seed = spec, seed

    def __getitems__(self, keys: list[tuple]) -> list[tuple]:
        bad = []
        images, used = decode_batch_replacing_bad([(k[2], k[4]) for k in keys], decode_pil,
                                                  lambda name, why: bad.append((name, why)))
        params = sample_views(self.spec, self.seed, keys[0][0], [k[1] for k in keys], [i.height for i in images],
                              [i.width for i in images])
        items = [(*render_sample(image, p, self.spec), keys[u][3], []) for image, p, u in zip(images, params, used)]
        items[0] = (*items[0][:3], bad)  # the batch's bad files travel once (collate flattens them)
        return items

    def __getitem__(self, key: tuple) -> tuple:
        return self.__getitems__([key])[0]


def collate(items):
    g, loc, labels, bad = zip(*items)
    return torch.stack(g), torch.stack(loc), torch.tensor(labels, dtype=torch.int64), [b for bs in bad for b in bs]


def _worker_init(_):
    torch.set_num_threads(1)  # workers are the parallelism; intra-op threads would oversubscribe the cores


class TorchvisionLoader(ShardedLoader):
    """Loader protocol (see pipelines/__init__.py) over a torch DataLoader."""

    def __init__(self, source, spec: MultiCropSpec, batch_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, epoch: int = 0, num_workers: int | None = None,
                 drop_last: bool = True):
        super().__init__(source, spec, batch_size, torch.device(device), rank, world_size, seed, epoch, drop_last)
        self.num_workers = _default_workers(num_workers)
        self.dataset = MultiCropDataset(self.source, spec, seed)
        self._plan: list[list[tuple[int, int]]] = []
        self._loader: DataLoader | None = None

    def __iter__(self):
        self._plan = [[(self.epoch, int(i)) for i in b] for b in self.next_pass()]
        if self._loader is None:
            self._loader = _data_loader(self.dataset, _PlanSampler(self), self.num_workers, self.device)
        cuda = self.device.type == "cuda"
        for g, loc, labels, bad in self._loader:
            for name, why in bad:
                self.bad_files.add(name, why)
            yield Batch(g.to(self.device, non_blocking=cuda), loc.to(self.device, non_blocking=cuda),
                        labels.to(self.device, non_blocking=cuda))


def _data_loader(dataset, batch_sampler, workers: int, device: torch.device) -> DataLoader:
    """One DataLoader for a loader's life; its persistent workers get keys that carry the epoch, so they
    need no epoch state. Workers are forked from a clean forkserver when DALI is loaded in this process:
    forking a process that runs DALI's native thread pools can deadlock the child. (A stream's reader
    threads start after the workers: the DataLoader forks them before it first draws from the sampler.)"""
    context = worker_start_method() if workers else None
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        prefetch_factor=2 if workers else None, persistent_workers=bool(workers), multiprocessing_context=context,
    )


def _default_workers(num_workers: int | None) -> int:
    return cpus_per_rank() if num_workers is None else num_workers


class TorchvisionStreamLoader(StreamedLoader):
    """Loader protocol (see pipelines/__init__.py) over a `ShardStream` and a torch DataLoader whose
    workers decode (module docstring)."""

    def __init__(self, stream: ShardStream, spec: MultiCropSpec, device: torch.device, num_workers: int | None = None):
        super().__init__(stream, spec, torch.device(device))
        self.num_workers = _default_workers(num_workers)
        self.dataset = StreamBatchDataset(spec, stream.seed)
        self._loader: DataLoader | None = None

    def __iter__(self):
        if self._loader is None:
            self._loader = _data_loader(self.dataset, _StreamSampler(self), self.num_workers, self.device)
        cuda = self.device.type == "cuda"
        for g, loc, labels, bad in self._loader:  # in the order the sampler drew the batches
            for name, why in bad:
                self.bad_files.add(name, why)
            self.delivered()
            yield Batch(g.to(self.device, non_blocking=cuda), loc.to(self.device, non_blocking=cuda),
                        labels.to(self.device, non_blocking=cuda))

    def close(self) -> None:
        super().close()
        self._loader = None  # its persistent workers exit


class _StreamSampler:
    """Batch sampler drawing the owning loader's stream: each batch is its samples' keys for the workers."""

    def __init__(self, owner: TorchvisionStreamLoader):
        self.owner = owner

    def __iter__(self):
        owner = self.owner
        for samples in owner.next_pass():
            yield [(owner.epoch, s.sample_id, s.data, s.label, s.name) for s in samples]

    def __len__(self) -> int:
        return len(self.owner) - self.owner.start_step


class _PlanSampler:
    """Batch sampler reading the owning loader's current plan (lists of (epoch, index) keys)."""

    def __init__(self, owner: "TorchvisionLoader"):
        self.owner = owner

    def __iter__(self):
        return iter(self.owner._plan)

    def __len__(self) -> int:
        return len(self.owner._plan)


def build(source, spec: MultiCropSpec, *, batch_size: int, device, rank: int = 0, world_size: int = 1,
          seed: int = 0, epoch: int = 0, num_workers: int | None = None, drop_last: bool = True):
    """`source`: a path (indexed), or a `ShardStream` that `pipelines.build_loader` opened (streamed; its
    batch size, sharding and seed are the stream's)."""
    if isinstance(source, ShardStream):
        return TorchvisionStreamLoader(source, spec, device, num_workers)
    return TorchvisionLoader(source, spec, batch_size, device, rank, world_size, seed, epoch, num_workers, drop_last)
