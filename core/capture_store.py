"""The capture store: low-confidence predictions kept for annotators.

Two parts:
    images/<sha256[:2]>/<sha256>   content-addressed image bytes under the capture directory
                                   (one write-once file per distinct image, renamed into place:
                                   safe on a filesystem several replicas share)
    the index                      one row per captured prediction, in a database chosen by
                                   URL (database_url): SQLite in the capture directory by
                                   default (one machine), or PostgreSQL that several
                                   TorchServe replicas, push and pull share

This module owns the store: its schema and migrations, its connections, the writer the
serving handler uses and every query labeling needs. Nothing else runs SQL on `captures`.

A batch of captures is committed in one transaction before the replies leave the worker,
so a worker killed after replying loses nothing (durability is against process death,
not power loss). A store that cannot be reached raises CaptureStoreError within the
writer's timeout; the handler counts it and replies anyway (serving.capture).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from visionloop.core.capture_spool import ROW_FIELDS, CaptureSpool, new_key
from visionloop.core.db import open_wal, transaction
from visionloop.core.errors import InputError
from visionloop.core.reply import Prediction

DB_FILE = "captures.sqlite3"
DATABASE_ENV = "VISIONLOOP_CAPTURE_DATABASE"  # the index's URL, for every process that opens it
WRITER_BUSY_TIMEOUT_S = 0.2  # the handler never waits long: a busy store is a capture error
READER_BUSY_TIMEOUT_S = 5.0
POSTGRES_POOL_SIZE = 2  # per process: a worker writes one batch at a time
FIRST_CONNECTION_WAIT_S = 2.0  # a store's first use waits this long for its first connection
# Where two replicas open a fresh PostgreSQL index at once, one migrates, the other waits.
MIGRATION_LOCK_KEY = 0x76697369  # "visi"


class CaptureStoreError(RuntimeError):
    """The index could not be reached, or refused the write or query."""


# (version, what it does, SQLite statements, PostgreSQL statements). Append only: a
# store records the versions it has (schema_migrations) and gets the missing ones, in
# order, in one transaction, when any process opens it.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...], tuple[str, ...]], ...] = (
    (1, "captures and their lookups", (
        """CREATE TABLE IF NOT EXISTS captures (
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
        )""",
        "CREATE INDEX IF NOT EXISTS captures_sha ON captures(image_sha256)",
        "CREATE INDEX IF NOT EXISTS captures_task ON captures(task_id)",
    ), (
        """CREATE TABLE IF NOT EXISTS captures (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            request_id TEXT NOT NULL,
            image_sha256 TEXT NOT NULL,
            model_name TEXT NOT NULL,
            model_version TEXT NOT NULL,
            predicted TEXT NOT NULL,
            probabilities TEXT NOT NULL,
            max_prob DOUBLE PRECISION NOT NULL,
            margin DOUBLE PRECISION NOT NULL,
            entropy DOUBLE PRECISION NOT NULL,
            created_at TEXT NOT NULL,
            task_id BIGINT
        )""",
        "CREATE INDEX IF NOT EXISTS captures_sha ON captures(image_sha256)",
        "CREATE INDEX IF NOT EXISTS captures_task ON captures(task_id)",
    )),
    (2, "unlinked captures of a model, in capture order (push reads them every run)", (
        "CREATE INDEX IF NOT EXISTS captures_unlinked ON captures(model_name, id)"
        " WHERE task_id IS NULL",
    ), (
        "CREATE INDEX IF NOT EXISTS captures_unlinked ON captures(model_name, id)"
        " WHERE task_id IS NULL",
    )),
    (3, "a unique key per row, so a spooled batch replayed twice is written once", (
        "ALTER TABLE captures ADD COLUMN spool_key TEXT",
        "CREATE UNIQUE INDEX IF NOT EXISTS captures_spool_key ON captures(spool_key)",
    ), (
        "ALTER TABLE captures ADD COLUMN IF NOT EXISTS spool_key TEXT",
        "CREATE UNIQUE INDEX IF NOT EXISTS captures_spool_key ON captures(spool_key)",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
MIGRATIONS_TABLE = ("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                    " description TEXT NOT NULL, applied_at TEXT NOT NULL)")


def image_path(root: Path, sha256: str) -> Path:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")  # refuses path tricks too
    return Path(root) / "images" / sha256[:2] / sha256


def database_url(root: str | Path, url: str | None = None) -> str:
    """The index's URL: `url`, else $VISIONLOOP_CAPTURE_DATABASE, else the SQLite file in
    the capture directory."""
    url = url or os.environ.get(DATABASE_ENV) or ""
    if not url:
        return f"sqlite:///{(Path(root) / DB_FILE).resolve()}"
    scheme = urlsplit(url).scheme
    if scheme not in ("sqlite", "postgresql", "postgres"):
        raise InputError(f"capture database must be sqlite:///PATH or postgresql://..., "
                         f"got {redacted(url)!r}")
    return url


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _SqliteIndex:
    """One WAL connection; `?` placeholders as the store's SQL is written."""

    backend = "sqlite"

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = open_wal(path, "", busy_timeout_s)  # the schema: migrate()
        except sqlite3.Error as exc:
            raise CaptureStoreError(f"capture index (SQLite {path}): {exc}") from exc

    @contextlib.contextmanager
    def transaction(self, migrating: bool = False) -> Iterator[Any]:
        try:
            # immediate when migrating: the write lock before reading what is applied
            with transaction(self._conn, immediate=migrating) as conn:
                yield conn
        except sqlite3.Error as exc:
            raise CaptureStoreError(f"capture index (SQLite): {exc}") from exc

    def query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise CaptureStoreError(f"capture index (SQLite): {exc}") from exc

    def close(self) -> None:
        self._conn.close()


