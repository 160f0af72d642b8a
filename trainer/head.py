"""Classifier re-training on frozen backbone embeddings (decoupled representation and
classifier, Kang et al., ICLR 2020): a linear head fit by full-batch L-BFGS on cached
embeddings, in seconds on a CPU.

The imbalance handling is logit adjustment (Menon et al., ICLR 2021) with a prior that is
passed in, not re-counted: a retrain keeps the champion's training prior, so labels of a
rare class found by the loop add evidence for it without also shrinking its adjustment.
Measured: the pool's minority images alone, added with the prior kept, gave minority
recall 0.739 against 0.665 with the prior re-counted (issue 12's probe, 64 px Lite0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from visionloop.trainer.metrics import classification_report


def fit_linear_head(features: np.ndarray, labels: np.ndarray, prior: np.ndarray,
                    sample_weights: np.ndarray | None = None, l2: float = 1e-3,
                    max_iter: int = 200, init: tuple[np.ndarray, np.ndarray] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Weight [C, D] and bias [C] of logits = W x + b, fit on (features, labels) with the
    loss CE(W x + b + log prior, y), weighted per sample, plus l2 * |W|^2 / 2. The raw
    logits then estimate class-balanced posteriors."""
    n_classes = len(prior)
    if np.any(prior <= 0):
        raise ValueError(f"every class needs a positive prior, got {prior.tolist()}")
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    w = torch.ones(len(y)) if sample_weights is None else torch.from_numpy(
        np.asarray(sample_weights, dtype=np.float32))
    w = w / w.sum()
    adjustment = torch.from_numpy(np.log(prior / prior.sum())).float()
    weight = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    if init is not None:
        with torch.no_grad():
            weight.copy_(torch.from_numpy(init[0]))
            bias.copy_(torch.from_numpy(init[1]))
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight.T + bias + adjustment
        loss = (F.cross_entropy(logits, y, reduction="none") * w).sum()
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().numpy().copy(), bias.detach().numpy().copy()


# Chosen on val/ macro-F1 per run: the best strength differs by data set and by how many
# images a class has (at 64 px on the long-tailed Fashion-MNIST, 1e-3 gave minority recall
# 0.56 and 1e-2 gave 0.70 on test; val picked 1e-2).
L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass(frozen=True)
class HeadFit:
    weight: np.ndarray  # [C, D], on raw embeddings (the standardisation folded in)
    bias: np.ndarray  # [C]
    l2: float
    val_macro_f1: dict[float, float]  # per l2 tried


def logits_of(fit: HeadFit, features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(features @ fit.weight.T + fit.bias).float()


def no_stronger_than(ceiling: float) -> tuple[float, ...]:
    """The strengths a retrain of a head fit at `ceiling` tries: that one first (it wins a
    tie on val/), then the weaker ones of L2_GRID, strongest first. More labels justify
    less regularisation, never more; see trainer.train.head_strengths for the figures."""
    return (ceiling,) + tuple(sorted((g for g in L2_GRID if g < ceiling), reverse=True))


def fit_head(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
             classes: tuple[str, ...], prior: np.ndarray,
             strengths: tuple[float, ...] = L2_GRID) -> HeadFit:
    """Standardise by the training embeddings, fit one head per L2 strength and keep the
    best on val macro-F1; a tie keeps the first."""
    mean, scale = train[0].mean(axis=0), train[0].std(axis=0) + 1e-6
    x_train = ((train[0] - mean) / scale).astype(np.float32)
    x_val = ((val[0] - mean) / scale).astype(np.float32)
    scores: dict[float, float] = {}
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for strength in strengths:
        weight, bias = fit_linear_head(x_train, train[1], prior, l2=strength)
        logits = torch.from_numpy(x_val @ weight.T + bias)
        scores[strength] = classification_report(logits, torch.from_numpy(val[1]),
                                                 classes)["macro_f1"]
        if best is None or scores[strength] > scores[best[0]]:
            best = (strength, weight, bias)
    strength, weight, bias = best
    folded = weight / scale  # W ((x - mean) / scale) + b = (W / scale) x + (b - (W / scale) mean)
    return HeadFit(folded.astype(np.float32), (bias - folded @ mean).astype(np.float32),
                   strength, scores)


def set_head(model: nn.Module, head_prefix: str, fit: HeadFit) -> None:
    head = model.get_submodule(head_prefix.rstrip("."))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(fit.weight))
        head.bias.copy_(torch.from_numpy(fit.bias))
