"""The capture spool: index rows that wait on local disk while the capture index is down.

A worker whose index write fails appends the batch's rows to its own spool file,
`<capture dir>/spool/<time>-<host>-<pid>.jsonl` (one JSON object per line; the images are
already in the capture directory), and the reply says captured. Whoever writes next to a
reachable index replays every spool file first, oldest file first and each in line order,
then deletes it. Each row carries a unique spool key that the index keeps (migration 3),
so a replay that is killed after its commit and before the delete inserts nothing twice.

Against process death, not power loss, like the index's own commits: a line is written
before the reply leaves (it sits in the OS page cache), never fsynced. A torn last line
(the writer killed mid-append, before it replied) is skipped and counted.

Two processes may touch one file: its writer appending while another process's replay
reads it. An exclusive flock on the file serialises them, and a writer whose file was
replayed and deleted under it starts a new one (it checks the link count under the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SPOOL_DIR = "spool"
SPOOL_MAX_BYTES = 64 * 2**20  # per capture directory; ~100k rows; beyond it captures drop
ROW_FIELDS = ("request_id", "image_sha256", "model_name", "model_version", "predicted",
              "probabilities", "max_prob", "margin", "entropy", "created_at", "spool_key")


class SpoolFull(OSError):
    """The spool holds SPOOL_MAX_BYTES already: the rows were not kept."""


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def new_key() -> str:
    return uuid.uuid4().hex


class CaptureSpool:
    """One process's spool writer, and the replay every writer runs."""

    def __init__(self, capture_dir: str | Path, max_bytes: int = SPOOL_MAX_BYTES) -> None:
        self.dir = Path(capture_dir) / SPOOL_DIR
        self.max_bytes = max_bytes
        self._fd: int | None = None
        self.torn_lines = 0

    def files(self) -> list[Path]:
        """Spool files, oldest first (their names start with the time they were opened)."""
        try:
            return sorted(p for p in self.dir.iterdir() if p.suffix == ".jsonl")
        except FileNotFoundError:
            return []

    def size(self) -> int:
        total = 0
        for path in self.files():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def _open(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.uname().nodename}-{os.getpid()}.jsonl"
        return os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Keep rows (each with every ROW_FIELDS key) until a replay writes them. Raises
        SpoolFull beyond the cap, OSError where the disk refuses."""
        data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode()
        if self.size() + len(data) > self.max_bytes:
            raise SpoolFull(f"capture spool {self.dir} holds {self.max_bytes} bytes already")
        while True:
            if self._fd is None:
                self._fd = self._open()
            with _locked(self._fd):
                replayed = os.fstat(self._fd).st_nlink == 0  # and deleted: start a new file
                written = 0 if replayed else os.write(self._fd, data)
            if replayed:
                os.close(self._fd)
                self._fd = None
                continue
            if written != len(data):
                raise OSError(f"short write to the capture spool ({written} of {len(data)})")
            return

    def replay(self, insert: Callable[[list[dict[str, Any]]], None]) -> int:
        """Hand every spooled row to `insert` (one call per file, in order; it must write
        them in one transaction, ignoring keys already there), deleting each file after.
        Returns rows handed over. An exception from insert stops the replay; the rest waits."""
        replayed = 0
        for path in self.files():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # another process replayed it meanwhile
                continue
            try:
                with _locked(fd):
                    if os.fstat(fd).st_nlink == 0:
                        continue
                    rows = self._read(fd)
                    if rows:
                        insert(rows)
                    os.unlink(path)
                    replayed += len(rows)
            finally:
                os.close(fd)
        return replayed

    def _read(self, fd: int) -> list[dict[str, Any]]:
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)
            lines = f.read().split(b"\n")
        if lines[-1]:  # no newline after it: the writer died mid-append, before it replied
            self.torn_lines += 1
        return [json.loads(line) for line in lines[:-1] if line]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
