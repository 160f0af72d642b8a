"""What the handler captures: the capture policy and a rate-capped capturer that never fails
a reply. The store itself (files, schema, transaction) is core.capture_store; while its index
is down, rows wait in core.capture_spool and are written once it is back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from visionloop.core.capture_spool import SPOOL_MAX_BYTES, CaptureSpool, SpoolFull
from visionloop.core.capture_store import CaptureStore, CaptureStoreError
from visionloop.core.errors import InputError
from visionloop.core.manifest import ModelManifest
from visionloop.core.reply import Prediction, Uncertainty

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
        raise InputError(f"capture classes {unknown} are not classes of the model; "
                         f"it has {list(manifest.classes)}")
    return CapturePolicy(max_confidence=max_confidence, per_minute=per_minute,
                         always_classes=tuple(always_classes))


class Capturer:
    """The handler's side of the store: applies the policy and the rate cap, counts, and
    never raises (a full disk is logged; the reply goes out). An index that cannot be
    reached costs no capture: the rows go to the spool, and the next write that reaches
    the index replays the spool first (every process's, oldest first)."""

    def __init__(self, root: str | Path, policy: CapturePolicy = CapturePolicy(),
                 database: str | None = None, spool_max_bytes: int = SPOOL_MAX_BYTES) -> None:
        self.store, self.policy = CaptureStore(root, url=database), policy
        self.spool = CaptureSpool(root, spool_max_bytes)
        # captured: acknowledged in the reply (spooled ones included); spooled: of those, sent
        # to the spool; replayed: spooled rows (any process's) this one wrote to the index
        self.counts = {"captured": 0, "spooled": 0, "replayed": 0, "dropped_rate_limit": 0,
                       "dropped_spool_full": 0, "errors": 0}
        self._lock = threading.Lock()
        self._window_start, self._window_count = time.monotonic(), 0

    def close(self) -> None:
        """Close the store's connection (a PostgreSQL pool's threads with it) and the spool."""
        self.store.close()
        self.spool.close()

    def _within_rate(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        return self._window_count <= self.policy.per_minute

    def _index_or_spool(self, rows: list[dict]) -> bool:
        """Write rows to the index (after what the spool holds), else to the spool; True if
        they are kept either way."""
        try:
            if self.spool.files():
                self.counts["replayed"] += self.store.replay_spool()
            self.store.insert(rows)
            return True
        except CaptureStoreError as exc:
            reason = exc
        try:
            self.spool.append(rows)
        except SpoolFull as exc:
            self.counts["dropped_spool_full"] += len(rows)
            log.error("capture index down (%s) and %s: %d captures dropped", reason, exc,
                      len(rows))
            return False
        except OSError as exc:
            self.counts["errors"] += len(rows)
            log.error("capture index down (%s) and the spool refused the rows (%s): %d "
                      "captures lost", reason, exc, len(rows))
            return False
        self.counts["spooled"] += len(rows)
        log.warning("capture index down, %d captures spooled in %s: %s", len(rows),
                    self.spool.dir, reason)
        return True

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
                rows = self.store.rows([items[i] for i in chosen])
            except (OSError, ValueError) as exc:
                self.counts["errors"] += len(chosen)
                log.error("capture of %d predictions failed (the replies still go out): %s",
                          len(chosen), exc)
                return captured
            if not self._index_or_spool(rows):
                return captured
            self.counts["captured"] += len(chosen)
            for i in chosen:
                captured[i] = True
            return captured

    def maybe_capture(self, data: bytes, request_id: str, reply: Prediction) -> bool:
        """Store one prediction if the policy says it is uncertain; never raises."""
        return self.capture_batch([(data, request_id, reply)])[0]
