"""How far recent traffic is from the training data, measured on the served model's logits.

The logits are a linear projection of the embeddings the model computes anyway (its head),
so the measure costs nothing at serving time. Two statistics over a window of the last
`window` predictions:
- distance: the mean over the window of each prediction's squared Mahalanobis distance to
  the nearest class centre (shared covariance, as in Lee et al., NeurIPS 2018, here on the
  head's K outputs instead of the features), each capped at the held-out split's 99th
  percentile: one odd image (seen: a distance of 4255 where the median is 5) cannot flag
  a window of 200 on its own;
- mix: the total-variation distance between the window's predicted-class mix and the
  reference's.
Logits are centred per row first (a softmax does not see a constant added to a row), so
the serving side can recover them from its calibrated probabilities: T * log p.
The trainer fits the centres on its validation logits (labelled, held out from training:
the logits of training images are overconfident) and calibrates both thresholds on its test
logits, a second held-out sample: the (1 - false_alarm) quantile of each statistic over
bootstrap windows of test predictions, so a window of traffic like the data the model was
trained on crosses one of the two with probability ~false_alarm (each threshold at half of
it). The predicted-class mix of the test split is the reference mix. Traffic drifted when
either statistic crosses its threshold.
The distance threshold is also at least (1 + margin) x the held-out mean distance: a window
of 200 is so precise that traffic as close to the training data as another sample of the
same source (Fashion-MNIST's pool against its test file: +2% to +6% in mean distance)
crossed the bootstrap quantile alone in 3.8% of windows, not 1% (bench/drift.py, which
shows the false alarms and detections at each margin). Like the gate's margins, it says
how large a change is worth an alarm.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

WINDOW = 200  # predictions per window: ~1% false alarms need the quantile of a mean
FALSE_ALARM = 0.01
BOOTSTRAP_WINDOWS = 2000
DISTANCE_CAP_PERCENTILE = 99.0
DISTANCE_MARGIN = 0.2  # relative: the mean distance must grow by more than 20% to alarm


@dataclass(frozen=True)
class DriftReference:
    class_means: list[list[float]]  # K x K: the training logits' centre per class
    precision: list[list[float]]  # K x K: inverse of their shared covariance
    mix: list[float]  # the predicted-class mix on validation
    window: int
    distance_threshold: float
    mix_threshold: float
    distance_cap: float | None = None  # per prediction; None in references made before it
    reference_distance: float | None = None  # the held-out mean (capped), for the margin

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DriftReference:
        return cls(**data)


@dataclass(frozen=True)
class DriftReading:
    predictions: int
    distance: float
    mix: float
    distance_threshold: float
    mix_threshold: float

    @property
    def drifted(self) -> bool:
        return self.distance > self.distance_threshold or self.mix > self.mix_threshold


def centred(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    return logits - logits.mean(axis=1, keepdims=True)


def logits_from_probabilities(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Centred logits back from softmax(logits / T) (probabilities kept to 1e-6)."""
    return centred(temperature * np.log(np.clip(probabilities, 1e-6, 1.0)))


def _distances(logits: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    gaps = logits[:, None, :] - means[None, :, :]  # N x K x K
    return np.einsum("nkd,de,nke->nk", gaps, precision, gaps).min(axis=1)


def capped_distances(logits: np.ndarray, reference: DriftReference) -> np.ndarray:
    """Each row's distance to its nearest class centre, capped as the reference says."""
    distance = _distances(logits, np.asarray(reference.class_means),
                          np.asarray(reference.precision))
    return distance if reference.distance_cap is None else np.minimum(distance,
                                                                      reference.distance_cap)


def _mix(logits: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(logits.argmax(axis=1), minlength=n_classes) / max(1, len(logits))


def fit_reference(centre_logits: np.ndarray, centre_labels: np.ndarray,
                  threshold_logits: np.ndarray, window: int = WINDOW,
                  false_alarm: float = FALSE_ALARM, seed: int = 0,
                  margin: float = DISTANCE_MARGIN,
                  cap_percentile: float | None = DISTANCE_CAP_PERCENTILE) -> DriftReference:
    """Class centres and covariance from labelled held-out logits (val/), the mix and the
    thresholds from bootstrap windows of a second held-out set (test/)."""
    centre_logits, threshold_logits = centred(centre_logits), centred(threshold_logits)
    n_classes = centre_logits.shape[1]
    present = [k for k in range(n_classes) if (centre_labels == k).any()]
    means = np.stack([centre_logits[centre_labels == k].mean(axis=0) if k in present
                      else np.full(n_classes, np.inf) for k in range(n_classes)])
    residuals = np.concatenate([centre_logits[centre_labels == k] - means[k] for k in present])
    covariance = np.cov(residuals, rowvar=False) + 1e-6 * np.eye(n_classes)
    precision = np.linalg.pinv(covariance)
    finite = np.where(np.isfinite(means), means, 1e12)  # an absent class is never nearest
    distance = _distances(threshold_logits, finite, precision)
    cap = None if cap_percentile is None else float(np.percentile(distance, cap_percentile))
    if cap is not None:
        distance = np.minimum(distance, cap)
    predicted = threshold_logits.argmax(axis=1)
    mix = np.bincount(predicted, minlength=n_classes) / len(predicted)
    rows = np.random.default_rng(seed).integers(0, len(predicted), (BOOTSTRAP_WINDOWS, window))
    distance_windows = distance[rows].mean(axis=1)
    mix_windows = np.array([0.5 * np.abs(np.bincount(predicted[r], minlength=n_classes)
                                         / window - mix).sum() for r in rows])
    quantile = 100 * (1 - false_alarm / 2)  # two statistics: false_alarm for either
    mean = float(distance.mean())
    return DriftReference(finite.tolist(), precision.tolist(), mix.tolist(), window,
                          max(float(np.percentile(distance_windows, quantile)),
                              (1 + margin) * mean),
                          float(np.percentile(mix_windows, quantile)),
                          distance_cap=cap, reference_distance=mean)


def read(reference: DriftReference, logits: np.ndarray) -> DriftReading:
    """The statistics of one window of logits (its last `reference.window` rows)."""
    recent = centred(logits)[-reference.window:]
    distance = float(capped_distances(recent, reference).mean()) if len(recent) else 0.0
    mix = float(0.5 * np.abs(_mix(recent, len(reference.mix)) - np.asarray(reference.mix)).sum())
    return DriftReading(len(recent), distance, mix, reference.distance_threshold,
                        reference.mix_threshold)


def drift_dir(capture_dir: str | Path) -> Path:
    """Where serving workers write their latest reading (serving.drift_monitor)."""
    return Path(capture_dir) / "drift"


def latest_readings(capture_dir: str | Path, model: str, max_age_s: float = 3600.0) -> list[dict]:
    """The readings the serving workers wrote for `model` in the last max_age_s, newest
    first."""
    folder = drift_dir(capture_dir)
    readings = []
    for path in folder.glob(f"{model}-*.json") if folder.exists() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        # "fm-*" also matches a model named "fm-large": the reading names its model
        if data.get("model") == model and time.time() - data.get("written_at", 0) <= max_age_s:
            readings.append(data)
    return sorted(readings, key=lambda d: d["written_at"], reverse=True)
