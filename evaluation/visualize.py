"""PCA feature maps: the first three principal components of the patch features, shown as RGB over the image.

    python evaluation/visualize.py --checkpoint runs/demo --baseline --images DIR_OR_FILES... \\
        --num-images 4 --image-size 128 --out pca.png

One row per image: the (resized, centre-cropped) input, then one PCA map per model. The PCA is fitted on the
patches of all the images together, so colours mean the same thing across rows (as in the seed's demo);
each component is scaled to [0, 1] between its 1st and 99th percentile. The map has one cell per patch (ViT)
or per cell of the last feature map (conv nets: stride 32, so 2x2 at 64 px); a larger --image-size than
the pretraining one gives a finer map (ViTs interpolate their position embedding, `dynamic_img_size`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from common.images import IMAGE_EXTS
from common.io import atomic_open
from evaluation.features import FeatureModel, default_device
from evaluation.cli import add_model_args, build_models, positive_int


def pca_rgb(patches: Tensor) -> Tensor:
    """[N, h, w, C] patch features -> [N, h, w, 3] in [0, 1]: projections on the top-3 principal axes."""
    n, h, w, c = patches.shape
    x = patches.reshape(-1, c).double()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    axes = vh[:3]
    axes = axes * torch.sign(axes[torch.arange(len(axes)), axes.abs().argmax(1)])[:, None]  # fix SVD's sign
    proj = x @ axes.T
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    if rgb.shape[1] < 3:  # fewer than 3 feature channels: pad with grey
        rgb = torch.cat([rgb, rgb.new_full((len(rgb), 3 - rgb.shape[1]), 0.5)], dim=1)
    return rgb.float().reshape(n, h, w, 3)


def collect_images(paths: list[str], num_images: int) -> list[Path]:
    """Image files named directly, plus `num_images` spread evenly over each folder's sorted images
    (so an ImageFolder root gives images from different classes)."""
    found: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise FileNotFoundError(f"--images {p}: no image files ({', '.join(IMAGE_EXTS)})")
            picks = np.linspace(0, len(files) - 1, min(num_images, len(files))).round().astype(int)
            found += [files[i] for i in dict.fromkeys(picks)]
        else:
            raise FileNotFoundError(f"--images {p} does not exist")
    return found


@torch.inference_mode()
def pca_maps(model: FeatureModel, images: list[Image.Image], device: torch.device) -> tuple[Tensor, Tensor]:
    """(inputs [N, 3, S, S] in [0, 1] as the model saw them, PCA maps [N, 3, S, S] upsampled to them)."""
    transform = model.transform()
    x = torch.stack([transform(img) for img in images])
    mean, std = torch.tensor(model.mean)[:, None, None], torch.tensor(model.std)[:, None, None]
    shown = (x * std + mean).clamp(0, 1)
    patches = model.module.to(device).eval().patch_features(x.to(device)).float().cpu()
    rgb = pca_rgb(patches).permute(0, 3, 1, 2)
    # nearest: one flat colour per patch, so the map shows the network's real resolution
    return shown, F.interpolate(rgb, size=x.shape[-2:], mode="nearest")


def save_png(grid: Tensor, path: Path) -> None:
    """[3, H, W] in [0, 1] -> PNG, written atomically (temp + fsync + rename)."""
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with atomic_open(path) as f:
        Image.fromarray(array).save(f, format="PNG")


def render(models: list[FeatureModel], image_paths: list[Path], display: int = 192,
           device: torch.device | None = None) -> Tensor:
    """Rows: images; columns: the input, then each model's PCA map; cells `display` px, 4-px white gaps."""
    device = device or default_device()
    images = [Image.open(p).convert("RGB") for p in image_paths]
    columns = []
    for i, model in enumerate(models):
        shown, maps = pca_maps(model, images, device)
        if i == 0:
            columns.append(shown)
        columns.append(maps)
    columns = [F.interpolate(c, size=(display, display), mode="nearest") for c in columns]
    cells = torch.stack(columns, dim=1)  # [N, M + 1, 3, S, S]
    cells = F.pad(cells, (2, 2, 2, 2), value=1.0)
    n, m, _, s, _ = cells.shape
    return cells.permute(2, 0, 3, 1, 4).reshape(3, n * s, m * s)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    parser.add_argument("--num-images", type=positive_int, default=4, help="images taken from each folder")
    parser.add_argument("--out", default="pca.png", help="PNG to write")
    parser.add_argument("--display-size", type=positive_int, default=192, help="cell size in the PNG (px)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    try:  # bad input: a clear message, no traceback, before any work
        image_paths = collect_images(args.images, args.num_images)
        models = build_models(args)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    device = torch.device(args.device) if args.device else default_device()
    grid = render(models, image_paths, args.display_size, device)
    out = Path(args.out)
    save_png(grid, out)
    print(f"wrote {out} ({len(image_paths)} images; columns: input, " + ", ".join(m.name for m in models) + ")")
    return out


if __name__ == "__main__":
    main()
