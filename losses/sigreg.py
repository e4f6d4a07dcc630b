"""SIGReg: sliced Epps–Pulley test of embeddings against an isotropic Gaussian (LeJEPA, arXiv 2511.08544).

For one direction a ∈ S^{K-1} and projections x_n = <z_n, a>, the Epps–Pulley statistic is

    EP = N · ∫ |φ̂_N(t) − φ(t)|² w(t) dt,   φ̂_N(t) = mean_n e^{i t x_n},  φ(t) = e^{−t²/2},  w(t) = e^{−t²/2}.

The integrand is even in t, so we integrate over [0, t_max] with the trapezoid rule and double it: the
value is the integral over the full symmetric range [−t_max, t_max] (the upstream convention).

Distributed: the empirical characteristic function (ECF) is a mean over samples, so every rank computes
its local mean and one autograd-carrying all-reduce averages them; N is then the global sample count
(ranks must hold equal batch sizes, which a `drop_last` loader guarantees). The all-reduce's backward
sums the identical upstream gradients of all ranks, so each rank's local gradient is W times the
single-process one and DDP's division by W restores it exactly: value and parameter gradients equal one
process on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn


def _trapezoid_gauss_weights(t: Tensor) -> Tensor:
    dt = t[1] - t[0]
    w = torch.full_like(t, 2.0) * dt  # ×2: integral over [−t_max, t_max] from the half range
    w[0] = w[-1] = dt
    return w * torch.exp(-0.5 * t.square())


class _ECF(torch.autograd.Function):
    """(mean_n cos(t x_n), mean_n sin(t x_n)) → [2, ..., M, T] for x [..., N, M].

    Why not plain autograd: it keeps the [N, M, T] phase tensor and recomputes sin and cos of it in
    backward, then reduces over T in several passes. Here forward writes cos and sin once, laid out
    [..., M, N, T], and backward is two batched matrix-vector products over those buffers:
    d/dx_n = Σ_t t·(g_S cos(t x_n) − g_C sin(t x_n)) / N. About 2× the saved memory of the phase
    tensor, no transcendental in backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor) -> Tensor:
        phase = x.transpose(-1, -2).contiguous().unsqueeze(-1) * t  # [..., M, N, T]
        cos, sin = phase.cos(), phase.sin()
        ctx.save_for_backward(cos, sin, t)
        return torch.stack([cos.mean(-2), sin.mean(-2)])  # [2, ..., M, T]

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin, t = ctx.saved_tensors
        scale = t / cos.shape[-2]
        # Two batched matrix-vector products over the saved buffers: [..., M, N, T] @ [..., M, T, 1].
        dx = cos @ (grad[1] * scale).unsqueeze(-1) - sin @ (grad[0] * scale).unsqueeze(-1)
        return dx.squeeze(-1).transpose(-1, -2), None


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def epps_pulley(x: Tensor, t_max: float = 3.0, num_knots: int = 17) -> Tensor:
    """Epps–Pulley statistics of `x` [..., N, M] (N samples on M directions) → [..., M].

    Under `torch.distributed` the ECF is averaged over ranks and N is the global sample count.
    Only shapes and arguments are checked: checking values would cost a host sync every step.
    """
    if x.dim() < 2:
        raise ValueError(f"epps_pulley: x must be [..., N, M] with at least 2 dims, got shape {tuple(x.shape)}")
    if x.shape[-2] < 2:
        raise ValueError(f"epps_pulley: x needs at least 2 samples along dim -2, got N={x.shape[-2]}")
    if not t_max > 0:
        raise ValueError(f"epps_pulley: t_max must be > 0, got {t_max}")
    if num_knots < 2:
        raise ValueError(f"epps_pulley: num_knots must be >= 2, got {num_knots}")
    t = torch.linspace(0.0, t_max, num_knots, dtype=x.dtype, device=x.device)
    ecf = _ECF.apply(x, t)  # [2, ..., M, T]
    world = _world_size()
    if world > 1:
        # Functional collective: carries autograd (backward = all-reduce of the gradient) and traces
        # under torch.compile without a graph break. Sum then divide: gloo has no AVG.
        ecf = funcol.all_reduce(ecf, "sum", dist.group.WORLD) / world
    err = (ecf[0] - torch.exp(-0.5 * t.square())).square() + ecf[1].square()
    return (err @ _trapezoid_gauss_weights(t)) * (x.shape[-2] * world)


