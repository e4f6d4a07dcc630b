"""Weighted k-nearest-neighbour classification of frozen features (the DINO protocol).

    python evaluation/knn.py --checkpoint runs/demo --datasets imagefolder:/data/pets --shots all

Cosine similarity between L2-normalised probe features; each of the k nearest train images votes for its
class with weight exp(similarity / T). Same models, datasets, shot sampling, feature cache and outputs as
evaluation/kshot.py (k is capped by the number of train images when shots are few).
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.cli import add_common_args, plain_warnings, positive_int
from evaluation.kshot import ProbeResult, report

K = 20
TEMPERATURE = 0.07


def knn_classifier(train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int, seed: int,
                   k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> ProbeResult:
    """Predictions for `test_x`; `seed` is unused (kNN is deterministic) but keeps the classifier signature."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    predictions = []
    for part in test_x.split(chunk):  # bounded memory: [chunk, N_train] similarities at a time
        sims = F.normalize(part.float(), dim=1) @ train.T
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(part), num_classes, device=part.device)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        predictions.append(votes.argmax(1))
    return ProbeResult(torch.cat(predictions), {"k": k, "temperature": temperature})


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--k", type=positive_int, default=K, help="neighbours")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="vote weight exp(sim / T)")
    args = parser.parse_args(argv)
    classifier = functools.partial(knn_classifier, k=args.k, temperature=args.temperature)
    return report(args, classifier, f"weighted kNN (k={args.k}, T={args.temperature:g}, cosine)")


if __name__ == "__main__":
    plain_warnings()
    main()
