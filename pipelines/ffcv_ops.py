"""Numba kernels for the FFCV backend: the colour ops FFCV 1.0.2 lacks, and `render_views`, the body of the
fused decoder (pipelines/ffcv_backend.py).

Views here are float32 CHW arrays in [0, 1] (one view, in its slot of the output buffer). Every op follows
the definition of the matching `torchvision.transforms.v2.functional` kernel on float images (tested
pixel-wise in tests/test_ffcv.py).

Randomness: every random choice comes from the sampler all backends share (pipelines/params.py,
`draw_view`), compiled into the decoder: numba's own per-thread generators would ignore torch's seed and
depend on thread scheduling. A sample's key packs its epoch and index, so it gets the same views whatever
its batch, rank or thread -- resume is exact.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from pipelines.params import (
    C_GLOBAL, C_KERNEL, C_MEAN, C_SIZE, C_STD, C_THRESHOLD, NUM_PARAMS, P_BLUR, P_BRIGHT, P_CONTRAST, P_FLIP,
    P_GRAY, P_H, P_HUE, P_JITTER, P_ORDER, P_SAT, P_SIGMA, P_SOLAR, P_W, P_X, P_Y, draw_view,
)


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
def augment_view(img, p, kernel_size, tmp):
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
def normalise(img, solar, c):
    """Optional solarize (at the threshold of constants row `c`), then (x - mean) / std, in place on CHW."""
    threshold = np.float32(c[C_THRESHOLD])
    for ch in range(3):
        scale = np.float32(1.0 / c[C_STD + ch])
        shift = np.float32(-c[C_MEAN + ch] * scale)
        plane = img[ch].reshape(-1)
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
def block_sizes(table):
    """Elements per sample of the global block [G,3,H,W] and of the local block [L,3,h,w], from the
    constants table (pipelines/params.py `constants`)."""
    dg, dl = 0, 0
    for v in range(table.shape[0]):
        n = 3 * int(table[v, C_SIZE]) ** 2
        if table[v, C_GLOBAL] != 0.0:
            dg += n
        else:
            dl += n
    return dg, dl


@njit
def render_views(src, key, b, count, seed, table, out_f32, out_u8, resize):
    """All views of one decoded image (uint8 HWC `src`, sample `key`) into row `b` of a `count`-sample
    batch buffer: the global block of all samples first, then the local block. `table` is the spec's
    constants (pipelines/params.py). Float mode (`out_f32` non-empty): crop, resize, flip, jitter,
    grayscale, blur, solarize, normalise. uint8 mode (`out_u8` [N, 1], 2-d because FFCV marks numba's
    1-d uint8 type read-only): crop, resize, flip and HWC -> CHW only; the colour ops run on the GPU
    (ffcv_gpu.py).
    `resize(src, row0, row1, col0, col1, dst)` is FFCV's crop-resize (a ctypes call, hence no cache=True
    here; everything it calls is cached)."""
    height, width = src.shape[0], src.shape[1]
    dg, dl = block_sizes(table)
    params = np.empty(NUM_PARAMS, np.float64)
    largest = 0
    for v in range(table.shape[0]):
        largest = max(largest, int(table[v, C_SIZE]))
    tmp = np.empty(largest * largest, np.float32)
    view_u8 = np.empty((0, 0, 3), np.uint8)  # FFCV's resize writes a contiguous size x size x 3 array
    offset_g, offset_l = b * dg, count * dg + b * dl  # where this sample's next global / local view goes
    for v in range(table.shape[0]):
        c = table[v]
        draw_view(seed, key, v, height, width, table, params)
        size = int(c[C_SIZE])
        n = 3 * size * size
        if c[C_GLOBAL] != 0.0:
            start, offset_g = offset_g, offset_g + n
        else:
            start, offset_l = offset_l, offset_l + n
        if view_u8.shape[0] != size:  # globals, then locals: two allocations per image
            view_u8 = np.empty((size, size, 3), np.uint8)
        i, j = int(params[P_Y]), int(params[P_X])
        resize(src, i, i + int(params[P_H]), j, j + int(params[P_W]), view_u8)
        flip = params[P_FLIP] != 0.0
        if out_u8.size > 0:
            hwc_to_chw_u8(view_u8, flip, out_u8[start: start + n].reshape(3, size, size))
        else:  # the view is made in place in its slot of the output buffer
            img = out_f32[start: start + n].reshape(3, size, size)
            to_float_chw(view_u8, flip, img)
            augment_view(img, params, int(c[C_KERNEL]), tmp)
            normalise(img, params[P_SOLAR] != 0.0, c)
