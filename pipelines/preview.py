"""Look at what a pipeline produces: a grid of one image's views, de-normalised.

    python -m pipelines.preview --data DIR --backend dali --out views.png [--preset seed] [--index 0]

`view_grid(batch, spec, index)` returns the same grid as a [3, H, W] float tensor in [0, 1], which the
trainer logs to TensorBoard (`SummaryWriter.add_image`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common.io import atomic_open
from pipelines.batch import Batch
from pipelines.spec import SPEC_PRESETS, MultiCropSpec


def denormalise(x: torch.Tensor, spec: MultiCropSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, device=x.device).view(3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1)


def view_grid(batch: Batch, spec: MultiCropSpec, index: int = 0, pad: int = 2) -> torch.Tensor:
    """Views of sample `index`: global views, then local views, in one row, each padded to the global
    size (local views keep their own resolution, centred), as [3, H, W] float on the CPU."""
    size = spec.global_size
    tiles = []
    for v in list(batch.global_views[index]) + list(batch.local_views[index]):
        v = denormalise(v.detach().cpu(), spec)
        h, w = v.shape[-2:]
        top, left = (size - h) // 2, (size - w) // 2
        tiles.append(F.pad(v, (left, size - w - left, top, size - h - top), value=1.0))
    row = torch.cat([F.pad(t, (pad, pad, pad, pad), value=1.0) for t in tiles], dim=2)
    return row


def save_png(grid: torch.Tensor, out: str | Path) -> None:
    """Write a [3, H, W] float grid as PNG atomically (temp + fsync + rename)."""
    from PIL import Image

    arr = (grid.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_open(out) as f:
        Image.fromarray(arr).save(f, format="PNG")


def main(argv: list[str] | None = None) -> Path:
    from pipelines import BACKENDS, build_loader

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="ImageFolder dir, webdataset tar(s) or .beton")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--preset", default="seed", choices=sorted(SPEC_PRESETS))
    ap.add_argument("--out", default="views.png")
    ap.add_argument("--index", type=int, default=0, help="which sample of the first batch")
    ap.add_argument("--rows", type=int, default=4, help="how many samples (one row each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    spec = SPEC_PRESETS[args.preset]
    rows = max(1, args.rows)
    loader = build_loader(args.data, spec, backend=args.backend, batch_size=args.index + rows,
                          device=args.device, seed=args.seed, num_workers=0)  # one batch: no workers
    batch = next(iter(loader))
    grid = torch.cat([view_grid(batch, spec, args.index + r) for r in range(rows)], dim=1)
    save_png(grid, args.out)
    print(f"wrote {args.out}: {rows} sample(s) x {spec.num_views} views ({args.backend}, preset {args.preset})")
    return Path(args.out)


if __name__ == "__main__":
    main()
