"""losses/monitor.py: RankMe against an independent numpy formula and known cases; the four figures of a step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from losses import SIGReg, lejepa_loss
from losses.monitor import MONITOR_TAGS, monitor_figures, rankme


def numpy_rankme(z: np.ndarray) -> float:
    """Garrido et al. 2023, eq. 1-2, in float64 numpy: p_k = sigma_k / sum(sigma) + 1e-7."""
    s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme_matches_numpy_on_random_spectra():
    g = torch.Generator().manual_seed(0)
    for n, k in ((256, 32), (40, 64), (1000, 128)):  # more rows than dims, fewer, many
        z = torch.randn(n, k, generator=g) * torch.rand(k, generator=g) ** 3  # an uneven spectrum
        assert rankme(z).item() == pytest.approx(numpy_rankme(z.numpy()), rel=1e-4)


def test_rankme_known_cases():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(512, 1, generator=g), torch.randn(1, 64, generator=g)
    assert rankme(u @ v).item() == pytest.approx(1.0, abs=2e-3)  # rank 1 (ε adds 63 x 1.6e-6)
    q, _ = torch.linalg.qr(torch.randn(512, 5, generator=g))
    basis, _ = torch.linalg.qr(torch.randn(64, 5, generator=g))
    assert rankme(q @ basis.T).item() == pytest.approx(5.0, rel=1e-3)  # 5 equal singular values
    iso = torch.randn(20000, 32, generator=g)  # isotropic Gaussian, N >> K: singular values ~ equal
    assert 0.99 * 32 < rankme(iso).item() <= 32
    assert rankme(iso * 7.0).item() == pytest.approx(rankme(iso).item(), rel=1e-5)  # scale-free
    assert rankme(torch.zeros(10, 4)).item() == pytest.approx(1.0, abs=1e-5)  # collapsed to a point
    assert math.isnan(rankme(torch.full((10, 4), float("nan"))).item())  # no LAPACK error


def test_monitor_figures_of_a_step():
    g = torch.Generator().manual_seed(2)
    G, L, B, K = 2, 4, 64, 16
    emb = torch.randn(G + L, B, K, generator=g) * torch.linspace(0.5, 2.0, K)
    emb[G:] *= 3  # local views spread more: their SIGReg is larger
    emb.requires_grad_(True)
    sigreg, step = SIGReg(num_slices=128), torch.tensor(7)
    figures = monitor_figures(emb, G, sigreg, step)
    assert figures.shape == (len(MONITOR_TAGS),) and figures.dtype == torch.float32 and not figures.requires_grad
    r, sg, sl, std = figures.tolist()
    z = emb.detach()
    assert r == pytest.approx(numpy_rankme(z[:G].reshape(G * B, K).numpy()), rel=1e-4)
    assert sg == pytest.approx(sigreg(z[:G], step).item(), rel=1e-6)
    assert sl == pytest.approx(sigreg(z[G:], step).item(), rel=1e-6) and sl > sg
    # the loss's SIGReg (mean over all views, same step) is the view-weighted mean of the two groups
    loss_sigreg = lejepa_loss(z[:G], z, sigreg=sigreg, step=step).sigreg.item()
    assert (G * sg + L * sl) / (G + L) == pytest.approx(loss_sigreg, rel=1e-5)
    assert std == pytest.approx(float(np.mean(np.std(z.numpy(), axis=1, ddof=1))), rel=1e-5)
    # a step without local views: sigreg_local is NaN, the rest is unchanged
    no_local = monitor_figures(z[:G], G, sigreg, step).tolist()
    assert math.isnan(no_local[2]) and no_local[0] == pytest.approx(r) and no_local[1] == pytest.approx(sg)
    with pytest.raises(ValueError, match="num_global=7"):
        monitor_figures(z, 7, sigreg, step)


@pytest.mark.gpu
def test_monitor_figures_on_cuda_equal_cpu():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(8, 128, 64, generator=g)
    sigreg, step = SIGReg(num_slices=256), torch.tensor(11)
    cpu = monitor_figures(emb, 2, sigreg, step)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the trainer's context; figures stay fp32
        cuda = monitor_figures(emb.cuda(), 2, sigreg, step.cuda())
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-3, atol=1e-4)