class _PostgresCursor:
    """What the store's SQL needs from a connection: `?` written, `%s` sent."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), params)

    def executemany(self, sql: str, rows: Sequence[Sequence]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)


class _PostgresIndex:
    """A small psycopg pool: a connection checked before each use (a restarted server's
    dead connections are dropped, not handed out), waited for at most the store's timeout."""

    backend = "postgresql"

    def __init__(self, url: str, busy_timeout_s: float, first_wait_s: float) -> None:
        import psycopg  # only where a PostgreSQL index is configured
        from psycopg_pool import ConnectionPool, PoolTimeout

        self._errors: tuple[type[BaseException], ...] = (psycopg.Error, PoolTimeout)
        self._url, self._timeout = url, busy_timeout_s
        # The pool connects (and reconnects after an outage) in its own threads; a use
        # waits at most busy_timeout_s for a connection. connect_timeout is libpq's.
        self._pool = ConnectionPool(url, min_size=1, max_size=POSTGRES_POOL_SIZE,
                                    timeout=busy_timeout_s, open=True,
                                    check=ConnectionPool.check_connection,
                                    kwargs={"connect_timeout": 2},
                                    name="visionloop-captures")
        try:
            self._pool.wait(timeout=first_wait_s)
        except PoolTimeout as exc:  # psycopg_pool closes a pool that timed out waiting
            self._pool.close()
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> CaptureStoreError:
        return CaptureStoreError(f"capture index (PostgreSQL {redacted(self._url)}): "
                                 f"{type(exc).__name__}: {exc}")

    @contextlib.contextmanager
    def transaction(self, migrating: bool = False) -> Iterator[Any]:
        try:
            with self._pool.connection(timeout=self._timeout) as conn, conn.transaction():
                if migrating:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
                yield _PostgresCursor(conn)
        except self._errors as exc:
            raise self._error(exc) from exc

    def query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self.transaction() as cursor:
            return cursor.execute(sql, params).fetchall()

    def close(self) -> None:
        self._pool.close()


def _open_index(url: str, busy_timeout_s: float,
                first_wait_s: float) -> _SqliteIndex | _PostgresIndex:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return _SqliteIndex(Path(parts.path), busy_timeout_s)
    return _PostgresIndex(url, busy_timeout_s, first_wait_s)


