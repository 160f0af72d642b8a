"""One retrain at a time: an flock on a file, which the kernel releases when the holder dies.

A pid file would survive a crash and block every later run; an flock cannot. The flock
belongs to the open file, which any child forked while it is held shares: a run killed with
kill -9 frees the lock once the kernel has reaped every such child, a moment after its main
process, hence `wait_s`. (The trainer's DataLoader workers are spawned without the descriptor,
so they do not hold it.)
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from visionloop.core.errors import Busy


class LockBusy(Busy, RuntimeError):
    """Another process holds the lock."""


class FileLock:
    def __init__(self, path: Path, wait_s: float = 0.0) -> None:
        self.path = Path(path)
        self.wait_s = wait_s
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise LockBusy(f"{self.path} is held (pid {holder or 'unknown'})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # for the message above; the lock is the flock
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
