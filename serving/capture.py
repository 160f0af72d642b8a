"""The capture store: low-confidence predictions kept on disk for annotators.

Layout under the capture directory:
    images/<sha256[:2]>/<sha256>   content-addressed image bytes (one file per distinct image)
    captures.sqlite3               one row per captured prediction (WAL: many writers)

A capture is committed before the reply leaves the worker, so a worker killed after
replying loses nothing (durability is against process death, not power loss).
Capture never fails or blocks a request: any error (full disk,
locked database) is logged and counted, and the request goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS captures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    predicted TEXT NOT NULL,
    probabilities TEXT NOT NULL,          -- JSON list, in the manifest's class order
    max_prob REAL NOT NULL,
    margin REAL NOT NULL,
    entropy REAL NOT NULL,
    created_at TEXT NOT NULL,             -- ISO 8601 UTC
    task_id INTEGER                       -- set by labeling once pushed
);
CREATE INDEX IF NOT EXISTS captures_sha ON captures(image_sha256);
CREATE INDEX IF NOT EXISTS captures_task ON captures(task_id);
"""


@dataclass(frozen=True)
class CapturePolicy:
    """Capture when any configured test says the model is unsure, or it names a rare class."""

    max_confidence: float | None = 0.7  # capture if calibrated max probability < this
    min_margin: float | None = None  # capture if top1 - top2 < this
    max_entropy: float | None = None  # capture if normalised entropy > this
    # Capture every prediction of these classes (the minority classes): a confident "coat"
    # is still worth a label when the model has seen ten coats, and without these the
    # class-balanced query finds few minority images (bench/label_strategies.py).
    always_classes: tuple[str, ...] = ()
    per_minute: int = 600  # cap per worker; beyond it captures are counted as dropped

    def __post_init__(self) -> None:
        object.__setattr__(self, "always_classes", tuple(self.always_classes))

    def is_uncertain(self, scores: dict[str, float]) -> bool:
        return ((self.max_confidence is not None and scores["max_prob"] < self.max_confidence)
                or (self.min_margin is not None and scores["margin"] < self.min_margin)
                or (self.max_entropy is not None and scores["entropy"] > self.max_entropy))

    def wants(self, reply: dict) -> bool:
        return (self.is_uncertain(reply["uncertainty"])
                or reply["predictions"][0]["label"] in self.always_classes)


def image_path(root: Path, sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")  # refuses path tricks too
    return root / "images" / sha256[:2] / sha256


def connect(db_path: Path, busy_timeout_ms: int = 200) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, timeout=busy_timeout_ms / 1000, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit survives the process being killed; only an OS crash may lose the last.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


class CaptureStore:
    def __init__(self, root: str | Path, policy: CapturePolicy = CapturePolicy()) -> None:
        self.root, self.policy = Path(root), policy
        self.counts = {"captured": 0, "dropped_rate_limit": 0, "errors": 0}
        self._lock = threading.Lock()
        self._window_start, self._window_count = time.monotonic(), 0
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            (self.root / "images").mkdir(parents=True, exist_ok=True)
            self._conn = connect(self.root / "captures.sqlite3")
        return self._conn

    def _within_rate(self) -> bool:
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        return self._window_count <= self.policy.per_minute

    def _write_image(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = image_path(self.root, sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{sha}.{os.getpid()}.{threading.get_ident()}.tmp")
            # No fsync: like the WAL commit (synchronous=NORMAL) the file survives the worker
            # being killed (it is in the OS page cache); neither is promised across power loss.
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def _row(self, data: bytes, request_id: str, reply: dict) -> tuple:
        scores = reply["uncertainty"]
        return (request_id, self._write_image(data), reply["model"], reply["version"],
                reply["predictions"][0]["label"], json.dumps(reply["probabilities"]),
                scores["max_prob"], scores["margin"], scores["entropy"],
                datetime.now(timezone.utc).isoformat(timespec="milliseconds"))

    def _insert(self, rows: list[tuple]) -> None:
        """All rows of a batch in one transaction: one WAL commit instead of one per image."""
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            conn.executemany(
                "INSERT INTO captures (request_id, image_sha256, model_name, model_version,"
                " predicted, probabilities, max_prob, margin, entropy, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def capture_batch(self, items: list[tuple[bytes, str, dict]]) -> list[bool]:
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
                self._insert([self._row(*items[i]) for i in chosen])
            except (OSError, sqlite3.Error, ValueError) as exc:
                self.counts["errors"] += len(chosen)
                log.error("capture of %d predictions failed (the replies still go out): %s",
                          len(chosen), exc)
                return captured
            self.counts["captured"] += len(chosen)
            for i in chosen:
                captured[i] = True
            return captured

    def maybe_capture(self, data: bytes, request_id: str, reply: dict) -> bool:
        """Store one prediction if the policy says it is uncertain; never raises."""
        return self.capture_batch([(data, request_id, reply)])[0]
