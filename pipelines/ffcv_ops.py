"""Numba kernels for the FFCV backend: per-view random parameters and the colour ops FFCV 1.0.2 lacks.

Views here are float32 CHW arrays in [0, 1] (one view, in its slot of the output buffer). Every op follows the definition of the
matching `torchvision.transforms.v2.functional` kernel on float images (tested pixel-wise in
tests/test_ffcv.py); the fused decoder in `ffcv_backend.py` calls them after the crop + resize.

Randomness: numba's per-thread generators ignore torch's seed and depend on thread scheduling, so
every random choice is a pure function of (seed, key, view, slot) through a counter-based hash
(splitmix64). `key` packs the epoch and the sample index, so a sample gets the same views whatever
its batch, rank or thread -- resume is exact.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from pipelines.spec import MultiCropSpec

# ---- layout of the spec vector (float64) handed to the kernels -------------------------------------
S_GVIEWS, S_GSIZE, S_GSCALE, S_LVIEWS, S_LSIZE, S_LSCALE, S_RATIO = 0, 1, 2, 4, 5, 6, 8
S_FLIP_P, S_JITTER_P, S_BRIGHT, S_CONTRAST, S_SAT, S_HUE = 10, 11, 12, 13, 14, 15
S_GRAY_P, S_BLUR_P, S_SIGMA, S_SOLAR_P, S_SOLAR_THR, S_MEAN, S_STD = 16, 17, 18, 20, 21, 22, 25
S_GKERNEL, S_LKERNEL = 28, 29
SPEC_LEN = 30

# ---- layout of the per-view parameters (float64) ---------------------------------------------------
P_I, P_J, P_H, P_W = 0, 1, 2, 3  # crop box in the source image (rows i..i+h, cols j..j+w)
P_FLIP, P_JITTER, P_BRIGHT, P_CONTRAST, P_SAT, P_HUE = 4, 5, 6, 7, 8, 9
P_ORDER = 10  # 4 entries: the order of brightness(0), contrast(1), saturation(2), hue(3)
P_GRAY, P_BLUR, P_SIGMA, P_SOLAR = 14, 15, 16, 17
NUM_PARAMS = 18

# ---- hash slots: each random draw of a view has its own slot ---------------------------------------
_SLOT_CROP = 0  # 10 attempts x 4 draws
_SLOT_FLIP, _SLOT_JITTER, _SLOT_FACTORS, _SLOT_PERM = 40, 41, 42, 46
_SLOT_GRAY, _SLOT_BLUR, _SLOT_SIGMA, _SLOT_SOLAR = 50, 51, 52, 53

EPOCH_SHIFT = 40  # key = epoch << 40 | sample index (2**40 samples, 2**23 epochs)
INDEX_MASK = (1 << EPOCH_SHIFT) - 1


def spec_vector(spec: MultiCropSpec) -> np.ndarray:
    """The spec as a flat float64 array (numba kernels cannot take a dataclass)."""
    v = np.zeros(SPEC_LEN, np.float64)
    v[S_GVIEWS], v[S_GSIZE], v[S_GSCALE:S_GSCALE + 2] = spec.global_views, spec.global_size, spec.global_scale
    v[S_LVIEWS], v[S_LSIZE], v[S_LSCALE:S_LSCALE + 2] = spec.local_views, spec.local_size, spec.local_scale
    v[S_RATIO:S_RATIO + 2] = spec.ratio
    v[S_FLIP_P], v[S_JITTER_P] = spec.flip_p, spec.jitter_p
    v[S_BRIGHT], v[S_CONTRAST], v[S_SAT], v[S_HUE] = spec.brightness, spec.contrast, spec.saturation, spec.hue
    v[S_GRAY_P], v[S_BLUR_P], v[S_SIGMA:S_SIGMA + 2] = spec.grayscale_p, spec.blur_p, spec.blur_sigma
    v[S_SOLAR_P], v[S_SOLAR_THR] = spec.solarize_p, spec.solarize_threshold / 255.0
    v[S_MEAN:S_MEAN + 3], v[S_STD:S_STD + 3] = spec.mean, spec.std
    v[S_GKERNEL], v[S_LKERNEL] = spec.blur_kernel(spec.global_size), spec.blur_kernel(spec.local_size)
    return v


def make_key(epoch: int, index) -> np.ndarray:
    return (np.uint64(epoch) << np.uint64(EPOCH_SHIFT)) | np.asarray(index, dtype=np.uint64)


# ---- counter-based random numbers --------------------------------------------------------------------
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


@njit(cache=True)
def draw_view_params(seed, key, view, height, width, sv, out):
    """All random choices of one view, torchvision's distributions (RandomResizedCrop, ColorJitter, ...)."""
    is_global = view < sv[S_GVIEWS]
    s_lo = sv[S_GSCALE] if is_global else sv[S_LSCALE]
    s_hi = sv[S_GSCALE + 1] if is_global else sv[S_LSCALE + 1]
    # RandomResizedCrop.make_params: 10 attempts, then a centre crop clamped to the ratio range.
    area = height * width
    log_lo, log_hi = math.log(sv[S_RATIO]), math.log(sv[S_RATIO + 1])
    found = False
    for attempt in range(10):
        slot = _SLOT_CROP + 4 * attempt
        target = area * (s_lo + (s_hi - s_lo) * uniform(seed, key, view, slot))
        aspect = math.exp(log_lo + (log_hi - log_lo) * uniform(seed, key, view, slot + 1))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(uniform(seed, key, view, slot + 2) * (height - h + 1)), height - h)
            j = min(int(uniform(seed, key, view, slot + 3) * (width - w + 1)), width - w)
            found = True
            break
    if not found:
        in_ratio = width / height
        if in_ratio < sv[S_RATIO]:
            w = width
            h = int(round(w / sv[S_RATIO]))
        elif in_ratio > sv[S_RATIO + 1]:
            h = height
            w = int(round(h * sv[S_RATIO + 1]))
        else:
            w, h = width, height
        i, j = (height - h) // 2, (width - w) // 2
    out[P_I], out[P_J], out[P_H], out[P_W] = i, j, h, w

    out[P_FLIP] = 1.0 if uniform(seed, key, view, _SLOT_FLIP) < sv[S_FLIP_P] else 0.0
    out[P_JITTER] = 1.0 if uniform(seed, key, view, _SLOT_JITTER) < sv[S_JITTER_P] else 0.0
    for k in range(3):  # brightness, contrast, saturation: uniform in [max(0, 1 - s), 1 + s]
        s = sv[S_BRIGHT + k]
        lo = max(0.0, 1.0 - s)
        out[P_BRIGHT + k] = lo + (1.0 + s - lo) * uniform(seed, key, view, _SLOT_FACTORS + k)
    out[P_HUE] = sv[S_HUE] * (2.0 * uniform(seed, key, view, _SLOT_FACTORS + 3) - 1.0)
    for k in range(4):  # torch.randperm(4), as a Fisher-Yates shuffle
        out[P_ORDER + k] = k
    for k in range(3, 0, -1):
        r = min(int(uniform(seed, key, view, _SLOT_PERM + k) * (k + 1)), k)
        out[P_ORDER + k], out[P_ORDER + r] = out[P_ORDER + r], out[P_ORDER + k]
    out[P_GRAY] = 1.0 if uniform(seed, key, view, _SLOT_GRAY) < sv[S_GRAY_P] else 0.0
    out[P_BLUR] = 1.0 if uniform(seed, key, view, _SLOT_BLUR) < sv[S_BLUR_P] else 0.0
    out[P_SIGMA] = sv[S_SIGMA] + (sv[S_SIGMA + 1] - sv[S_SIGMA]) * uniform(seed, key, view, _SLOT_SIGMA)
    out[P_SOLAR] = 1.0 if uniform(seed, key, view, _SLOT_SOLAR) < sv[S_SOLAR_P] else 0.0


