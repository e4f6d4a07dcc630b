"""The one sampler of per-view random parameters: every backend renders what it draws.

`sample_views(spec, seed, epoch, indices, heights, widths)` -> float64 `[B, V, P]`: every random choice of
every view of a batch, a pure function of (seed, epoch, sample index, view) and the image size. It does
not depend on the batch, its order, the rank, the thread or the resume point, so the same seed gives the
same views in torchvision, DALI and FFCV (tests/test_cross_backend.py), and a resumed epoch is exactly
the tail of an uninterrupted one. The DALI feed and the torchvision reference call `sample_views`; FFCV's
numba decoder calls `draw_view` (the same compiled code) for each view it renders.

Semantics are torchvision.transforms.v2's, drawn from a counter-based hash (splitmix64) instead of
torch's generator: RandomResizedCrop.get_params (10 tries of (area, log-ratio), the first that fits,
else a centre crop of the clamped ratio), RandomHorizontalFlip, RandomApply(ColorJitter) with factors
U[max(0, 1 - x), 1 + x], hue U[-h, h] and a random order of the four ops (randperm(4)),
RandomGrayscale, RandomApply(GaussianBlur) with sigma U[lo, hi], RandomSolarize. Each draw has its own
hash slot and is made whatever the probabilities: switching one op off leaves the others' choices
intact. A probability is "fires when u < p", so p = 0 never fires and p = 1 always does.

Layout of the last axis (P = NUM_PARAMS columns, float64):

    col    name        value
    0-3    P_Y P_X     crop box in source pixels: top, left,            RandomResizedCrop.get_params
           P_H P_W     height, width                                    (its i, j, h, w)
    4      P_FLIP      1: mirror left-right                             RandomHorizontalFlip(flip_p)
    5      P_JITTER    1: ColorJitter applies                           RandomApply(p=jitter_p)
    6      P_BRIGHT    brightness factor U[max(0, 1 - b), 1 + b]        drawn always, used when P_JITTER
    7      P_CONTRAST  contrast factor   U[max(0, 1 - c), 1 + c]        ...
    8      P_SAT       saturation factor U[max(0, 1 - s), 1 + s]        ...
    9      P_HUE       hue shift in turns U[-hue, hue]                  ...
    10-13  P_ORDER     op ids in the order applied: 0 brightness,       randperm(4)
                       1 contrast, 2 saturation, 3 hue
    14     P_GRAY      1: to grey (luma, 3 channels)                    RandomGrayscale(grayscale_p)
    15     P_BLUR      1: Gaussian blur                                 RandomApply(p=blur_p)
    16     P_SIGMA     blur sigma in view pixels U[lo, hi]              (kernel: spec.views[v].blur_kernel)
    17     P_SOLAR     1: solarize at spec.solarize_threshold           RandomSolarize(solarize_p);
                                                                        never when the threshold is 256

Views are numbered as in `spec.views`: the global views, then the local views.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

from pipelines.spec import MultiCropSpec

# ---- per-view parameters (the layout above) ---------------------------------------------------------
P_Y, P_X, P_H, P_W = 0, 1, 2, 3
P_FLIP, P_JITTER, P_BRIGHT, P_CONTRAST, P_SAT, P_HUE = 4, 5, 6, 7, 8, 9
P_ORDER = 10  # 4 entries
P_GRAY, P_BLUR, P_SIGMA, P_SOLAR = 14, 15, 16, 17
NUM_PARAMS = 18
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # the ids in P_ORDER

# ---- the spec packed for numba: one row of constants per view (`constants(spec)`) ---------------------
C_SIZE, C_GLOBAL, C_SCALE, C_RATIO, C_LOG_RATIO = 0, 1, 2, 4, 6  # C_SCALE, C_RATIO, C_LOG_RATIO: (lo, hi)
C_FLIP_P, C_JITTER_P, C_STRENGTH = 8, 9, 10  # C_STRENGTH: brightness, contrast, saturation, hue
C_GRAY_P, C_BLUR_P, C_SIGMA, C_SOLAR_P = 14, 15, 16, 18  # C_SIGMA: (lo, hi); C_SOLAR_P is 0 when off
C_KERNEL, C_THRESHOLD, C_MEAN, C_STD = 19, 20, 21, 24  # for renderers (FFCV): threshold on [0, 1]
NUM_CONSTANTS = 27

# ---- hash slots: each random draw of a view has its own ---------------------------------------------
TRIES = 10  # RandomResizedCrop: 10 tries, then a centre crop
_SLOT_CROP = 0  # per try: area, log-ratio, top, left
_SLOT_FLIP, _SLOT_JITTER, _SLOT_FACTORS, _SLOT_PERM = 40, 41, 42, 46
_SLOT_GRAY, _SLOT_BLUR, _SLOT_SIGMA, _SLOT_SOLAR = 50, 51, 52, 53

# A sample's key packs its epoch and index (FFCV hands keys through its traversal order instead of indices).
EPOCH_SHIFT = 40  # key = epoch << 40 | sample index (2**40 samples, 2**23 epochs)
INDEX_MASK = (1 << EPOCH_SHIFT) - 1


def make_key(epoch: int, index) -> np.ndarray:
    return (np.uint64(epoch) << np.uint64(EPOCH_SHIFT)) | np.asarray(index, dtype=np.uint64)


@functools.lru_cache(maxsize=64)
def constants(spec: MultiCropSpec) -> np.ndarray:
    """The spec as a read-only float64 [V, NUM_CONSTANTS] table (numba kernels cannot take a dataclass);
    built once per spec."""
    table = np.zeros((spec.num_views, NUM_CONSTANTS), np.float64)
    for v, view in enumerate(spec.views):
        row = table[v]
        row[C_SIZE], row[C_GLOBAL], row[C_KERNEL] = view.size, view.is_global, view.blur_kernel
        row[C_SCALE:C_SCALE + 2] = view.scale
        row[C_RATIO:C_RATIO + 2] = spec.ratio
        row[C_LOG_RATIO:C_LOG_RATIO + 2] = math.log(spec.ratio[0]), math.log(spec.ratio[1])
        row[C_FLIP_P], row[C_JITTER_P], row[C_GRAY_P], row[C_BLUR_P] = (
            spec.flip_p, spec.jitter_p, spec.grayscale_p, spec.blur_p)
        row[C_STRENGTH:C_STRENGTH + 4] = spec.brightness, spec.contrast, spec.saturation, spec.hue
        row[C_SIGMA:C_SIGMA + 2] = spec.blur_sigma
        row[C_SOLAR_P] = spec.solarize_p if "solarize" in spec.enabled_ops else 0.0
        row[C_THRESHOLD] = spec.solarize_threshold / 255.0
        row[C_MEAN:C_MEAN + 3], row[C_STD:C_STD + 3] = spec.mean, spec.std
    table.flags.writeable = False
    return table


# ---- counter-based random numbers ---------------------------------------------------------------------
@njit(cache=True, inline="always")
def _mix64(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@njit(cache=True)
def uniform(seed, key, view, slot):
    """A float in [0, 1), a pure function of its four integer arguments."""
    x = _mix64(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
    x = _mix64(x ^ np.uint64(key))
    x = _mix64(x + np.uint64(view) * np.uint64(256) + np.uint64(slot))
    return float(x >> np.uint64(11)) * (1.0 / 9007199254740992.0)


# ---- the sampler ----------------------------------------------------------------------------------------
@njit(cache=True)
def draw_view(seed, key, view, height, width, table, out):
    """Every random choice of view `view` of sample `key` (an image of height x width) into `out` [P]."""
    c = table[view]
    # RandomResizedCrop.get_params: 10 tries, then a centre crop clamped to the ratio range.
    area = height * width
    s_lo, s_hi = c[C_SCALE], c[C_SCALE + 1]
    log_lo, log_hi = c[C_LOG_RATIO], c[C_LOG_RATIO + 1]
    found = False
    i, j, h, w = 0, 0, height, width
    for attempt in range(TRIES):
        slot = _SLOT_CROP + 4 * attempt
        target = area * (s_lo + (s_hi - s_lo) * uniform(seed, key, view, slot))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(seed, key, view, slot + 1))
        w = int(round(math.sqrt(target * aspect)))  # Python's round: half to even, as torchvision
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(uniform(seed, key, view, slot + 2) * (height - h + 1)), height - h)
            j = min(int(uniform(seed, key, view, slot + 3) * (width - w + 1)), width - w)
            found = True
            break
    if not found:
        in_ratio = width / height
        r_lo, r_hi = c[C_RATIO], c[C_RATIO + 1]
        if in_ratio < r_lo:
            w = width
            h = int(round(w / r_lo))
        elif in_ratio > r_hi:
            h = height
            w = int(round(h * r_hi))
        else:
            w, h = width, height
        i, j = (height - h) // 2, (width - w) // 2
    out[P_Y], out[P_X], out[P_H], out[P_W] = i, j, h, w

    out[P_FLIP] = 1.0 if uniform(seed, key, view, _SLOT_FLIP) < c[C_FLIP_P] else 0.0
    out[P_JITTER] = 1.0 if uniform(seed, key, view, _SLOT_JITTER) < c[C_JITTER_P] else 0.0
    for k in range(3):  # brightness, contrast, saturation: U[max(0, 1 - s), 1 + s]
        s = c[C_STRENGTH + k]
        lo = max(0.0, 1.0 - s)
        out[P_BRIGHT + k] = lo + (1.0 + s - lo) * uniform(seed, key, view, _SLOT_FACTORS + k)
    out[P_HUE] = c[C_STRENGTH + 3] * (2.0 * uniform(seed, key, view, _SLOT_FACTORS + 3) - 1.0)
    for k in range(4):  # randperm(4) as a Fisher-Yates shuffle
        out[P_ORDER + k] = k
    for k in range(3, 0, -1):
        r = min(int(uniform(seed, key, view, _SLOT_PERM + k) * (k + 1)), k)
        out[P_ORDER + k], out[P_ORDER + r] = out[P_ORDER + r], out[P_ORDER + k]
    out[P_GRAY] = 1.0 if uniform(seed, key, view, _SLOT_GRAY) < c[C_GRAY_P] else 0.0
    out[P_BLUR] = 1.0 if uniform(seed, key, view, _SLOT_BLUR) < c[C_BLUR_P] else 0.0
    out[P_SIGMA] = c[C_SIGMA] + (c[C_SIGMA + 1] - c[C_SIGMA]) * uniform(seed, key, view, _SLOT_SIGMA)
    out[P_SOLAR] = 1.0 if uniform(seed, key, view, _SLOT_SOLAR) < c[C_SOLAR_P] else 0.0


@njit(cache=True, nogil=True)  # nogil: the DALI feed thread draws while the training thread runs
def draw_batch(seed, keys, heights, widths, table):
    """[B, V, P] for a batch of sample keys (`make_key`) and image sizes."""
    out = np.empty((len(keys), table.shape[0], NUM_PARAMS), np.float64)
    for b in range(len(keys)):
        for v in range(table.shape[0]):
            draw_view(seed, keys[b], v, heights[b], widths[b], table, out[b, v])
    return out


def sample_views(spec: MultiCropSpec, seed: int, epoch: int, indices, heights, widths) -> np.ndarray:
    """float64 [B, V, NUM_PARAMS] (module docstring) for samples `indices` of `epoch`, whose images are
    heights x widths pixels."""
    return draw_batch(np.uint64(seed), make_key(epoch, np.asarray(indices).reshape(-1)),
                      np.asarray(heights, np.int64).reshape(-1), np.asarray(widths, np.int64).reshape(-1),
                      constants(spec))


__all__ = ["sample_views", "draw_view", "draw_batch", "constants", "make_key", "NUM_PARAMS", "JITTER_OPS",
           "EPOCH_SHIFT", "INDEX_MASK"]
