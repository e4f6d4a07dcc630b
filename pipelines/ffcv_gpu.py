"""The colour half of the FFCV recipe, batched in torch for the GPU (also runs on CPU tensors, which is how
tests/test_ffcv.py checks it against the fused numba op).

Input: uint8 views [B, V, 3, S, S] already cropped, resized and flipped by the FFCV decoder, and the
per-view parameters [B, V, NUM_PARAMS] (pipelines/params.py) the decoder drew for them, as the host
array the loader has anyway. Each op is the float32 definition of ffcv_ops (= torchvision.transforms.v2
on float images) with per-view factors, so a view's result does not depend on which others share the batch.

No host sync and little work per batch:
- the parameters are read on the host, where they are drawn: which view runs which op at which of
  ColorJitter's 4 order positions, which views are blurred, are index lists and factor tables made with
  numpy and uploaded in one pinned, non-blocking copy (no `.item()`, no `nonzero()` on the device);
- brightness, contrast and saturation are one affine op, y = clamp(a x + b grey(x) + c mean_grey(x))
  (brightness (f, 0, 0), contrast (f, 0, 1 - f), saturation (f, 1 - f, 0), identity (1, 0, 0)), run once
  per order position over all views; hue runs once per view, on the views that draw it at that
  position; blur only on the blurred views. Before: every op at every position on every view (16 passes);
- constants (mean, std, blur offsets) are made once per device;
- `ColourOps(..., compiled=True)` compiles the elementwise blocks (torch.compile) into a few kernels.
The FFCV loader runs this on a side stream (pipelines/ffcv_backend.py), overlapping the training step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.params import (
    P_BLUR, P_BRIGHT, P_CONTRAST, P_GRAY, P_HUE, P_JITTER, P_ORDER, P_SAT, P_SIGMA, P_SOLAR, sample_views,
)
from pipelines.spec import MultiCropSpec

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3  # op ids in P_ORDER


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _affine(x: torch.Tensor, coef: torch.Tensor, use_grey: bool, use_mean: bool) -> torch.Tensor:
    """clamp(a x + b grey(x) + c mean_grey(x), 0, 1) per view; coef [N, 3] = (a, b, c)."""
    coef = coef.reshape(-1, 3, 1, 1, 1)
    y = coef[:, 0] * x
    if use_grey or use_mean:
        grey = _luma(x)
        if use_grey:
            y = y + coef[:, 1] * grey
        if use_mean:
            y = y + coef[:, 2] * grey.mean((2, 3), keepdim=True)
    return y.clamp(0.0, 1.0)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, H += shift (mod 1), HSV -> RGB, per view: the branch-free formulas of
    ffcv_ops.adjust_hue (torchvision's values); a grey pixel keeps its value."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, torch.maximum(g, b))
    crange = maxc - torch.minimum(r, torch.minimum(g, b))
    grey = crange == 0
    inv = torch.where(grey, torch.zeros_like(crange), 1.0 / torch.where(grey, torch.ones_like(crange), crange))
    hh = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv))
    hh = hh * (1.0 / 6.0) + 1.0
    hh = hh - torch.floor(hh) + shift.reshape(-1, 1, 1)
    hh = (hh - torch.floor(hh)) * 6.0

    def channel(n: float) -> torch.Tensor:
        m = hh + n
        m = torch.where(m >= 6.0, m - 6.0, m)
        return maxc - crange * torch.clamp(torch.minimum(m, 4.0 - m), 0.0, 1.0)

    return torch.stack((channel(5.0), channel(3.0), channel(1.0)), 1)


def _finish(x: torch.Tensor, grey: torch.Tensor, solar: torch.Tensor, threshold: float, mean: torch.Tensor,
            inv_std: torch.Tensor) -> torch.Tensor:
    """Solarize the views `solar` marks, then normalise. (Grey and blur ran before.)"""
    x = torch.where(solar.reshape(-1, 1, 1, 1) & (x >= threshold), 1.0 - x, x)
    return (x - mean) * inv_std


def _grey(x: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    return torch.where(grey.reshape(-1, 1, 1, 1), _luma(x).expand_as(x), x)


class _Plan(NamedTuple):
    """One group's per-batch work list, made on the host from the parameters."""

    floats: np.ndarray  # float32: coef [4, N, 3], hue shift [N], sigma [N], grey [N], solar [N]
    ints: np.ndarray  # int64: the hue views of positions 0..3, then the blurred views
    hue_counts: tuple[int, int, int, int]
    blur_count: int
    any_grey: bool
    use_grey: tuple[bool, bool, bool, bool]  # per position: some view runs saturation there
    use_mean: tuple[bool, bool, bool, bool]  # ... contrast


