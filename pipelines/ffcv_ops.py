"""Numba kernels for the FFCV backend: per-view random parameters and the colour ops FFCV 1.0.2 lacks.

Images here are float32 HWC arrays in [0, 1] (one view). Every op follows the definition of the
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


# ---- colour ops on one float32 HWC view in [0, 1], in place -----------------------------------------
@njit(cache=True, fastmath=True)
def adjust_brightness(img, factor):
    flat = img.reshape(-1)
    for k in range(flat.size):
        flat[k] = min(max(flat[k] * factor, 0.0), 1.0)


@njit(cache=True, fastmath=True)
def adjust_contrast(img, factor):
    """Blend with the mean grey level of the whole view (torchvision's pivot)."""
    px = img.reshape(-1, 3)
    total = 0.0
    for k in range(px.shape[0]):
        total += 0.2989 * px[k, 0] + 0.587 * px[k, 1] + 0.114 * px[k, 2]
    f = np.float32(factor)
    offset = np.float32((1.0 - factor) * total / px.shape[0])
    flat = img.reshape(-1)
    for k in range(flat.size):
        flat[k] = min(max(flat[k] * f + offset, np.float32(0.0)), np.float32(1.0))


@njit(cache=True, fastmath=True)
def adjust_saturation(img, factor):
    px = img.reshape(-1, 3)
    f, g = np.float32(factor), np.float32(1.0 - factor)
    zero, one = np.float32(0.0), np.float32(1.0)
    for k in range(px.shape[0]):
        grey = g * (np.float32(0.2989) * px[k, 0] + np.float32(0.587) * px[k, 1] + np.float32(0.114) * px[k, 2])
        px[k, 0] = min(max(px[k, 0] * f + grey, zero), one)
        px[k, 1] = min(max(px[k, 1] * f + grey, zero), one)
        px[k, 2] = min(max(px[k, 2] * f + grey, zero), one)


@njit(cache=True, fastmath=True)
def adjust_hue(img, hue_factor):
    """RGB -> HSV, shift H by `hue_factor` (mod 1), HSV -> RGB: torchvision's _rgb_to_hsv/_hsv_to_rgb,
    written without branches (selects and the min/max form of HSV -> RGB) so that the loop vectorises."""
    px = img.reshape(-1, 3)
    for k in range(px.shape[0]):
        r, g, b = px[k, 0], px[k, 1], px[k, 2]
        maxc = max(r, max(g, b))
        minc = min(r, min(g, b))
        crange = maxc - minc
        grey = crange == 0.0  # hue undefined: s = 0, the pixel stays (v, v, v)
        safe = 1.0 if grey else crange
        s = 0.0 if grey else crange / maxc
        rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
        hh = (bc - gc) if maxc == r else ((2.0 + rc - bc) if maxc == g else (4.0 + gc - rc))
        hh = hh / 6.0 + 1.0  # in [5/6, 11/6]: positive, so fmod(., 1) = x - floor(x)
        hh = hh - math.floor(hh) + hue_factor
        hh = (hh - math.floor(hh)) * 6.0  # Python-style remainder into [0, 1), times 6
        # HSV -> RGB: channel n in (r: 5, g: 3, b: 1) is v - v s clamp(min(m, 4 - m), 0, 1),
        # m = (n + 6h) mod 6 -- the same values as torchvision's (v, p, q, t) table.
        vs = maxc * s
        m = hh + 5.0
        m = m - 6.0 if m >= 6.0 else m
        px[k, 0] = maxc - vs * min(max(min(m, 4.0 - m), 0.0), 1.0)
        m = hh + 3.0
        m = m - 6.0 if m >= 6.0 else m
        px[k, 1] = maxc - vs * min(max(min(m, 4.0 - m), 0.0), 1.0)
        m = hh + 1.0
        m = m - 6.0 if m >= 6.0 else m
        px[k, 2] = maxc - vs * min(max(min(m, 4.0 - m), 0.0), 1.0)


@njit(cache=True, fastmath=True)
def to_grayscale(img):
    """ITU-R 601 luma replicated to three channels (rgb_to_grayscale, num_output_channels=3)."""
    h, w, _ = img.shape
    for y in range(h):
        for x in range(w):
            grey = 0.2989 * img[y, x, 0] + 0.587 * img[y, x, 1] + 0.114 * img[y, x, 2]
            img[y, x, 0] = grey
            img[y, x, 1] = grey
            img[y, x, 2] = grey


@njit(cache=True, inline="always")
def _reflect(k, n):
    """torch 'reflect' padding index (edge not repeated): -1 -> 1, n -> n - 2."""
    if k < 0:
        return -k
    if k >= n:
        return 2 * n - 2 - k
    return k


@njit(cache=True, fastmath=True)
def gaussian_blur(img, sigma, kernel_size, tmp):
    """Separable Gaussian blur, reflect padding. The window is `kernel_size` (torchvision's), cut to
    +-ceil(4 sigma) when that is narrower: the weight beyond 4 sigma is < 1e-4 of the total."""
    h, w, _ = img.shape
    radius = min(kernel_size // 2, int(math.ceil(4.0 * sigma)))
    weights = np.empty(2 * radius + 1, np.float32)
    total = 0.0
    for k in range(-radius, radius + 1):
        weights[k + radius] = math.exp(-0.5 * (k / sigma) ** 2)
        total += weights[k + radius]
    for k in range(2 * radius + 1):
        weights[k] /= total
    # Rows as flat [w * 3] vectors so that the inner loops are contiguous and vectorise.
    rows, out = img.reshape(h, w * 3), tmp[: h * w * 3].reshape(h, w * 3)
    for y in range(h):  # vertical pass into tmp
        acc = out[y]
        acc[:] = 0.0
        for k in range(-radius, radius + 1):
            src, wk = rows[_reflect(y + k, h)], weights[k + radius]
            for i in range(w * 3):
                acc[i] += wk * src[i]
    for y in range(h):  # horizontal pass back into img
        acc, src = rows[y], out[y]
        acc[:] = 0.0
        for k in range(-radius, radius + 1):
            wk = weights[k + radius]
            lo, hi = max(0, -k), min(w, w - k)  # columns whose neighbour x + k is inside the row
            a, b = acc[lo * 3: hi * 3], src[lo * 3 + 3 * k: hi * 3 + 3 * k]
            for i in range(a.shape[0]):  # plain i-indexing on slices: vectorises (10x an offset index)
                a[i] += wk * b[i]
            for x in range(0, lo):  # reflected borders
                xs = _reflect(x + k, w)
                for c in range(3):
                    acc[x * 3 + c] += wk * src[xs * 3 + c]
            for x in range(hi, w):
                xs = _reflect(x + k, w)
                for c in range(3):
                    acc[x * 3 + c] += wk * src[xs * 3 + c]


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
    into `write_normalised`)."""
    if p[P_JITTER] != 0.0:
        color_jitter(img, p)
    if p[P_GRAY] != 0.0:
        to_grayscale(img)
    if p[P_BLUR] != 0.0:
        gaussian_blur(img, p[P_SIGMA], kernel_size, tmp)


@njit(cache=True, fastmath=True)
def uint8_to_float(src, flip, dst):
    """uint8 HWC -> float32 HWC in [0, 1], mirrored left-right when `flip`."""
    h, w, _ = src.shape
    for y in range(h):
        for x in range(w):
            xs = w - 1 - x if flip else x
            for c in range(3):
                dst[y, x, c] = src[y, xs, c] * np.float32(1.0 / 255.0)


@njit(cache=True, fastmath=True)
def write_normalised(img, solar, threshold, sv, out):
    """Optional solarize, then (x - mean) / std, HWC -> CHW into `out` [3, h, w]."""
    h, w, _ = img.shape
    for c in range(3):
        scale = 1.0 / sv[S_STD + c]
        shift = -sv[S_MEAN + c] * scale
        for y in range(h):
            for x in range(w):
                v = img[y, x, c]
                if solar and v >= threshold:
                    v = 1.0 - v
                out[c, y, x] = v * scale + shift


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
    work_g, work_l = np.empty((gsize, gsize, 3), np.float32), np.empty((lsize, lsize, 3), np.float32)
    tmp = np.empty(max(gsize, lsize) ** 2 * 3, np.float32)
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
        else:
            img = work_g if is_global else work_l
            uint8_to_float(view_u8, flip, img)
            augment_view(img, params, sv, int(sv[S_GKERNEL] if is_global else sv[S_LKERNEL]), tmp)
            write_normalised(img, params[P_SOLAR] != 0.0, threshold, sv,
                             out_f32[start: start + 3 * size * size].reshape(3, size, size))
