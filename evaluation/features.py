"""Frozen feature extractors (a LeJEPA checkpoint or its export, the same arch at random init, or a timm
model) and the on-disk feature cache that k-shot probing and kNN share. Every one reads its features with
`models.probe` (the `--probe` choice), so a run, its export and a timm model are probed alike.

Features are extracted once per (model weights, dataset split, input size) and cached as
`CACHE/<dataset>-<split>-<key>.pt`; the key hashes the model's weights themselves, so a retrained
checkpoint at the same path never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from common.images import IMAGENET_MEAN, IMAGENET_STD  # what the LeJEPA presets normalise with
from common.io import atomic_open
from models import build_encoder, check_arch, encoder_from_checkpoint, load_checkpoint
from models.export import CROP_PCT, is_export, load_export
from models.probe import DEFAULT_PROBE, FrozenFeatures

CACHE_FORMAT = "lejepa-features/1"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class FeatureModel:
    """A frozen network with `probe_features(x) -> [B, D]` and `patch_features(x) -> [B, h, w, C]` (a
    `models.probe.FrozenFeatures`) and its input recipe: resize the short side to size / crop_pct
    (bilinear), centre-crop `size`, normalise."""

    name: str  # row label in tables ("vit_t LeJEPA step 300", "vit_t random init", "timm:resnet50")
    module: FrozenFeatures
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = CROP_PCT
    info: dict = field(default_factory=dict)  # recorded in outputs (source, arch, step, ...)
    _identity: str | None = None

    @property
    def identity(self) -> str:
        """Hash of the weights and input recipe (computed once): the model half of the cache key."""
        if self._identity is None:
            h = hashlib.sha1()
            h.update(json.dumps([type(self.module).__name__, self.module.probe, self.image_size, self.mean,
                                 self.std, self.crop_pct]).encode())
            for name, t in sorted(self.module.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._identity = h.hexdigest()[:16]
        return self._identity

    def transform(self) -> v2.Compose:
        size = self.image_size
        return v2.Compose([
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(int(round(size / self.crop_pct)), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
        ])


def _label(name: str, probe: str) -> str:
    return name if probe == DEFAULT_PROBE else f"{name} [probe {probe}]"


def from_checkpoint(path: str | Path, image_size: int | None = None, probe: str = DEFAULT_PROBE) -> FeatureModel:
    """Our checkpoint (a file or a run dir -> its latest valid file), or an export folder (models/export.py:
    same backbone, same numbers). Input size: the pretraining global view size unless `image_size` overrides
    it. Errors (missing, not ours, truncated, unknown arch) are FileNotFoundError / ValueError naming the path."""
    if is_export(path):
        return from_export(path, image_size, probe)
    ckpt = load_checkpoint(path)
    encoder, cfg = encoder_from_checkpoint(ckpt)
    spec = cfg["spec"]
    size = image_size or spec["global_size"]
    info = {"source": "checkpoint", "path": str(ckpt.get("path", path)), "arch": cfg["arch"],
            "patch_size": cfg.get("patch_size"), "step": ckpt["step"], "preset": cfg.get("preset"),
            "pretrain_size": spec["global_size"], "image_size": size, "probe": probe}
    return FeatureModel(_label(f"{cfg['arch']} LeJEPA step {ckpt['step']}", probe),
                        FrozenFeatures(encoder.backbone, probe, encoder.projector), size, tuple(spec["mean"]),
                        tuple(spec["std"]), info=info)


def from_export(path: str | Path, image_size: int | None = None, probe: str = DEFAULT_PROBE) -> FeatureModel:
    """An export folder, rebuilt by timm from its config.json; input recipe from its `pretrained_cfg`."""
    if probe == "projector":
        raise ValueError(f"--probe projector: export {path} holds the backbone only; use the run's checkpoint")
    backbone, cfg = load_export(path)
    meta, pcfg = cfg["lejepa"], cfg["pretrained_cfg"]
    pretrain_size = pcfg["input_size"][-1]
    size = image_size or pretrain_size
    info = {"source": "export", "path": str(path), "arch": meta["arch"], "patch_size": meta.get("patch_size"),
            "step": meta["step"], "preset": meta["config"].get("preset"), "pretrain_size": pretrain_size,
            "image_size": size, "probe": probe}
    return FeatureModel(_label(f"{meta['arch']} LeJEPA step {meta['step']}", probe), FrozenFeatures(backbone, probe),
                        size, tuple(pcfg["mean"]), tuple(pcfg["std"]), crop_pct=pcfg.get("crop_pct", CROP_PCT),
                        info=info)


def random_init(arch: str, image_size: int, patch_size: int | None = None, seed: int = 0,
                probe: str = DEFAULT_PROBE) -> FeatureModel:
    """The same Encoder at random init (seeded, so its features, and their cache, are reproducible)."""
    check_arch(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_encoder(arch, patch_size=patch_size, img_size=image_size).eval()
    info = {"source": "random-init", "arch": arch, "patch_size": patch_size, "init_seed": seed,
            "image_size": image_size, "probe": probe}
    return FeatureModel(_label(f"{arch} random init", probe), FrozenFeatures(encoder.backbone, probe, encoder.projector),
                        image_size, info=info)


def from_timm(name: str, weights: str | Path | None = None, image_size: int | None = None,
              probe: str = DEFAULT_PROBE) -> FeatureModel:
    """A timm model by name. Random init unless `weights` names a local file (never downloads)."""
    if name not in timm.list_models():
        raise ValueError(f"--timm {name!r} is not a timm model name (see timm.list_models())")
    if probe == "projector":
        raise ValueError("--probe projector needs a LeJEPA checkpoint (a timm model has no projector)")
    kwargs: dict = {"num_classes": 0}
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"--timm-weights {weights} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs).eval()
    cfg = model.pretrained_cfg
    size = image_size or cfg.get("input_size", (3, 224, 224))[-1]
    info = {"source": "timm", "timm": name, "weights": str(weights) if weights else None, "image_size": size,
            "probe": probe}
    label = f"timm:{name}" + ("" if weights else " random init")
    return FeatureModel(_label(label, probe), FrozenFeatures(model, probe), size, tuple(cfg.get("mean", IMAGENET_MEAN)),
                        tuple(cfg.get("std", IMAGENET_STD)), crop_pct=cfg.get("crop_pct", CROP_PCT), info=info)


class Transformed(Dataset):
    """(image, label) -> (transform(image), label); the splits are loaded once, untransformed, and each
    model brings its own input recipe."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.transform(image), label


