"""Temperature scaling (Guo et al. 2017): one scalar T fitted on validation logits."""

from __future__ import annotations

import torch
from torch.nn import functional as F

# The prior on log T: a normal around 0 (T = 1) with this spread. On a few thousand val/
# images the data decide; on a handful (a user's first folder of photos, 5 val/ images) one
# wrong answer made T = 32, every prediction near uniform and every image a capture.
LOG_T_PRIOR_SD = 0.5


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 maximising the posterior of softmax(logits / T) on validation: mean NLL plus
    a normal prior on log T, weighted by 1 / (number of images)."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays > 0
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        prior = log_t.pow(2).sum() / (2 * LOG_T_PRIOR_SD ** 2 * len(labels))
        loss = F.cross_entropy(logits / log_t.exp(), labels) + prior
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=1)
