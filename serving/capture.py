"""What the handler captures: the capture policy and a rate-capped capturer that never fails
a reply. The store itself (files, schema, transaction) is core.capture_store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.capture_store import CaptureStore, CaptureStoreError
from core.manifest import ModelManifest
from core.reply import Prediction, Uncertainty

log = logging.getLogger(__name__)

CAPTURE_BELOW = 0.7  # calibrated confidence under which a prediction is captured
CAPTURES_PER_MINUTE = 600  # per worker; beyond it captures are counted as dropped


@dataclass(frozen=True)
class CapturePolicy:
    """Capture when any configured test says the model is unsure, or it names a rare class."""

    max_confidence: float | None = CAPTURE_BELOW  # capture if calibrated max probability < this
    min_margin: float | None = None  # capture if top1 - top2 < this
    max_entropy: float | None = None  # capture if normalised entropy > this
    # Capture every prediction of these classes (the minority classes): a confident "coat"
    # is still worth a label when the model has seen ten coats, and without these the
    # class-balanced query finds few minority images (bench/label_strategies.py).
    always_classes: tuple[str, ...] = ()
    per_minute: int = CAPTURES_PER_MINUTE

    def __post_init__(self) -> None:
        object.__setattr__(self, "always_classes", tuple(self.always_classes))

    def is_uncertain(self, scores: Uncertainty) -> bool:
        return ((self.max_confidence is not None and scores.max_prob < self.max_confidence)
                or (self.min_margin is not None and scores.margin < self.min_margin)
                or (self.max_entropy is not None and scores.entropy > self.max_entropy))

    def wants(self, reply: Prediction) -> bool:
        return self.is_uncertain(reply.uncertainty) or reply.label in self.always_classes


def capture_policy(manifest: ModelManifest, max_confidence: float | None = CAPTURE_BELOW,
                   per_minute: int = CAPTURES_PER_MINUTE,
                   always_classes: Sequence[str] | None = None) -> CapturePolicy:
    """The policy a version is served with. always_classes None: the manifest's minority
    classes (core.manifest.ModelManifest.minority_classes); () captures no class always."""
    if always_classes is None:
        always_classes = manifest.minority_classes
    unknown = sorted(set(always_classes) - set(manifest.classes))
    if unknown:
        raise ValueError(f"capture classes {unknown} are not classes of the model; "
                         f"it has {list(manifest.classes)}")
    return CapturePolicy(max_confidence=max_confidence, per_minute=per_minute,
                         always_classes=tuple(always_classes))


class Capturer:
    """The handler's side of the store: applies the policy and the rate cap, counts, and
    never raises (a full disk or a locked database is logged; the reply goes out)."""

    def __init__(self, root: str | Path, policy: CapturePolicy = CapturePolicy(),
                 database: str | None = None) -> None:
        self.store, self.policy = CaptureStore(root, url=database), policy
        self.counts = {"captured": 0, "dropped_rate_limit": 0, "errors": 0}
        self._lock = threading.Lock()
        self._window_start, self._window_count = time.monotonic(), 0

    def close(self) -> None:
        """Close the store's connection (a PostgreSQL pool's threads with it)."""
        self.store.close()

    def _within_rate(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        return self._window_count <= self.policy.per_minute

    def capture_batch(self, items: list[tuple[bytes, str, Prediction]]) -> list[bool]:
        """(image bytes, request id, reply) per request -> captured or not; never raises."""
        captured = [False] * len(items)
        with self._lock:
            chosen = []
            for i, (_, _, reply) in enumerate(items):
                if not self.policy.wants(reply):
                    continue
                if self._within_rate():
                    chosen.append(i)
                else:
                    self.counts["dropped_rate_limit"] += 1
            if not chosen:
                return captured
            try:
                self.store.write([items[i] for i in chosen])
            except (OSError, CaptureStoreError, ValueError) as exc:
                self.counts["errors"] += len(chosen)
                log.error("capture of %d predictions failed (the replies still go out): %s",
                          len(chosen), exc)
                return captured
            self.counts["captured"] += len(chosen)
            for i in chosen:
                captured[i] = True
            return captured

    def maybe_capture(self, data: bytes, request_id: str, reply: Prediction) -> bool:
        """Store one prediction if the policy says it is uncertain; never raises."""
        return self.capture_batch([(data, request_id, reply)])[0]
