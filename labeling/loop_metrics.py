"""The loop's metrics outside TorchServe, for Prometheus: `GET /metrics` on the backend server.

Counts are read from the stores at scrape time (a custom collector, as exporters of other
programs' state do), so they are the stores' own numbers, survive a restart of the server
and cover what the short-lived jobs (push, pull, retrain) did:
    visionloop_captures                     captured predictions in the capture store
    visionloop_tasks_pushed                 captured images that are Label Studio tasks
    visionloop_labels_pulled                labels pulled that train (known classes)
    visionloop_labels_waiting_for_retrain   of those, labels no retrain has used yet
    visionloop_labels_waiting_for_review    labels sent back, not answered yet
    visionloop_reviews_decided              labels sent back and decided by a reviewer
    visionloop_annotation_events_total{action}  webhook events received
    visionloop_retrain_triggers_total       retrains the webhook started
    visionloop_retrain_last_exit_code       of the last one (-1: none has finished)
    visionloop_gate_decisions_total{promoted}   retrain runs that reached the gate
    visionloop_gate_last_delta{metric, bound}   the last gate's challenger - champion
    visionloop_champion_version             the registry's champion (vN -> N)
and, measured by this process, visionloop_ml_backend_predict_seconds (a histogram of
/predict latency). The champion per TorchServe replica is TorchServe's own
(its management API); drift and captures per request are on TorchServe's metrics port.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from visionloop.core.capture_store import READER_BUSY_TIMEOUT_S, CaptureStore, CaptureStoreError
from visionloop.core.model_store import ModelStore
from visionloop.core.registry import Registry
from visionloop.core.trained_labels import label_files, labels_already_used
from visionloop.labeling.pull import labelled_counts, review_report

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class LoopStores:
    labels_dir: Path
    capture_dir: Path
    store: Path
    model: str
    capture_database: str | None = None


def _capture_counts(stores: LoopStores) -> tuple[int, int] | None:
    try:
        store = CaptureStore(stores.capture_dir, busy_timeout_s=READER_BUSY_TIMEOUT_S,
                             url=stores.capture_database)
    except CaptureStoreError:
        return None
    try:
        return store.count(stores.model), len(store.pushed_tasks(stores.model))
    except CaptureStoreError:
        return None
    finally:
        store.close()


class LoopCollector(Collector):
    def __init__(self, stores: LoopStores) -> None:
        self.stores = stores

    def collect(self) -> Iterator:
        s = self.stores
        captures = _capture_counts(s) if (s.capture_dir / "images").exists() or \
            s.capture_database else (0, 0)
        if captures is not None:
            yield GaugeMetricFamily("visionloop_captures", "captured predictions stored",
                                    value=captures[0])
            yield GaugeMetricFamily("visionloop_tasks_pushed",
                                    "captured images that are Label Studio tasks",
                                    value=captures[1])
        reviews = review_report(s.labels_dir)
        untrained = label_files(s.labels_dir) - labels_already_used(ModelStore(s.store), s.model)
        yield GaugeMetricFamily("visionloop_labels_waiting_for_retrain",
                                "pulled labels no retrain has trained on yet",
                                value=len(untrained))
        yield GaugeMetricFamily("visionloop_labels_pulled", "pulled labels that train",
                                value=sum(labelled_counts(s.labels_dir).values()))
        yield GaugeMetricFamily("visionloop_labels_waiting_for_review",
                                "labels sent back for review, not answered yet",
                                value=reviews["waiting"])
        yield GaugeMetricFamily("visionloop_reviews_decided",
                                "labels sent back and decided by a reviewer",
                                value=reviews["decided"])
        yield from self._events()
        yield from self._gate()

    def _events(self) -> Iterator:
        path = self.stores.labels_dir / "events.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        events = CounterMetricFamily("visionloop_annotation_events",
                                     "annotation webhook events received", labels=["action"])
        for action, count in sorted((state.get("events") or {}).items()):
            events.add_metric([action], count)
        yield events
        yield CounterMetricFamily("visionloop_retrain_triggers",
                                  "retrains the webhook started", value=state.get("triggers", 0))
        code = state.get("last_exit_code")
        yield GaugeMetricFamily("visionloop_retrain_last_exit_code",
                                "exit code of the last retrain the webhook ran (-1: none)",
                                value=-1 if code is None else code)

    def _gate(self) -> Iterator:
        store = ModelStore(self.stores.store)
        if not (self.stores.store / self.stores.model).exists():
            return
        registry = Registry(store, self.stores.model)
        decisions = registry.decisions()
        gate = CounterMetricFamily("visionloop_gate_decisions", "retrain runs that reached "
                                   "the gate", labels=["promoted"])
        gate.add_metric(["true"], sum(d.promoted for d in decisions))
        gate.add_metric(["false"], sum(not d.promoted and bool(d.gate) for d in decisions))
        yield gate
        gated = [d for d in decisions if d.gate]
        if gated:
            delta = GaugeMetricFamily("visionloop_gate_last_delta", "the last gate's challenger "
                                      "- champion, with its interval", labels=["metric", "bound"])
            for metric in ("macro_f1", "minority_recall"):
                interval = gated[-1].gate.get(f"delta_{metric}") or {}
                for bound in ("estimate", "low", "high"):
                    if bound in interval:
                        delta.add_metric([metric, bound], interval[bound])
            yield delta
        try:
            champion = registry.champion()
        except Exception:  # noqa: BLE001 - no champion yet is not a scrape failure
            return
        yield GaugeMetricFamily("visionloop_champion_version", "the registry's champion",
                                value=int(champion.lstrip("v")))


class LoopMetrics:
    """One registry per server: the stores' collector and the /predict latency."""

    def __init__(self, stores: LoopStores | None) -> None:
        self.registry = CollectorRegistry()
        self.predict_seconds = Histogram("visionloop_ml_backend_predict_seconds",
                                         "ML backend /predict latency", registry=self.registry)
        if stores is not None:
            self.registry.register(LoopCollector(stores))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