@njit(cache=True)
def batch_view_params(seed, keys, heights, widths, sv):
    """[B, V, NUM_PARAMS] for a batch (the GPU path draws the same numbers as the fused CPU op)."""
    views = int(sv[S_GVIEWS] + sv[S_LVIEWS])
    out = np.empty((len(keys), views, NUM_PARAMS), np.float64)
    for b in range(len(keys)):
        for v in range(views):
            draw_view_params(seed, keys[b], v, heights[b], widths[b], sv, out[b, v])
    return out


# ---- colour ops on one float32 CHW view in [0, 1], in place ------------------------------------------
# Planar (CHW) on purpose: r, g and b are separate contiguous rows, so every per-pixel loop below
# vectorises (AVX2/AVX-512); on interleaved HWC pixels the hue loop ran ~8x slower.
@njit(cache=True, fastmath=True)
def adjust_brightness(img, factor):
    flat = img.reshape(-1)
    f, zero, one = np.float32(factor), np.float32(0.0), np.float32(1.0)
    for k in range(flat.size):
        flat[k] = min(max(flat[k] * f, zero), one)


@njit(cache=True, fastmath=True, inline="always")
def _mean_grey(r, g, b):
    total = 0.0
    for k in range(r.size):
        total += np.float32(0.2989) * r[k] + np.float32(0.587) * g[k] + np.float32(0.114) * b[k]
    return total / r.size


