"""The drift of one worker's recent traffic (core.drift), kept as it serves.

Each TorchServe worker keeps the centred logits of its last `window` predictions (recovered
from the calibrated probabilities it replies with) and, after every batch, reads the window
against the reference the trainer put in the manifest (metrics.drift_reference). The
reading is exported as TorchServe gauges (serving.metrics) and written to
<capture dir>/drift/<model>-<pid>.json, at most once a second, for `visionloop label status`
and `visionloop retrain --drift-trigger` to read without TorchServe.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import asdict

import numpy as np

from visionloop.core.drift import (
    DriftReading,
    DriftReference,
    drift_dir,
    logits_from_probabilities,
    read,
)
from visionloop.core.fsutil import atomic_write_json
from visionloop.core.manifest import ModelManifest
from visionloop.core.reply import Prediction

WRITE_EVERY_S = 1.0


class DriftMonitor:
    def __init__(self, manifest: ModelManifest, capture_dir: str | None) -> None:
        found = (manifest.metrics or {}).get("drift_reference")
        self.reference = DriftReference.from_dict(found) if found else None
        self.manifest = manifest
        self.recent: deque[np.ndarray] = deque(
            maxlen=self.reference.window if self.reference else 1)
        self.path = (drift_dir(capture_dir) / f"{manifest.name}-{os.getpid()}.json"
                     if capture_dir else None)
        self._written = 0.0

    def observe(self, replies: list[Prediction]) -> DriftReading | None:
        """Add a batch; the window's reading (None: no reference, or no full window yet)."""
        if self.reference is None or not replies:
            return None
        probabilities = np.array([r.probabilities for r in replies], dtype=np.float64)
        self.recent.extend(logits_from_probabilities(probabilities, self.manifest.temperature))
        if len(self.recent) < self.reference.window:
            return None
        reading = read(self.reference, np.stack(self.recent))
        now = time.monotonic()
        if self.path is not None and now - self._written >= WRITE_EVERY_S:
            self._written = now
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.path, {
                    "model": self.manifest.name, "version": self.manifest.version,
                    "written_at": time.time(), "drifted": reading.drifted, **asdict(reading)})
            except OSError:
                pass  # a reading is advisory: a full disk must not fail the reply
        return reading
