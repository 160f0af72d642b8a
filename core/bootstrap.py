"""Bootstrap intervals for the two figures the loop is judged by: macro-F1 and the mean
recall of the minority classes, for one model or for the difference of two models on the
same images (paired: both are scored on each resample, so the images' difficulty cancels).

Resampling is done with multinomial weights, so B resamples cost two matrix products.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float  # on the images themselves
    low: float  # LEVEL percentile interval over the resamples
    high: float

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _per_class_counts(weights: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                      n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true positives, actual, predicted) per class for each weight row: [B, C] each."""
    truth = np.eye(n_classes)[labels]
    guess = np.eye(n_classes)[predicted]
    return weights @ (truth * guess), weights @ truth, weights @ guess


def _scores(weights: np.ndarray, labels: np.ndarray, predicted: np.ndarray, n_classes: int,
            minority: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """macro-F1 and minority recall for each weight row."""
    tp, actual, guessed = _per_class_counts(weights, labels, predicted, n_classes)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(actual + guessed > 0, 2 * tp / (actual + guessed), 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
    present = np.bincount(labels, minlength=n_classes) > 0  # classes the images have
    macro_f1 = f1[:, present].mean(axis=1)
    minority_recall = (recall[:, minority].mean(axis=1) if minority
                       else np.full(len(weights), np.nan))
    return macro_f1, minority_recall


def _resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)


def _interval(estimate: float, samples: np.ndarray) -> Interval:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def intervals(labels: np.ndarray, predicted: np.ndarray, n_classes: int, minority: list[int],
              resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Interval]:
    """{"macro_f1": ..., "minority_recall": ...} of one model's predictions."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    point = _scores(np.ones((1, len(labels))), labels, predicted, n_classes, minority)
    boot = _scores(_resample_weights(len(labels), resamples, seed), labels, predicted,
                   n_classes, minority)
    return {name: _interval(p[0], b) for name, p, b in
            zip(("macro_f1", "minority_recall"), point, boot, strict=True)}


def paired_difference(labels: np.ndarray, first: np.ndarray, second: np.ndarray,
                      n_classes: int, minority: list[int], resamples: int = RESAMPLES,
                      seed: int = 0) -> dict[str, Interval]:
    """Intervals of (second - first) for macro-F1 and minority recall, same resamples."""
    labels = np.asarray(labels)
    ones = np.ones((1, len(labels)))
    weights = _resample_weights(len(labels), resamples, seed)
    a_point = _scores(ones, labels, np.asarray(first), n_classes, minority)
    b_point = _scores(ones, labels, np.asarray(second), n_classes, minority)
    a_boot = _scores(weights, labels, np.asarray(first), n_classes, minority)
    b_boot = _scores(weights, labels, np.asarray(second), n_classes, minority)
    return {name: _interval(b_point[k][0] - a_point[k][0], b_boot[k] - a_boot[k])
            for k, name in enumerate(("macro_f1", "minority_recall"))}


def _draw_means(labels: np.ndarray, draws: list[np.ndarray], n_classes: int,
                minority: list[int], weights: np.ndarray,
                seed: int) -> tuple[list[float], list[np.ndarray]]:
    """Per figure: the draws' mean on the images, and per resample the mean over draws
    picked with replacement (so the spread between draws is in the interval too)."""
    ones = np.ones((1, len(labels)))
    points = [_scores(ones, labels, np.asarray(d), n_classes, minority) for d in draws]
    boots = [_scores(weights, labels, np.asarray(d), n_classes, minority) for d in draws]
    picks = np.random.default_rng(seed + 1).integers(0, len(draws), (len(weights), len(draws)))
    columns = np.arange(len(weights))
    means = [float(np.mean([p[k][0] for p in points])) for k in range(2)]
    resampled = [np.stack([b[k] for b in boots])[picks.T, columns].mean(axis=0)
                 for k in range(2)]
    return means, resampled


def intervals_of_mean(labels: np.ndarray, draws: list[np.ndarray], n_classes: int,
                      minority: list[int], resamples: int = RESAMPLES,
                      seed: int = 0) -> dict[str, Interval]:
    """Macro-F1 and minority recall of the mean over several models that are draws of one
    random process (random labelling): resamples redraw the images and the draws."""
    labels = np.asarray(labels)
    weights = _resample_weights(len(labels), resamples, seed)
    means, resampled = _draw_means(labels, draws, n_classes, minority, weights, seed)
    return {name: _interval(means[k], resampled[k])
            for k, name in enumerate(("macro_f1", "minority_recall"))}


def paired_difference_to_mean(labels: np.ndarray, draws: list[np.ndarray], second: np.ndarray,
                              n_classes: int, minority: list[int], resamples: int = RESAMPLES,
                              seed: int = 0) -> dict[str, Interval]:
    """Intervals of (second - the draws' mean), on the same image resamples."""
    labels = np.asarray(labels)
    weights = _resample_weights(len(labels), resamples, seed)
    means, resampled = _draw_means(labels, draws, n_classes, minority, weights, seed)
    point = _scores(np.ones((1, len(labels))), labels, np.asarray(second), n_classes, minority)
    boot = _scores(weights, labels, np.asarray(second), n_classes, minority)
    return {name: _interval(point[k][0] - means[k], boot[k] - resampled[k])
            for k, name in enumerate(("macro_f1", "minority_recall"))}
