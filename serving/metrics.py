"""Our Prometheus metrics, emitted through TorchServe's handler metrics API.

TorchServe's frontend exposes them on the metrics port (metrics_mode=prometheus,
model_metrics_auto_detect=true) with its default ModelName and Level labels:
- PredictionConfidence{PredictedClass, ConfidenceBin}: a confidence histogram per predicted
  class, as counts in ten bins of calibrated max probability ("0.0-0.1" ... "0.9-1.0");
- CapturedPredictions{ModelVersion}: predictions written to the capture store;
- CaptureErrors{ModelVersion}: captures that failed or were dropped with the spool full (the
  reply went out regardless);
- CapturesSpooled{ModelVersion}: of the captured, those the index could not take, kept in the
  spool until it is back (core.capture_spool);
- CapturesRateLimited{ModelVersion}: uncertain predictions not captured because the
  worker's per-minute cap was reached (serving.capture);
- ServedVersion: a gauge, the version number (vN -> N) that answered this replica's last
  batch: each replica's metrics port says which champion it serves;
- TrafficDrift{ModelVersion, Statistic}: gauges of the worker's last window of traffic
  (serving.drift_monitor): Statistic "distance" and "mix" with their thresholds
  ("distance_threshold", "mix_threshold") and "drifted" (1 when either crosses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from visionloop.core.drift import DriftReading
from visionloop.core.reply import Prediction

BINS = 10


def confidence_bin(max_prob: float) -> str:
    index = min(int(max_prob * BINS), BINS - 1)
    return f"{index / BINS:.1f}-{(index + 1) / BINS:.1f}"


@dataclass(frozen=True)
class CaptureCounts:
    """What one batch did to the capture store (differences of Capturer.counts)."""
    captured: int = 0
    errors: int = 0  # failed, or dropped with the spool full
    spooled: int = 0
    rate_limited: int = 0


def version_number(version: str) -> int | None:
    """'v12' -> 12; None for a version not named by the registry's vN scheme."""
    return int(version[1:]) if version[:1] == "v" and version[1:].isdigit() else None


def emit(metrics: Any, replies: list[Prediction], capture: CaptureCounts,
         drift: DriftReading | None = None) -> None:
    """Record one handled batch; `metrics` is TorchServe's context.metrics."""
    from ts.metrics.dimension import Dimension  # TorchServe's own type, only inside a worker
    from ts.metrics.metric_type_enum import MetricTypes

    for reply in replies:
        dims = [Dimension("PredictedClass", reply.label),
                Dimension("ConfidenceBin", confidence_bin(reply.uncertainty.max_prob))]
        metrics.add_counter("PredictionConfidence", 1, dimensions=dims)
    if not replies:
        return
    version = [Dimension("ModelVersion", replies[0].version)]
    metrics.add_counter("CapturedPredictions", capture.captured, dimensions=version)
    metrics.add_counter("CaptureErrors", capture.errors, dimensions=version)
    metrics.add_counter("CapturesSpooled", capture.spooled, dimensions=version)
    metrics.add_counter("CapturesRateLimited", capture.rate_limited, dimensions=version)
    served = version_number(replies[0].version)
    if served is not None:
        metrics.add_metric("ServedVersion", served, "", dimensions=[],
                           metric_type=MetricTypes.GAUGE)
    if drift is not None:
        for statistic, value in (("distance", drift.distance), ("mix", drift.mix),
                                 ("distance_threshold", drift.distance_threshold),
                                 ("mix_threshold", drift.mix_threshold),
                                 ("drifted", float(drift.drifted))):
            metrics.add_metric("TrafficDrift", value, "", dimensions=[
                *version, Dimension("Statistic", statistic)], metric_type=MetricTypes.GAUGE)
