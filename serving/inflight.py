"""Which batches TorchServe's workers are running now, as marker files a promotion reads.

TorchServe's describe API counts queued requests only: a batch a worker has taken is no
longer pending, and unregistering its version kills that worker without answering the
batch. So each worker marks the batch it runs, `<model store>/.inflight/<model>/<version>/
<host>-<pid>`, from the moment handle() starts until it returns, and a promotion drains a
version until it has neither pending requests nor a marked batch (serving.promote.drain).

The markers live in the model store because a promotion already shares it with every
replica it promotes into (it writes the archive there). A worker killed mid-batch leaves
its marker; one older than STALE_S is not waited for.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

INFLIGHT_ENV = "VISIONLOOP_INFLIGHT_DIR"  # set by serving.server for the workers
INFLIGHT_DIR = ".inflight"
STALE_S = 30.0  # far above one batch's inference; TorchServe's response timeout is 120 s


def inflight_dir(model_store: Path) -> Path:
    return Path(model_store) / INFLIGHT_DIR


@contextlib.contextmanager
def marked(root: str | Path | None, model: str, version: str) -> Iterator[None]:
    """Mark this worker's batch as running while the block runs (no root: no marker). A
    marker that cannot be written never fails the batch: the drain then relies on its
    quiet window alone."""
    path = None
    if root:
        path = Path(root) / model / version / f"{os.uname().nodename}-{os.getpid()}"
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


def running_batches(model_store: Path, model: str, version: str,
                    stale_s: float = STALE_S) -> int:
    """Batches of this version being run now, by any worker writing to this model store."""
    folder = inflight_dir(model_store) / model / version
    now, running = time.time(), 0
    with contextlib.suppress(FileNotFoundError):
        for marker in folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                running += now - marker.stat().st_mtime < stale_s
    return running