@torch.inference_mode()
def extract(model: FeatureModel, dataset, batch_size: int = 128, num_workers: int = 2,
            device: torch.device | None = None, desc: str = "features") -> Tensor:
    """Probe features [N, D] (float32, CPU) of an (image, label) dataset, in dataset order."""
    device = device or default_device()
    module = model.module.to(device).eval()
    loader = DataLoader(Transformed(dataset, model.transform()), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    out = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(module.probe_features(images).float().cpu())
    return torch.cat(out)


def atomic_torch_save(obj, path: Path) -> None:
    """temp file in the same folder + fsync + rename: readers never see a half-written file."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def cached_features(model: FeatureModel, dataset_key: dict, split_name: str, split, cache_dir: Path | None,
                    **extract_kw) -> Tensor:
    """Features of `split` (a transfer_datasets.Split), from the cache when
    an entry with the same key and the same labels exists, else extracted and stored."""
    key = hashlib.sha1(json.dumps(
        {"format": CACHE_FORMAT, "model": model.identity, "split": split_name, "n": len(split.labels),
         **dataset_key}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{dataset_key['name']}-{split_name}-{key}.pt" if cache_dir else None
    if path is not None and path.exists():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if np.array_equal(entry["labels"].numpy(), split.labels):
                return entry["features"]
        except Exception:  # an unreadable entry is simply recomputed (and replaced atomically)
            pass
    feats = extract(model, split.dataset, desc=f"{dataset_key['name']} {split_name}", **extract_kw)
    if path is not None:
        atomic_torch_save({"features": feats, "labels": torch.from_numpy(split.labels)}, path)
    return feats