def plan_group(params: np.ndarray) -> _Plan:
    """Parameters [N, P] of one group's views (host) -> the work list (`_Plan`)."""
    n = len(params)
    jitter = params[:, P_JITTER] != 0
    order = params[:, P_ORDER:P_ORDER + 4].astype(np.int64)
    factor = params[:, [P_BRIGHT, P_CONTRAST, P_SAT]]
    coef = np.zeros((4, n, 3), np.float32)
    coef[..., 0] = 1.0
    hue_views, use_grey, use_mean = [], [], []
    for position in range(4):
        op = np.where(jitter, order[:, position], -1)
        for k, (on_grey, on_mean) in enumerate(((0, 0), (0, 1), (1, 0))):  # brightness, contrast, saturation
            rows = op == k
            f = factor[rows, k]
            coef[position, rows] = np.stack([f, (1 - f) * on_grey, (1 - f) * on_mean], 1)
        use_grey.append(bool((op == _SATURATION).any()))
        use_mean.append(bool((op == _CONTRAST).any()))
        hue_views.append(np.flatnonzero((op == _HUE) & (params[:, P_HUE] != 0)))
    blurred = np.flatnonzero(params[:, P_BLUR] != 0)
    floats = np.concatenate([coef.ravel(), params[:, P_HUE], params[:, P_SIGMA], params[:, P_GRAY] != 0,
                             params[:, P_SOLAR] != 0]).astype(np.float32)
    ints = np.concatenate(hue_views + [blurred]).astype(np.int64)
    return _Plan(floats, ints, tuple(len(h) for h in hue_views), len(blurred), bool((params[:, P_GRAY] != 0).any()),
                 tuple(use_grey), tuple(use_mean))


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor: through pinned memory, without blocking the host (CUDA), as is (CPU)."""
    t = torch.from_numpy(array)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class ColourOps:
    """The colour half of the recipe for `spec` on `device`: `ops(views_u8, params)` for one group of views,
    `ops.both(g8, l8, params)` for a batch's two groups. Constants are made once; `compiled` compiles the
    elementwise blocks with torch.compile (the first batches of each shape then take the compile time)."""

    def __init__(self, spec: MultiCropSpec, device, compiled: bool = False):
        self.spec, self.device = spec, torch.device(device)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).reshape(1, 3, 1, 1).to(self.device)
        self.inv_std = (1.0 / torch.tensor(spec.std, dtype=torch.float32)).reshape(1, 3, 1, 1).to(self.device)
        self.threshold = spec.solarize_threshold / 255.0
        self.blur_on = "blur" in spec.enabled_ops
        wrap = (lambda f, **kw: torch.compile(f, **kw)) if compiled else (lambda f, **kw: f)
        self._affine = wrap(_affine)
        self._hue = wrap(_hue, dynamic=True)  # the number of hue views changes every batch
        self._grey = wrap(_grey)
        self._finish = wrap(_finish)

    @functools.lru_cache(maxsize=8)
    def _offsets(self, kernel_size: int) -> torch.Tensor:
        half = kernel_size // 2
        return torch.arange(-half, half + 1, dtype=torch.float32).to(self.device)

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
        """Per-view separable Gaussian, reflect padding, window cut at +-ceil(4 sigma) like ffcv_ops."""
        n, c, h, w = x.shape
        offsets, half = self._offsets(kernel_size), kernel_size // 2
        sigma = sigma.reshape(-1, 1)
        radius = torch.clamp(torch.ceil(4.0 * sigma), max=half)
        weights = torch.exp(-0.5 * (offsets / sigma) ** 2) * (offsets.abs() <= radius)
        weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, k]
        y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
        y = F.conv2d(y, weights.reshape(n * c, 1, kernel_size, 1), groups=n * c)
        y = F.conv2d(y, weights.reshape(n * c, 1, 1, kernel_size), groups=n * c)
        return y.reshape(n, c, h, w)

    def __call__(self, views_u8: torch.Tensor, params) -> torch.Tensor:
        """uint8 [B, V, 3, S, S] (on the device) + host parameters [B, V, P] -> normalised float32 views."""
        b, v, _, size = views_u8.shape[:4]
        if v == 0:
            return torch.empty(views_u8.shape, dtype=torch.float32, device=views_u8.device)
        n = b * v
        params = params.cpu().numpy() if isinstance(params, torch.Tensor) else np.asarray(params)
        plan = plan_group(params.reshape(n, -1))
        floats, ints = _upload(plan.floats, self.device), _upload(plan.ints, self.device)
        coef, hue, sigma, grey, solar = torch.split(floats, [12 * n, n, n, n, n])
        coef, grey, solar = coef.reshape(4, n, 3), grey != 0, solar != 0
        x = views_u8.reshape(n, 3, size, size).to(torch.float32) * (1.0 / 255.0)
        start = 0
        for position in range(4):  # ColorJitter: each view's ops in its own drawn order
            x = self._affine(x, coef[position], plan.use_grey[position], plan.use_mean[position])
            count = plan.hue_counts[position]
            if count:
                rows = ints.narrow(0, start, count)
                x.index_copy_(0, rows, self._hue(x.index_select(0, rows), hue.index_select(0, rows)))
            start += count
        if plan.any_grey:
            x = self._grey(x, grey)
        if self.blur_on and plan.blur_count:
            rows = ints.narrow(0, start, plan.blur_count)
            blurred = self._blur(x.index_select(0, rows), sigma.index_select(0, rows), self.spec.blur_kernel(size))
            x.index_copy_(0, rows, blurred)
        return self._finish(x, grey, solar, self.threshold, self.mean, self.inv_std).reshape(b, v, 3, size, size)

    def both(self, g8: torch.Tensor, l8: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's global and local uint8 views + host parameters [B, V, P] -> normalised float views."""
        G = self.spec.global_views
        return self(g8, params[:, :G]), self(l8, params[:, G:])


