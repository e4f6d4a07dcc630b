"""SIGReg forward+backward time vs batch size N, against a straightforward upstream-style formulation.

    python benchmarks/sigreg.py [--dim 512] [--slices 1024] [--sizes 512 1024 ... 32768] [--repeats 3]

The upstream formulation (LeJEPA's minimal SIGReg) keeps the full [N, M, T] phase tensor in autograd and
differentiates cos and sin separately; ours saves only the projections and fuses both derivatives.
Both are timed interleaved in one process; the figure is the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import append_rows, emit  # noqa: E402
from losses.sigreg import SIGReg  # noqa: E402


class UpstreamSIGReg(torch.nn.Module):
    """The formulation of the LeJEPA reference code, re-implemented as a baseline."""

    def __init__(self, num_slices: int = 1024, knots: int = 17):
        super().__init__()
        t = torch.linspace(0, 3, knots)
        dt = 3 / (knots - 1)
        weights = torch.full((knots,), 2 * dt)
        weights[[0, -1]] = dt
        window = torch.exp(-t.square() / 2.0)
        self.num_slices = num_slices
        self.register_buffer("t", t)
        self.register_buffer("phi", window)
        self.register_buffer("weights", weights * window)

    def forward(self, proj: torch.Tensor, step: int) -> torch.Tensor:
        g = torch.Generator(device=proj.device).manual_seed(step)
        a = torch.randn(proj.size(-1), self.num_slices, device=proj.device, generator=g)
        a = a.div_(a.norm(p=2, dim=0))
        x_t = (proj @ a).unsqueeze(-1) * self.t
        err = (x_t.cos().mean(-3) - self.phi).square() + x_t.sin().mean(-3).square()
        return ((err @ self.weights) * proj.size(-2)).mean()


def time_fwd_bwd(module, z: torch.Tensor, step: int) -> float:
    sync = torch.cuda.synchronize if z.is_cuda else (lambda: None)
    z.grad = None
    sync()
    start = time.perf_counter()
    module(z, step).backward()
    sync()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--slices", type=int, default=1024)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-markdown", action="store_true", help="do not append to BENCHMARKS.md")
    args = p.parse_args()

    device = torch.device(args.device)
    ours = SIGReg(num_slices=args.slices).to(device)
    upstream = UpstreamSIGReg(num_slices=args.slices).to(device)
    rows = []
    for n in args.sizes:
        z = torch.randn(n, args.dim, device=device, requires_grad=True)
        time_fwd_bwd(ours, z, 0), time_fwd_bwd(upstream, z, 0)  # warm-up
        t_ours, t_up = [], []
        for r in range(args.repeats):  # interleaved so drift hits both alike
            t_ours.append(time_fwd_bwd(ours, z, r))
            t_up.append(time_fwd_bwd(upstream, z, r))
        ours_ms, up_ms = 1e3 * statistics.median(t_ours), 1e3 * statistics.median(t_up)
        rec = {"bench": "sigreg", "device": device.type, "n": n, "dim": args.dim, "slices": args.slices,
               "ours_ms": round(ours_ms, 2), "upstream_ms": round(up_ms, 2), "ratio": round(ours_ms / up_ms, 3),
               "ours_us_per_sample": round(1e3 * ours_ms / n, 3), "repeats": args.repeats}
        emit(rec)
        rows.append([n, f"{ours_ms:.1f}", f"{rec['ours_us_per_sample']:.2f}", f"{up_ms:.1f}", f"{rec['ratio']:.2f}"])
        del z
    if not args.no_markdown:
        append_rows(
            f"SIGReg forward+backward ({device.type}, K={args.dim}, M={args.slices}, 17 knots)",
            ["N", "ours ms", "ours µs/sample", "upstream ms", "ours / upstream"], rows,
            note=f"Median of {args.repeats} interleaved runs after one warm-up.",
        )


if __name__ == "__main__":
    main()