def _hash32(x: Tensor) -> Tensor:
    """Wellons' `lowbias32` integer hash on int64 tensors holding uint32 values.

    Products are split into 16-bit halves so nothing overflows int64 (no reliance on wrap-around).
    """

    def mul32(a: Tensor, c: int) -> Tensor:
        lo, hi = c & 0xFFFF, c >> 16
        return (a * lo + (((a * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF

    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_directions(step: Tensor | int, dim: int, num: int, seed: int = 0, device=None) -> Tensor:
    """`num` unit directions in R^dim as columns [dim, num], a pure function of (seed, step).

    A counter-based generator evaluated on the device: `step` may be a device tensor, so drawing new
    directions each step needs no `.item()`, no host sync, no collective, and (as a tensor) no recompile
    under `torch.compile`. Every rank holds the same step, hence the same directions.
    """
    step = torch.as_tensor(step, device=device, dtype=torch.int64)
    key = _hash32(_hash32(step + seed * 0x9E3779B9) ^ 0x5BD1E995)
    pairs = (dim * num + 1) // 2
    counter = torch.arange(2 * pairs, device=step.device, dtype=torch.int64)
    u = (_hash32(counter ^ key).to(torch.float32) + 0.5) * 2.0**-32  # uniform in (0, 1)
    u1, u2 = u.view(2, pairs)
    radius, angle = torch.sqrt(-2.0 * torch.log(u1)), 2.0 * torch.pi * u2  # Box–Muller: two normals per pair
    gauss = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[: dim * num].view(dim, num)
    return gauss / gauss.norm(dim=0, keepdim=True)


class SIGReg(nn.Module):
    """Mean sliced Epps–Pulley statistic of embeddings `z` [..., N, K] over `num_slices` directions.

    Leading dims (e.g. views [V, N, K]) share the step's directions and are averaged, so a whole
    multi-view batch costs one matmul and, under DDP, one all-reduce.
    """

    def __init__(self, num_slices: int = 1024, t_max: float = 3.0, num_knots: int = 17, seed: int = 0):
        super().__init__()
        if num_slices < 1:
            raise ValueError(f"SIGReg: num_slices must be >= 1, got {num_slices}")
        if not t_max > 0:
            raise ValueError(f"SIGReg: t_max must be > 0, got {t_max}")
        if num_knots < 2:
            raise ValueError(f"SIGReg: num_knots must be >= 2, got {num_knots}")
        self.num_slices, self.t_max, self.num_knots, self.seed = num_slices, t_max, num_knots, seed

    def forward(self, z: Tensor, step: Tensor | int) -> Tensor:
        if z.dim() < 2:
            raise ValueError(f"SIGReg: z must be [..., N, K], got shape {tuple(z.shape)}")
        # Fp32 even under bf16 autocast: the ECF compares means of cosines to e^{-t²/2} at ~1e-3.
        with torch.autocast(device_type=z.device.type, enabled=False):
            if z.dtype in (torch.float16, torch.bfloat16):
                z = z.float()
            dirs = random_directions(step, z.shape[-1], self.num_slices, self.seed, device=z.device)
            proj = z @ dirs.to(z.dtype)
            return epps_pulley(proj, self.t_max, self.num_knots).mean()

    def extra_repr(self) -> str:
        return f"num_slices={self.num_slices}, t_max={self.t_max}, num_knots={self.num_knots}, seed={self.seed}"
