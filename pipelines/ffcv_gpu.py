"""The colour half of the FFCV recipe, batched in torch for the GPU (also runs on CPU tensors, which is how
tests/test_ffcv.py checks it against the fused numba op).

Input: uint8 views [B, V, 3, S, S] already cropped, resized and flipped by the FFCV decoder, and the
per-view parameters [B, V, NUM_PARAMS] (pipelines/params.py) the decoder drew for them. Each op is the
float32 definition of ffcv_ops (= torchvision.transforms.v2 on float images), applied to every view at
once with per-view factors; a view the op does not apply to is passed through unchanged (torch.where),
so the result does not depend on which other views share the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipelines.params import (
    P_BLUR, P_BRIGHT, P_CONTRAST, P_GRAY, P_HUE, P_JITTER, P_ORDER, P_SAT, P_SIGMA, P_SOLAR,
)
from pipelines.spec import MultiCropSpec


def _col(p: torch.Tensor) -> torch.Tensor:
    """[N] per-view scalar -> [N, 1, 1, 1] for broadcasting over CHW."""
    return p.reshape(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, H += factor (mod 1), HSV -> RGB; same formulas as ffcv_ops.adjust_hue."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    crange = maxc - minc
    eq = crange == 0
    safe = torch.where(eq, torch.ones_like(crange), crange)
    s = crange / torch.where(eq, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0) + factor.reshape(-1, 1, 1)
    h = h - torch.floor(h)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64) % 6
    v = maxc
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s + s * f)).clamp(0, 1)
    vpqt = torch.stack((v, p, q, t), 1)  # [N, 4, H, W]
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device)
    idx = select[:, i].permute(1, 0, 2, 3)  # [N, 3, H, W] index into vpqt
    out = torch.gather(vpqt, 1, idx)
    return torch.where(eq.unsqueeze(1), x, out)  # grey pixels keep their value


def _jitter_op(x: torch.Tensor, op: int, params: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Apply ColorJitter op `op` (0 brightness, 1 contrast, 2 saturation, 3 hue) where `on` [N] is true."""
    if op == 0:
        y = (x * _col(params[:, P_BRIGHT])).clamp(0, 1)
    elif op == 1:
        f = _col(params[:, P_CONTRAST])
        y = (x * f + (1 - f) * _grey(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    elif op == 2:
        f = _col(params[:, P_SAT])
        y = (x * f + (1 - f) * _grey(x)).clamp(0, 1)
    else:
        on = on & (params[:, P_HUE] != 0)
        y = _hue(x, params[:, P_HUE])
    return torch.where(_col(on), y, x)


def _blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-view separable Gaussian, reflect padding, window cut at +-ceil(4 sigma) like ffcv_ops."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.reshape(-1, 1)
    radius = torch.clamp(torch.ceil(4.0 * sigma), max=half)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2) * (offsets.abs() <= radius)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, k]
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, weights.reshape(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, weights.reshape(n * c, 1, 1, kernel_size), groups=n * c)
    return y.reshape(n, c, h, w)


def augment_views(views_u8: torch.Tensor, params: torch.Tensor, spec: MultiCropSpec, size: int) -> torch.Tensor:
    """uint8 [B, V, 3, S, S] + params [B, V, P] -> normalised float32 [B, V, 3, S, S] (same device)."""
    b, v = views_u8.shape[:2]
    if v == 0:
        return torch.empty(views_u8.shape, dtype=torch.float32, device=views_u8.device)
    x = views_u8.reshape(b * v, 3, size, size).to(torch.float32) / 255.0
    p = params.reshape(b * v, -1).to(device=x.device, dtype=torch.float32)
    jitter = p[:, P_JITTER] != 0
    order = p[:, P_ORDER:P_ORDER + 4].to(torch.int64)
    for position in range(4):  # each view's own random order: op k runs where it is at this position
        for op in range(4):
            x = _jitter_op(x, op, p, jitter & (order[:, position] == op))
    x = torch.where(_col(p[:, P_GRAY] != 0), _grey(x).expand_as(x), x)
    if "blur" in spec.enabled_ops:
        x = torch.where(_col(p[:, P_BLUR] != 0), _blur(x, p[:, P_SIGMA], spec.blur_kernel(size)), x)
    threshold = spec.solarize_threshold / 255.0
    x = torch.where(_col(p[:, P_SOLAR] != 0) & (x >= threshold), 1.0 - x, x)
    mean = torch.tensor(spec.mean, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).reshape(1, 3, 1, 1)
    return ((x - mean) / std).reshape(b, v, 3, size, size)


__all__ = ["augment_views"]