def migrate(index: _SqliteIndex | _PostgresIndex) -> None:
    """Apply the migrations the index lacks."""
    with index.transaction(migrating=True) as tx:
        tx.execute(MIGRATIONS_TABLE)
        applied = {v for (v,) in tx.execute("SELECT version FROM schema_migrations").fetchall()}
        newer = sorted(v for v in applied if v > SCHEMA_VERSION)
        if newer:
            raise CaptureStoreError(f"the capture index has schema version {newer[-1]}, newer "
                                    f"than this visionloop's {SCHEMA_VERSION}: upgrade it")
        for version, description, sqlite_sql, postgres_sql in MIGRATIONS:
            if version in applied:
                continue
            for statement in (sqlite_sql if index.backend == "sqlite" else postgres_sql):
                tx.execute(statement)
            tx.execute("INSERT INTO schema_migrations (version, description, applied_at)"
                       " VALUES (?, ?, ?)", (version, description, _now()))


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


@dataclass(frozen=True)
class StoredCapture:
    """One row of the index, for tests and checks that read the store back."""

    capture_id: int
    request_id: str
    sha: str
    model_name: str
    model_version: str
    probabilities: list[float]
    task_id: int | None


class CaptureStore:
    """The store under one capture directory, its index at database_url(root, url). The
    index opens (and migrates) on first use, so a worker with a broken capture directory
    or an unreachable database still starts (and counts capture errors)."""

    def __init__(self, root: str | Path, busy_timeout_s: float = WRITER_BUSY_TIMEOUT_S,
                 url: str | None = None) -> None:
        self.root = Path(root)
        self.url = database_url(self.root, url)
        self._busy_timeout_s = busy_timeout_s
        self._index: _SqliteIndex | _PostgresIndex | None = None
        self._migrated = False
        self._open_failed = False
        self._opening = threading.Lock()

    def _opened(self) -> _SqliteIndex | _PostgresIndex:
        with self._opening:
            if self._index is None:
                (self.root / "images").mkdir(parents=True, exist_ok=True)
                # the first open may wait for a server that is starting; a re-open after
                # one failed (an outage) waits no longer than a write would
                first_wait_s = FIRST_CONNECTION_WAIT_S if not self._open_failed else \
                    self._busy_timeout_s
                try:
                    self._index = _open_index(self.url, self._busy_timeout_s, first_wait_s)
                except CaptureStoreError:
                    self._open_failed = True
                    raise
            if not self._migrated:  # kept open while the database is down: its pool retries
                migrate(self._index)
                self._migrated = True
            return self._index

    def close(self) -> None:
        with self._opening:
            if self._index is not None:
                self._index.close()
                self._index, self._migrated = None, False

    def schema_version(self) -> int:
        return max(v for (v,) in self._opened().query("SELECT version FROM schema_migrations"))

    def image_path(self, sha256: str) -> Path:
        return image_path(self.root, sha256)

    # --- the writer (serving) ---

    def _write_image(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.image_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{sha}.{os.uname().nodename}.{os.getpid()}."
                                 f"{threading.get_ident()}.tmp")
            # No fsync: like the index's commit the file survives the worker being killed
            # (it is in the OS page cache); neither is promised across power loss.
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def rows(self, items: Sequence[tuple[bytes, str, Prediction]]) -> list[dict[str, Any]]:
        """(image bytes, request id, reply) per capture -> its index row (core.capture_spool
        ROW_FIELDS), each with a new unique key, after writing the images. Raises OSError."""
        now = _now()
        return [{"request_id": request_id, "image_sha256": self._write_image(data),
                 "model_name": reply.model, "model_version": reply.version,
                 "predicted": reply.label, "probabilities": json.dumps(list(reply.probabilities)),
                 "max_prob": reply.uncertainty.max_prob, "margin": reply.uncertainty.margin,
                 "entropy": reply.uncertainty.entropy, "created_at": now,
                 "spool_key": new_key()}
                for data, request_id, reply in items]

    def insert(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rows from rows() or a spool, in one transaction; a row whose key is in the index
        already is skipped (a replay of a batch that was committed). Raises CaptureStoreError."""
        columns = ", ".join(ROW_FIELDS)
        with self._opened().transaction() as tx:
            tx.executemany(
                f"INSERT INTO captures ({columns}) VALUES ({', '.join('?' * len(ROW_FIELDS))})"
                " ON CONFLICT DO NOTHING", [tuple(row[f] for f in ROW_FIELDS) for row in rows])

    def write(self, items: Sequence[tuple[bytes, str, Prediction]]) -> None:
        """The images, then every row in one transaction. Raises OSError, CaptureStoreError
        or ValueError; the caller decides what a failure means."""
        self.insert(self.rows(items))

    def replay_spool(self) -> int:
        """Write the rows a spool holds (core.capture_spool) to the index; returns how many.
        Raises CaptureStoreError while the index is still down (the rows keep waiting)."""
        return CaptureSpool(self.root).replay(self.insert)

    # --- the queries labeling needs (push, pull) ---

    def link(self, links: dict[str, int], model: str) -> int:
        """Set task_id on every unlinked capture of each image; returns captures linked."""
        if not links:
            return 0
        with self._opened().transaction() as tx:
            return sum(tx.execute(
                "UPDATE captures SET task_id = ? WHERE image_sha256 = ? AND model_name = ?"
                " AND task_id IS NULL", (task, sha, model)).rowcount
                for sha, task in links.items())

    def unlink_tasks_not_in(self, live: set[int], model: str) -> int:
        """Unlink captures whose task is not among `live` (deleted in Label Studio): their
        image can be pushed again. Returns captures unlinked."""
        index = self._opened()
        dead = [task for (task,) in index.query(
            "SELECT DISTINCT task_id FROM captures WHERE model_name = ? AND task_id IS NOT NULL",
            (model,)) if task not in live]
        with index.transaction() as tx:
            return sum(tx.execute("UPDATE captures SET task_id = NULL WHERE model_name = ?"
                                  " AND task_id = ?", (model, task)).rowcount
                       for task in dead)

    def count(self, model: str) -> int:
        """Captured predictions of `model` (a COUNT: a scrape must not read every row)."""
        return self._opened().query(
            "SELECT COUNT(*) FROM captures WHERE model_name = ?", (model,))[0][0]

    def pushed_tasks(self, model: str) -> dict[str, int]:
        """Image sha256 -> its task id, for every image of `model` already pushed."""
        return dict(self._opened().query(
            "SELECT image_sha256, MIN(task_id) FROM captures WHERE model_name = ?"
            " AND task_id IS NOT NULL GROUP BY image_sha256", (model,)))

    def unlinked(self, model: str) -> list[CapturedRow]:
        """Every capture of `model` not yet linked to a task, oldest first."""
        rows = self._opened().query(
            "SELECT id, image_sha256, model_version, predicted, probabilities, max_prob,"
            " margin, entropy FROM captures WHERE model_name = ? AND task_id IS NULL"
            " ORDER BY id", (model,))
        return [CapturedRow(cid, sha, version, predicted, json.loads(probs), max_prob,
                            margin, entropy)
                for cid, sha, version, predicted, probs, max_prob, margin, entropy in rows]

    def served_probabilities(self, model: str) -> dict[str, list[float]]:
        """Image sha256 -> the probabilities of its newest capture of `model` (what the
        serving model said about it, calibrated, in its manifest's class order)."""
        rows = self._opened().query(
            "SELECT image_sha256, probabilities FROM captures WHERE model_name = ?"
            " ORDER BY id", (model,))
        return {sha: json.loads(probs) for sha, probs in rows}

    def captures(self) -> list[StoredCapture]:
        """Every row, in capture order."""
        rows = self._opened().query(
            "SELECT id, request_id, image_sha256, model_name, model_version, probabilities,"
            " task_id FROM captures ORDER BY id")
        return [StoredCapture(cid, request, sha, model, version, json.loads(probs), task)
                for cid, request, sha, model, version, probs, task in rows]
