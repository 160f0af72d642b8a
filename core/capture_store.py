"""The capture store: low-confidence predictions kept on disk for annotators.

Layout under the capture directory:
    images/<sha256[:2]>/<sha256>   content-addressed image bytes (one file per distinct image)
    captures.sqlite3               one row per captured prediction (WAL: many writers)

This module owns the store: its schema, its connection, the writer the serving handler
uses and every query labeling needs. Nothing else runs SQL on `captures`.

A batch of captures is committed in one transaction before the replies leave the worker,
so a worker killed after replying loses nothing (durability is against process death,
not power loss).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.db import open_wal, transaction
from core.reply import Prediction

DB_FILE = "captures.sqlite3"
WRITER_BUSY_TIMEOUT_S = 0.2  # the handler never waits long: a busy store is a capture error
READER_BUSY_TIMEOUT_S = 5.0

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


def image_path(root: Path, sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")  # refuses path tricks too
    return Path(root) / "images" / sha256[:2] / sha256


def connect(db_path: Path, busy_timeout_ms: int = 200) -> sqlite3.Connection:
    return open_wal(db_path, SCHEMA, busy_timeout_ms / 1000)


@dataclass(frozen=True)
class CapturedRow:
    """One unlinked capture, as push ranks it."""

    capture_id: int
    sha: str
    model_version: str
    predicted: str
    probabilities: list[float]
    max_prob: float
    margin: float
    entropy: float


class CaptureStore:
    """The store under one capture directory. The connection opens on first use, so a
    worker with a broken capture directory still starts (and counts capture errors)."""

    def __init__(self, root: str | Path, busy_timeout_s: float = WRITER_BUSY_TIMEOUT_S) -> None:
        self.root = Path(root)
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            (self.root / "images").mkdir(parents=True, exist_ok=True)
            self._conn = open_wal(self.root / DB_FILE, SCHEMA, self._busy_timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def image_path(self, sha256: str) -> Path:
        return image_path(self.root, sha256)

    # --- the writer (serving) ---

    def _write_image(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.image_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{sha}.{os.getpid()}.{threading.get_ident()}.tmp")
            # No fsync: like the WAL commit (synchronous=NORMAL) the file survives the worker
            # being killed (it is in the OS page cache); neither is promised across power loss.
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def write(self, items: Sequence[tuple[bytes, str, Prediction]]) -> None:
        """(image bytes, request id, reply) per capture: the images, then every row in one
        transaction (one WAL commit instead of one per image). Raises OSError,
        sqlite3.Error or ValueError; the caller decides what a failure means."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        rows = [(request_id, self._write_image(data), reply.model, reply.version, reply.label,
                 json.dumps(list(reply.probabilities)), reply.uncertainty.max_prob,
                 reply.uncertainty.margin, reply.uncertainty.entropy, now)
                for data, request_id, reply in items]
        with transaction(self._connection()) as conn:
            conn.executemany(
                "INSERT INTO captures (request_id, image_sha256, model_name, model_version,"
                " predicted, probabilities, max_prob, margin, entropy, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    # --- the queries labeling needs (push, pull) ---

    def link(self, links: dict[str, int], model: str) -> int:
        """Set task_id on every unlinked capture of each image; returns captures linked."""
        if not links:
            return 0
        with transaction(self._connection()) as conn:
            return sum(conn.execute(
                "UPDATE captures SET task_id = ? WHERE image_sha256 = ? AND model_name = ?"
                " AND task_id IS NULL", (task, sha, model)).rowcount
                for sha, task in links.items())

    def unlink_tasks_not_in(self, live: set[int], model: str) -> int:
        """Unlink captures whose task is not among `live` (deleted in Label Studio): their
        image can be pushed again. Returns captures unlinked."""
        conn = self._connection()
        dead = [task for (task,) in conn.execute(
            "SELECT DISTINCT task_id FROM captures WHERE model_name = ? AND task_id IS NOT NULL",
            (model,)) if task not in live]
        with transaction(conn):
            return sum(conn.execute("UPDATE captures SET task_id = NULL WHERE model_name = ?"
                                    " AND task_id = ?", (model, task)).rowcount
                       for task in dead)

    def pushed_tasks(self, model: str) -> dict[str, int]:
        """Image sha256 -> its task id, for every image of `model` already pushed."""
        rows = self._connection().execute(
            "SELECT image_sha256, MIN(task_id) FROM captures WHERE model_name = ?"
            " AND task_id IS NOT NULL GROUP BY image_sha256", (model,))
        return dict(rows.fetchall())

    def unlinked(self, model: str) -> Iterable[CapturedRow]:
        """Every capture of `model` not yet linked to a task, oldest first."""
        rows = self._connection().execute(
            "SELECT id, image_sha256, model_version, predicted, probabilities, max_prob,"
            " margin, entropy FROM captures WHERE model_name = ? AND task_id IS NULL"
            " ORDER BY id", (model,))
        for cid, sha, version, predicted, probs, max_prob, margin, entropy in rows:
            yield CapturedRow(cid, sha, version, predicted, json.loads(probs), max_prob,
                              margin, entropy)
