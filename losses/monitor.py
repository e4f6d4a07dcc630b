"""Label-free quality figures of a training step, from the step's embeddings, on the device.

`monitor_figures(all_emb, num_global, sigreg, step)` returns one float32 tensor [4] in the order of
MONITOR_TAGS, for the trainer to read together with its loss figures at a log step:

- `monitor/rankme`: RankMe (Garrido et al. 2023, "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank") of the global views' embeddings Z [G·B, K]:
  exp(−Σ_k p_k log p_k) with p_k = σ_k(Z) / ‖σ(Z)‖₁ + ε, ε = 1e-7 (theirs). 1 for collapsed embeddings,
  up to min(G·B, K) for whitened ones.
- `monitor/sigreg_global`, `monitor/sigreg_local`: SIGReg of the global and of the local view group with the
  step's directions (the loss's `train/sigreg` is their mean weighted by view counts); local is NaN when
  there are no local views.
- `monitor/emb_std`: per-dimension standard deviation over the batch, averaged over dimensions and views
  (1 for the isotropic Gaussian SIGReg aims at, 0 at collapse).

No `.item()` and no tensor leaves the device. One caveat on CUDA: `torch.linalg.svdvals` checks cuSOLVER's
status on the host, so the call waits for the device once; call it inside the log step just before the
figures are read (which waits anyway), not on non-logging steps. Under DDP, rankme and emb_std are rank-local
(this rank's batch) while the two SIGReg figures are global (SIGReg all-reduces its characteristic function):
every rank must call it at the same steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.sigreg import SIGReg

MONITOR_TAGS = ("monitor/rankme", "monitor/sigreg_global", "monitor/sigreg_local", "monitor/emb_std")
RANKME_EPS = 1e-7  # Garrido et al.'s epsilon for float32


def rankme(z: Tensor, eps: float = RANKME_EPS) -> Tensor:
    """RankMe of an embedding matrix `z` [N, K] as a 0-d float32 tensor (NaN if `z` is not finite)."""
    z = z.float()
    finite = torch.isfinite(z).all()
    # LAPACK/cuSOLVER reject non-finite input: feed zeros instead and report NaN, without a host check
    s = torch.linalg.svdvals(torch.where(finite, z, torch.zeros_like(z)))
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny) + eps
    return torch.where(finite, torch.exp(-(p * p.log()).sum()), torch.full_like(s[0], float("nan")))


@torch.no_grad()
def monitor_figures(all_emb: Tensor, num_global: int, sigreg: SIGReg, step: Tensor | int) -> Tensor:
    """`all_emb` [V, B, K] (the step's embeddings, the `num_global` global views first), the loss's SIGReg
    module and step counter -> float32 [4] on the same device: rankme, sigreg_global, sigreg_local, emb_std."""
    if all_emb.dim() != 3:
        raise ValueError(f"monitor_figures: all_emb must be [V, B, K], got shape {tuple(all_emb.shape)}")
    if not 1 <= num_global <= all_emb.shape[0]:
        raise ValueError(f"monitor_figures: num_global={num_global} must be in [1, {all_emb.shape[0]}] (views)")
    with torch.autocast(all_emb.device.type, enabled=False):
        z = all_emb.detach().float()
        glob, loc = z[:num_global], z[num_global:]
        nan = torch.full((), float("nan"), device=z.device)
        return torch.stack([
            rankme(glob.flatten(0, 1)),
            sigreg(glob, step),
            sigreg(loc, step) if loc.shape[0] else nan,
            z.std(dim=1).mean(),
        ])