@njit(cache=True, fastmath=True)
def adjust_contrast(img, factor):
    """Blend with the mean grey level of the whole view (torchvision's pivot)."""
    planes = img.reshape(3, -1)
    mean = _mean_grey(planes[0], planes[1], planes[2])
    f, offset = np.float32(factor), np.float32((1.0 - factor) * mean)
    zero, one = np.float32(0.0), np.float32(1.0)
    flat = img.reshape(-1)
    for k in range(flat.size):
        flat[k] = min(max(flat[k] * f + offset, zero), one)


@njit(cache=True, fastmath=True)
def adjust_saturation(img, factor):
    planes = img.reshape(3, -1)
    r, g, b = planes[0], planes[1], planes[2]
    f, h = np.float32(factor), np.float32(1.0 - factor)
    zero, one = np.float32(0.0), np.float32(1.0)
    for k in range(r.size):
        grey = h * (np.float32(0.2989) * r[k] + np.float32(0.587) * g[k] + np.float32(0.114) * b[k])
        r[k] = min(max(r[k] * f + grey, zero), one)
        g[k] = min(max(g[k] * f + grey, zero), one)
        b[k] = min(max(b[k] * f + grey, zero), one)


@njit(cache=True, fastmath=True, inline="always")
def _hsv_channel(v, vs, hh, n):
    """Channel n (r: 5, g: 3, b: 1) of HSV -> RGB: v - v s clamp(min(m, 4 - m), 0, 1), m = (n + 6h) mod 6,
    the same values as torchvision's (v, p, q, t) table, without branches."""
    m = hh + n
    m = m - np.float32(6.0) if m >= np.float32(6.0) else m
    return v - vs * min(max(min(m, np.float32(4.0) - m), np.float32(0.0)), np.float32(1.0))


@njit(cache=True, fastmath=True)
def adjust_hue(img, hue_factor):
    """RGB -> HSV, shift H by `hue_factor` (mod 1), HSV -> RGB: torchvision's _rgb_to_hsv/_hsv_to_rgb,
    written with selects instead of branches so that the loop vectorises."""
    planes = img.reshape(3, -1)
    r, g, b = planes[0], planes[1], planes[2]
    shift = np.float32(hue_factor)
    for k in range(r.size):
        rk, gk, bk = r[k], g[k], b[k]
        maxc = max(rk, max(gk, bk))
        crange = maxc - min(rk, min(gk, bk))
        grey = crange == np.float32(0.0)  # hue undefined: s = 0, the pixel stays (v, v, v)
        inv = np.float32(0.0) if grey else np.float32(1.0) / crange
        vs = crange  # v * s = v * crange / v
        # torchvision's (bc - gc), (2 + rc - bc), (4 + gc - rc) with rc = (maxc - r) / crange, ...
        hh = ((gk - bk) * inv if maxc == rk else
              (np.float32(2.0) + (bk - rk) * inv if maxc == gk else np.float32(4.0) + (rk - gk) * inv))
        hh = hh * np.float32(1.0 / 6.0) + np.float32(1.0)  # in [5/6, 11/6]: fmod(., 1) = x - floor(x)
        hh = hh - math.floor(hh) + shift
        hh = (hh - math.floor(hh)) * np.float32(6.0)  # Python-style remainder into [0, 1), times 6
        r[k] = _hsv_channel(maxc, vs, hh, np.float32(5.0))
        g[k] = _hsv_channel(maxc, vs, hh, np.float32(3.0))
        b[k] = _hsv_channel(maxc, vs, hh, np.float32(1.0))


