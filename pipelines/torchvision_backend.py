"""The torchvision reference backend: `torchvision.transforms.v2` with its exact semantics + a DataLoader.

It is the behavioural reference for the other backends and the benchmark baseline. Each image is decoded
once (PIL) and all views are cut from that decoded tensor. The random choices of a sample depend only on
(seed, epoch, sample index), so the same seed gives the same batch and a resumed epoch is exactly the tail
of an uninterrupted one, whatever the number of workers.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipelines.batch import Batch
from pipelines.sources import BadImage, Source, decode_pil, sample_seed
from pipelines.sources import ShardedLoader
from pipelines.spec import MultiCropSpec

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 16  # consecutive unreadable samples before we call the source broken


def view_transform(spec: MultiCropSpec, size: int, scale: tuple[float, float]) -> v2.Compose:
    """One view of the recipe, in torchvision's order: crop, flip, jitter, grey, blur, solarize, normalise.

    Works on PIL images, as torchvision's ImageFolder recipes do: on these 160-px photos it is ~15 % less
    CPU than the same ops on uint8 tensors, so the reference is the faster of the two."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, ratio=spec.ratio, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
        v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        v2.RandomGrayscale(spec.grayscale_p),
        v2.RandomApply([v2.GaussianBlur(spec.blur_kernel(size), spec.blur_sigma)], p=spec.blur_p),
        v2.RandomSolarize(min(spec.solarize_threshold, 255), p=spec.solarize_p) if spec.solarize_threshold <= 255
        else v2.Identity(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(spec.mean), list(spec.std)),
    ])


class MultiCropDataset(Dataset):
    """Item key (epoch, index) -> (global [G,3,H,W], local [L,3,h,w], label, names of replaced bad files)."""

    def __init__(self, source: Source, spec: MultiCropSpec, seed: int):
        self.source, self.spec, self.seed = source, spec, seed
        self.global_t = view_transform(spec, spec.global_size, spec.global_scale)
        self.local_t = view_transform(spec, spec.local_size, spec.local_scale)

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int):
        """Decoded RGB PIL image of `index`; an unreadable file is replaced by the next readable one."""
        bad = []
        for k in range(MAX_REPLACEMENTS):
            i = (index + k) % len(self.source)
            try:
                return decode_pil(self.source.read(i), self.source.name(i)), int(self.source.labels[i]), bad
            except (BadImage, OSError) as e:
                bad.append(f"{self.source.name(i)}\t{e}")
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive unreadable images in {self.source.root!r} "
                           f"from sample {index}: {bad[-1]}")

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, label, bad = self.load(index)
        # Seed torch's CPU RNG (which v2 transforms draw from) per sample, without disturbing the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            g = [self.global_t(image) for _ in range(self.spec.global_views)]
            loc = [self.local_t(image) for _ in range(self.spec.local_views)]
        size = self.spec.local_size
        local = torch.stack(loc) if loc else torch.empty(0, 3, size, size)
        return torch.stack(g), local, label, bad


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
        self.num_workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers
        self.dataset = MultiCropDataset(self.source, spec, seed)
        self._plan: list[list[tuple[int, int]]] = []
        self._loader: DataLoader | None = None

    def _make_loader(self) -> DataLoader:
        """One DataLoader for the loader's life; its persistent workers get (epoch, index) keys, so they
        need no epoch state. Workers are forked from a clean forkserver when DALI is loaded in this
        process: forking a process that runs DALI's native thread pools can deadlock the child."""
        workers = self.num_workers
        context = "forkserver" if workers and "nvidia.dali" in sys.modules else None
        return DataLoader(
            self.dataset, batch_sampler=_PlanSampler(self), num_workers=workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if workers else None,
            prefetch_factor=2 if workers else None, persistent_workers=bool(workers),
            multiprocessing_context=context,
        )

    def __iter__(self):
        self._plan = [[(self.epoch, int(i)) for i in b] for b in self.next_pass()]
        if self._loader is None:
            self._loader = self._make_loader()
        cuda = self.device.type == "cuda"
        for g, loc, labels, bad in self._loader:
            for entry in bad:
                name, why = entry.split("\t", 1)
                self.bad_files.add(name, why)
            yield Batch(g.to(self.device, non_blocking=cuda), loc.to(self.device, non_blocking=cuda),
                        labels.to(self.device, non_blocking=cuda))


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
    return TorchvisionLoader(source, spec, batch_size, device, rank, world_size, seed, epoch, num_workers, drop_last)
