"""`MultiCropSpec`: the one description of the multi-crop recipe that every backend is built from."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

from common.images import IMAGENET_MEAN, IMAGENET_STD

RANDOM_OPS = ("flip", "jitter", "grayscale", "blur", "solarize")  # the per-view coin flips, in recipe order


class View(NamedTuple):
    """One view of the recipe (`MultiCropSpec.views`)."""

    size: int  # output side in pixels
    scale: tuple[float, float]  # RandomResizedCrop area range
    is_global: bool
    blur_kernel: int  # torchvision GaussianBlur kernel size for this view


@dataclass(frozen=True)
class MultiCropSpec:
    """The LeJEPA seed recipe by default: 2 global views 224 px + 6 local views 98 px.

    Probabilities are per view and independent (each view draws its own flip, jitter, ...). Colour
    semantics follow torchvision.transforms.v2 (ColorJitter applies brightness, contrast, saturation and
    hue in a random order; hue is a shift in HSV space; contrast pivots on the mean grey level).
    """

    global_views: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.3, 1.0)
    local_views: int = 6
    local_size: int = 98
    local_scale: tuple[float, float] = (0.05, 0.3)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"MultiCropSpec.{name}={getattr(self, name)!r}: {why}")

        for name in ("global_views", "local_views"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.global_views < 1:
            raise bad("global_views", "LeJEPA needs at least one global view")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 8:
                raise bad(name, "view size must be >= 8 px")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise bad(name, "scale range must satisfy 0 < lo <= hi <= 1")
        lo, hi = self.ratio
        if not 0.0 < lo <= hi:
            raise bad("ratio", "aspect-ratio range must satisfy 0 < lo <= hi")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "probability must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise bad(name, "jitter strength must be >= 0")
        if not 0.0 <= self.hue <= 0.5:
            raise bad("hue", "hue jitter must be in [0, 0.5]")
        lo, hi = self.blur_sigma
        if not 0.0 < lo <= hi:
            raise bad("blur_sigma", "sigma range must satisfy 0 < lo <= hi")
        if not 0 <= self.solarize_threshold <= 256:
            raise bad("solarize_threshold", "threshold must be in [0, 256] (uint8 scale)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise bad("std", "mean/std must have 3 entries and std > 0")

    @staticmethod
    def blur_kernel(size: int) -> int:
        """Odd Gaussian-blur window of ~10 % of the view side (23 px at 224, 9 px at 98)."""
        return max(3, int(0.1 * size) // 2 * 2 + 1)

    @property
    def num_views(self) -> int:
        return self.global_views + self.local_views

    # Derived facts, computed once per spec (cached on the instance; not fields: `replace`, equality,
    # hashing and `to_dict` see only the recipe).
    @functools.cached_property
    def views(self) -> tuple[View, ...]:
        """The view plan: every view in output order (global views, then local views)."""
        g = View(self.global_size, self.global_scale, True, self.blur_kernel(self.global_size))
        loc = View(self.local_size, self.local_scale, False, self.blur_kernel(self.local_size))
        return (g,) * self.global_views + (loc,) * self.local_views

    @functools.cached_property
    def enabled_ops(self) -> frozenset[str]:
        """The RANDOM_OPS that can fire. Solarize at threshold 256 (nothing reaches it) is off whatever its
        probability: the one place that rule lives."""
        p = {"flip": self.flip_p, "jitter": self.jitter_p, "grayscale": self.grayscale_p, "blur": self.blur_p,
             "solarize": self.solarize_p if self.solarize_threshold <= 255 else 0.0}
        return frozenset(op for op in RANDOM_OPS if p[op] > 0)

    def replace(self, **changes) -> "MultiCropSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MultiCropSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MultiCropSpec: unknown fields {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def without_randomness(self) -> "MultiCropSpec":
        """Every random colour op off (p = 0): the base for testing one op at a time."""
        return self.replace(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


SPEC_PRESETS: dict[str, MultiCropSpec] = {
    "seed": MultiCropSpec(),
    # Tiny views so a 2-core CPU trains something in minutes.
    "cpu-small": MultiCropSpec(global_size=64, local_size=32),
}
