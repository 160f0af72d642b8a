"""Which batches TorchServe's workers are running now, as marker files a promotion reads.

TorchServe's describe API counts queued requests only: a batch a worker has taken is no
longer pending, and unregistering its version kills that worker without answering the
batch. So each worker marks the batch it runs, `<model store>/.inflight/<replica>/<model>/
<version>/<host>-<pid>`, from the moment handle() starts until it returns, and a promotion
drains a version on one replica until it has neither pending requests nor a marked batch
there (serving.promote.drain); the other replicas' batches are not its business.

The markers live in the model store because a promotion already shares it with every
replica it promotes into (it writes the archive there). A replica's name is how its
promoter reaches its management API, HOST:PORT; where the server binds another address
than that (0.0.0.0 in a container), $VISIONLOOP_REPLICA names it (docker-compose.yml). A
worker killed mid-batch leaves its marker: the worker TorchServe starts in its place
deletes the markers of dead processes of its host, a drain on the same host ignores them,
and one older than STALE_S is not waited for by anyone.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from visionloop.core.errors import InputError

INFLIGHT_ENV = "VISIONLOOP_INFLIGHT_DIR"  # set by serving.server for the workers
REPLICA_ENV = "VISIONLOOP_REPLICA"  # this TorchServe's name as its promoter knows it
INFLIGHT_DIR = ".inflight"
STALE_S = 30.0  # far above one batch's inference; TorchServe's response timeout is 120 s


def replica_name(host: str, management_port: int) -> str:
    return f"{host}:{management_port}"


def inflight_dir(model_store: Path, replica: str) -> Path:
    """Where the workers of one TorchServe replica mark their batches."""
    if not replica or "/" in replica or replica in (".", ".."):
        raise InputError(f"a replica's name is HOST:PORT, got {replica!r}")
    return Path(model_store) / INFLIGHT_DIR / replica


def _marker_name() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"


def _of_a_dead_process(marker: Path) -> bool:
    """A marker of this host whose process is gone (another host's cannot be checked)."""
    host, _, pid = marker.name.rpartition("-")
    if host != os.uname().nodename or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clear_dead_markers(root: str | Path | None) -> int:
    """Delete the markers this host's dead workers left (a worker killed mid-batch);
    returns how many. A new worker calls it when it starts."""
    removed = 0
    if not root:
        return removed
    with contextlib.suppress(FileNotFoundError):
        for marker in Path(root).glob("*/*/*"):
            if _of_a_dead_process(marker):
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
                    removed += 1
    return removed


@contextlib.contextmanager
def marked(root: str | Path | None, model: str, version: str) -> Iterator[None]:
    """Mark this worker's batch as running while the block runs (no root: no marker). A
    marker that cannot be written never fails the batch: the drain then relies on its
    quiet window alone."""
    path = None
    if root:
        path = Path(root) / model / version / _marker_name()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError:
            path = None
    try:
        yield
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def running_batches(model_store: Path, replica: str, model: str, version: str,
                    stale_s: float = STALE_S) -> int:
    """Batches of this version the replica's workers are running now."""
    folder = inflight_dir(model_store, replica) / model / version
    now, running = time.time(), 0
    with contextlib.suppress(FileNotFoundError):
        for marker in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                running += (now - marker.stat().st_mtime < stale_s
                            and not _of_a_dead_process(marker))
    return running
