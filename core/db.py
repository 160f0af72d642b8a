"""SQLite as the project's stores use it: WAL files, explicit transactions."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def open_wal(path: Path, schema: str, timeout_s: float) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) on a WAL database."""
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit survives the process being killed; only an OS crash may lose the last.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(schema)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection,
                immediate: bool = False) -> Iterator[sqlite3.Connection]:
    """BEGIN ... COMMIT, or ROLLBACK on any exception (then re-raised). immediate: take the
    write lock at BEGIN, before the first read (read-then-write without a race)."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
