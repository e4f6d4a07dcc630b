"""The torchvision reference backend: `torchvision.transforms.v2.functional` with its exact semantics + a DataLoader.

It is the behavioural reference for the other backends and the benchmark baseline. Each image is decoded
once (PIL) and all views are cut from it. The random choices come from the one sampler that every backend
reads (pipelines/params.py: torchvision's distributions, drawn from a hash of (seed, epoch, sample index,
view)); this backend renders them with the functional ops in the order of torchvision's recipe
(`render_view`). So the same seed gives the same views as DALI and FFCV up to their documented rendering
differences, and a resumed epoch is exactly the tail of an uninterrupted one, whatever the number of
workers.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from pipelines.batch import Batch
from pipelines.params import (
    P_BLUR, P_BRIGHT, P_FLIP, P_GRAY, P_H, P_JITTER, P_ORDER, P_SIGMA, P_SOLAR, P_W, P_X, P_Y, sample_views,
)
from pipelines.sources import ShardedLoader, Source, decode_pil, read_replacing_bad
from pipelines.spec import MultiCropSpec, View
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
        views = [render_view(image, params[v], view, self.spec) for v, view in enumerate(self.spec.views)]
        g = self.spec.global_views
        size = self.spec.local_size
        local = torch.stack(views[g:]) if self.spec.local_views else torch.empty(0, 3, size, size)
        return torch.stack(views[:g]), local, int(self.source.labels[used]), bad


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
        self.num_workers = cpus_per_rank() if num_workers is None else num_workers
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
            for name, why in bad:
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