@functools.lru_cache(maxsize=8)
def _ops(spec: MultiCropSpec, device: str) -> ColourOps:
    return ColourOps(spec, device)


def augment_views(views_u8: torch.Tensor, params, spec: MultiCropSpec, size: int | None = None) -> torch.Tensor:
    """uint8 [B, V, 3, S, S] + params [B, V, P] -> normalised float32 [B, V, 3, S, S] (eager, same device)."""
    return _ops(spec, str(views_u8.device))(views_u8, params)


def synthetic_views(spec: MultiCropSpec, batch: int, device, seed: int = 0):
    """A batch as the FFCV decoder hands it to the device (for benchmarks): random uint8 global and local
    views on `device` and the sampler's parameters [B, V, P] (host) for 256 x 341 source images."""
    g = torch.Generator(device=device).manual_seed(seed)
    g8 = torch.randint(0, 256, (batch, spec.global_views, 3, spec.global_size, spec.global_size), dtype=torch.uint8,
                       device=device, generator=g)
    l8 = torch.randint(0, 256, (batch, spec.local_views, 3, spec.local_size, spec.local_size), dtype=torch.uint8,
                       device=device, generator=g)
    params = sample_views(spec, seed, 0, np.arange(batch), [256] * batch, [341] * batch)
    return (g8, l8), params


__all__ = ["ColourOps", "augment_views", "plan_group", "synthetic_views"]
