"""The LeJEPA objective: predict the global views' centre from every view, plus λ·SIGReg."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from losses.sigreg import SIGReg


class LeJEPALoss(NamedTuple):
    loss: Tensor  # (1 − λ)·pred + λ·sigreg, the value to backpropagate
    pred: Tensor  # mean squared distance of every view's embedding to the global centre
    sigreg: Tensor  # SIGReg averaged over views


def lejepa_loss(
    global_emb: Tensor, all_emb: Tensor, lambd: float = 0.05, *, sigreg: SIGReg, step: Tensor | int
) -> LeJEPALoss:
    """`global_emb` [G, B, K] (the global views), `all_emb` [V, B, K] (all views, globals included).

    No stop-gradient: the centre is a function of the same encoder, as in the paper. Under DDP the
    prediction term is a local mean (DDP's gradient averaging makes it global) while SIGReg is already
    global (see `losses.sigreg`).
    """
    if global_emb.dim() != 3 or all_emb.dim() != 3:
        raise ValueError(
            f"lejepa_loss: embeddings must be [V, B, K]; got global_emb {tuple(global_emb.shape)}, "
            f"all_emb {tuple(all_emb.shape)}"
        )
    if global_emb.shape[1:] != all_emb.shape[1:]:
        raise ValueError(
            f"lejepa_loss: global_emb {tuple(global_emb.shape)} and all_emb {tuple(all_emb.shape)} "
            "must agree on batch size and embedding dim"
        )
    if not 0.0 <= lambd <= 1.0:
        raise ValueError(f"lejepa_loss: lambd must be in [0, 1], got {lambd}")
    centre = global_emb.mean(0)
    pred = (centre - all_emb).square().mean()
    sig = sigreg(all_emb, step)
    return LeJEPALoss((1.0 - lambd) * pred + lambd * sig, pred, sig)