@njit(cache=True, fastmath=True)
def to_grayscale(img):
    """ITU-R 601 luma replicated to three channels (rgb_to_grayscale, num_output_channels=3)."""
    planes = img.reshape(3, -1)
    r, g, b = planes[0], planes[1], planes[2]
    for k in range(r.size):
        grey = np.float32(0.2989) * r[k] + np.float32(0.587) * g[k] + np.float32(0.114) * b[k]
        r[k] = grey
        g[k] = grey
        b[k] = grey


@njit(cache=True, inline="always")
def _reflect(k, n):
    """torch 'reflect' padding index (edge not repeated): -1 -> 1, n -> n - 2."""
    if k < 0:
        return -k
    if k >= n:
        return 2 * n - 2 - k
    return k


@njit(cache=True, fastmath=True)
def _blur_plane(rows, weights, radius, tmp):
    """One channel [h, w]: vertical pass into `tmp` [h, w], horizontal pass back into `rows`."""
    h, w = rows.shape
    for y in range(h):
        acc = tmp[y]
        acc[:] = 0.0
        for k in range(-radius, radius + 1):
            src, wk = rows[_reflect(y + k, h)], weights[k + radius]
            for i in range(w):
                acc[i] += wk * src[i]
    for y in range(h):
        acc, src = rows[y], tmp[y]
        acc[:] = 0.0
        for k in range(-radius, radius + 1):
            wk = weights[k + radius]
            lo, hi = max(0, -k), min(w, w - k)  # columns whose neighbour x + k is inside the row
            a, b = acc[lo:hi], src[lo + k: hi + k]
            for i in range(a.shape[0]):  # plain i-indexing on slices: vectorises (10x an offset index)
                a[i] += wk * b[i]
            for x in range(0, lo):  # reflected borders
                acc[x] += wk * src[_reflect(x + k, w)]
            for x in range(hi, w):
                acc[x] += wk * src[_reflect(x + k, w)]


