"""Query strategies: which uncertain predictions are worth an annotator's time, in what order.

Pure functions over a (N, C) array of calibrated probabilities; every strategy returns
indices into it, most valuable first. The push keeps walking that order past items it
drops as duplicates, so strategies rank everything rather than cut at the budget.
"""

from __future__ import annotations

import math

import numpy as np

STRATEGIES = ("least_confidence", "margin", "entropy", "class_balanced", "random")


def least_confidence(probs: np.ndarray) -> np.ndarray:
    return 1.0 - probs.max(axis=1)


def small_margin(probs: np.ndarray) -> np.ndarray:
    if probs.shape[1] < 2:
        return np.zeros(len(probs))
    top2 = np.sort(probs, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def entropy(probs: np.ndarray) -> np.ndarray:
    clipped = np.clip(probs, 1e-12, 1.0)
    return -(clipped * np.log(clipped)).sum(axis=1)


def _descending(scores: np.ndarray) -> np.ndarray:
    # stable: equal scores keep capture order, so a ranking is reproducible
    return np.argsort(-scores, kind="stable")


def class_balanced(probs: np.ndarray, minority: list[int], budget: int,
                   minority_share: float) -> np.ndarray:
    """Reserve ceil(share x budget) places for the likeliest minority-class images.

    Those places go to the highest probability mass on the minority classes (a coat the
    model calls a shirt at 0.55 still carries 0.4 on coat); the rest of the order is least
    confidence over what is left. Without minority classes it is least confidence.
    """
    by_confidence = _descending(least_confidence(probs))
    if not minority or budget <= 0:
        return by_confidence
    quota = min(len(probs), math.ceil(minority_share * budget))
    minority_mass = probs[:, minority].sum(axis=1)
    reserved = _descending(minority_mass)[:quota]
    taken = np.zeros(len(probs), dtype=bool)
    taken[reserved] = True
    return np.concatenate([reserved, by_confidence[~taken[by_confidence]]])


def rank(probs: np.ndarray, strategy: str, *, budget: int, minority: list[int] | None = None,
         minority_share: float = 0.5, seed: int = 0) -> np.ndarray:
    """Indices of `probs` rows, most worth labelling first."""
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be (N, classes), got shape {probs.shape}")
    if strategy == "least_confidence":
        return _descending(least_confidence(probs))
    if strategy == "margin":
        return _descending(small_margin(probs))
    if strategy == "entropy":
        return _descending(entropy(probs))
    if strategy == "class_balanced":
        if not 0.0 <= minority_share <= 1.0:
            raise ValueError(f"minority share must be within [0, 1], got {minority_share}")
        return class_balanced(probs, list(minority or []), budget, minority_share)
    if strategy == "random":
        return np.random.default_rng(seed).permutation(len(probs))
    raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
