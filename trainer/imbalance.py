"""Class-imbalance handling: losses and sampling weights, selectable by name.

- none: plain cross-entropy.
- oversample: cross-entropy, with a sampler that draws each class equally often.
- class_balanced: cross-entropy weighted by the inverse effective number of samples
  (Cui et al. 2019, (1 - beta) / (1 - beta^n)).
- logit_adjust: cross-entropy on logits + tau * log(prior) (Menon et al. 2021;
  tau = 1 is balanced softmax); the model's raw logits then estimate balanced posteriors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from visionloop.core.errors import InputError
from visionloop.trainer.config import IMBALANCE_METHODS as METHODS


def _check_counts(counts: list[int]) -> torch.Tensor:
    if any(c <= 0 for c in counts):
        raise InputError(f"every class needs at least one training image, counts are {counts}")
    return torch.tensor(counts, dtype=torch.float64)


def class_balanced_weights(counts: list[int], beta: float = 0.9999) -> torch.Tensor:
    """Per-class loss weights from the effective number of samples, averaging to 1."""
    n = _check_counts(counts)
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    return (weights / weights.mean()).float()


class LogitAdjustedLoss(nn.Module):
    def __init__(self, counts: list[int], tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        prior = _check_counts(counts) / sum(counts)
        self.register_buffer("adjustment", (tau * prior.log()).float())
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.adjustment, targets,
                               label_smoothing=self.label_smoothing)


def build_loss(method: str, counts: list[int], label_smoothing: float = 0.0,
               cb_beta: float = 0.9999, la_tau: float = 1.0) -> nn.Module:
    if method not in METHODS:
        raise ValueError(f"unknown imbalance method {method!r}; choose from {METHODS}")
    if method == "class_balanced":
        return nn.CrossEntropyLoss(weight=class_balanced_weights(counts, cb_beta),
                                   label_smoothing=label_smoothing)
    if method == "logit_adjust":
        return LogitAdjustedLoss(counts, la_tau, label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def oversampling_weights(labels: list[int], counts: list[int]) -> torch.Tensor:
    """Per-sample weights that make every class equally likely to be drawn."""
    per_class = 1.0 / _check_counts(counts)
    return per_class[torch.tensor(labels)]