@njit(cache=True, fastmath=True)
def gaussian_blur(img, sigma, kernel_size, tmp):
    """Separable Gaussian blur, reflect padding, `tmp` >= h * w floats. The window is `kernel_size`
    (torchvision's), cut to +-ceil(4 sigma) when that is narrower: the weight beyond 4 sigma is < 1e-4."""
    _, h, w = img.shape
    radius = min(kernel_size // 2, int(math.ceil(4.0 * sigma)))
    weights = np.empty(2 * radius + 1, np.float32)
    total = 0.0
    for k in range(-radius, radius + 1):
        weights[k + radius] = math.exp(-0.5 * (k / sigma) ** 2)
        total += weights[k + radius]
    for k in range(2 * radius + 1):
        weights[k] /= total
    rows = tmp[: h * w].reshape(h, w)
    for c in range(3):
        _blur_plane(img[c], weights, radius, rows)


@njit(cache=True, fastmath=True)
def solarize(img, threshold):
    """Invert every value >= threshold (threshold on the [0, 1] scale)."""
    flat = img.reshape(-1)
    for k in range(flat.size):
        if flat[k] >= threshold:
            flat[k] = 1.0 - flat[k]


@njit(cache=True)
def color_jitter(img, p):
    """torchvision ColorJitter: brightness, contrast, saturation, hue in the drawn random order."""
    for k in range(4):
        op = int(p[P_ORDER + k])
        if op == 0:
            adjust_brightness(img, p[P_BRIGHT])
        elif op == 1:
            adjust_contrast(img, p[P_CONTRAST])
        elif op == 2:
            adjust_saturation(img, p[P_SAT])
        elif p[P_HUE] != 0.0:
            adjust_hue(img, p[P_HUE])


@njit(cache=True)
def augment_view(img, p, sv, kernel_size, tmp):
    """The colour part of the recipe, in torchvision order: jitter, grayscale, blur (solarize is fused
    into `normalise`)."""
    if p[P_JITTER] != 0.0:
        color_jitter(img, p)
    if p[P_GRAY] != 0.0:
        to_grayscale(img)
    if p[P_BLUR] != 0.0:
        gaussian_blur(img, p[P_SIGMA], kernel_size, tmp)


@njit(cache=True, fastmath=True)
def to_float_chw(src, flip, dst):
    """uint8 HWC -> float32 CHW in [0, 1], mirrored left-right when `flip`."""
    h, w, _ = src.shape
    scale = np.float32(1.0 / 255.0)
    for c in range(3):
        for y in range(h):
            row, out = src[y], dst[c, y]
            if flip:
                for x in range(w):
                    out[w - 1 - x] = row[x, c] * scale
            else:
                for x in range(w):
                    out[x] = row[x, c] * scale


@njit(cache=True, fastmath=True)
def normalise(img, solar, threshold, sv):
    """Optional solarize, then (x - mean) / std, in place on CHW."""
    for c in range(3):
        scale = np.float32(1.0 / sv[S_STD + c])
        shift = np.float32(-sv[S_MEAN + c] * scale)
        plane = img[c].reshape(-1)
        if solar:
            for k in range(plane.size):
                v = plane[k]
                v = np.float32(1.0) - v if v >= threshold else v
                plane[k] = v * scale + shift
        else:
            for k in range(plane.size):
                plane[k] = plane[k] * scale + shift


@njit(cache=True)
def hwc_to_chw_u8(src, flip, dst):
    """uint8 HWC -> uint8 CHW, mirrored left-right when `flip` (the GPU path's CPU part)."""
    h, w, _ = src.shape
    for c in range(3):
        for y in range(h):
            for x in range(w):
                dst[c, y, x] = src[y, w - 1 - x if flip else x, c]


@njit(cache=True)
def view_layout(sv):
    """Elements per sample of the global block [G,3,H,W] and of the local block [L,3,h,w]."""
    gs, ls = int(sv[S_GSIZE]), int(sv[S_LSIZE])
    return int(sv[S_GVIEWS]) * 3 * gs * gs, int(sv[S_LVIEWS]) * 3 * ls * ls


@njit
def render_views(src, key, b, count, seed, sv, out_f32, out_u8, resize):
    """All views of one decoded image (uint8 HWC `src`, sample `key`) into row `b` of a `count`-sample
    batch buffer: the global block of all samples first, then the local block. Float mode (`out_f32`
    non-empty): crop, resize, flip, jitter, grayscale, blur, solarize, normalise. uint8 mode (`out_u8`
    [N, 1], 2-d because FFCV marks numba's 1-d uint8 type read-only): crop, resize, flip and HWC -> CHW
    only; the colour ops run on the GPU (ffcv_gpu.py).
    `resize(src, row0, row1, col0, col1, dst)` is FFCV's crop-resize (a ctypes call, hence no cache=True
    here; everything it calls is cached)."""
    height, width = src.shape[0], src.shape[1]
    n_global, n_views = int(sv[S_GVIEWS]), int(sv[S_GVIEWS] + sv[S_LVIEWS])
    gsize, lsize = int(sv[S_GSIZE]), int(sv[S_LSIZE])
    dg, dl = view_layout(sv)
    threshold = np.float32(sv[S_SOLAR_THR])
    params = np.empty(NUM_PARAMS, np.float64)
    crop_g, crop_l = np.empty((gsize, gsize, 3), np.uint8), np.empty((lsize, lsize, 3), np.uint8)
    tmp = np.empty(max(gsize, lsize) ** 2, np.float32)
    for v in range(n_views):
        draw_view_params(seed, key, v, height, width, sv, params)
        is_global = v < n_global
        size = gsize if is_global else lsize
        start = b * dg + v * 3 * size * size if is_global else count * dg + b * dl + (v - n_global) * 3 * size * size
        view_u8 = crop_g if is_global else crop_l
        i, j = int(params[P_I]), int(params[P_J])
        resize(src, i, i + int(params[P_H]), j, j + int(params[P_W]), view_u8)
        flip = params[P_FLIP] != 0.0
        if out_u8.size > 0:
            hwc_to_chw_u8(view_u8, flip, out_u8[start: start + 3 * size * size].reshape(3, size, size))
        else:  # the view is made in place in its slot of the output buffer
            img = out_f32[start: start + 3 * size * size].reshape(3, size, size)
            to_float_chw(view_u8, flip, img)
            augment_view(img, params, sv, int(sv[S_GKERNEL] if is_global else sv[S_LKERNEL]), tmp)
            normalise(img, params[P_SOLAR] != 0.0, threshold, sv)
