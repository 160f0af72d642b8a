"""Backbone embeddings of images, computed once and kept on disk.

An embedding is the input of the classification head: the pooled backbone features of the
image, preprocessed exactly as for evaluation. The cache is content-addressed: one SQLite
file per backbone fingerprint (the backbone's weights, the preprocessing and the
architecture), one row per image sha256. So a frozen backbone's features are computed
once for every retrain that reuses it, a run killed half-way resumes where it stopped (rows
are committed per batch), and a renamed or copied file is not computed twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from visionloop.core.db import open_wal, transaction
from visionloop.core.fsutil import sha256_file
from visionloop.core.manifest import Preprocessing
from visionloop.core.preprocess import preprocess_image
from visionloop.trainer.data import ImageListDataset, loader_workers

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS embeddings (
    image_sha256 TEXT PRIMARY KEY,
    vector BLOB NOT NULL                  -- float32, little-endian
);
"""


def backbone_fingerprint(model: nn.Module, head_prefix: str, arch: str,
                         pre: Preprocessing) -> str:
    """sha256 over every tensor outside the head, the architecture and the preprocessing."""
    digest = hashlib.sha256(json.dumps([arch, pre.image_size, pre.resize, list(pre.mean),
                                        list(pre.std), pre.channels, pre.interpolation])
                            .encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(head_prefix):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def head_removed(model: nn.Module, head_prefix: str) -> Iterator[nn.Module]:
    """The model with its last linear layer replaced by identity: it returns embeddings."""
    name = head_prefix.rstrip(".")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    try:
        yield model
    finally:
        setattr(parent, attr, head)


class EmbeddingCache:
    def __init__(self, root: Path, fingerprint: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{fingerprint[:32]}.sqlite3"
        self._conn: sqlite3.Connection = open_wal(self.path, SCHEMA, 30.0)

    def close(self) -> None:
        self._conn.close()

    def get(self, shas: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(shas), 500):  # SQLite's variable limit
            chunk = shas[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for sha, blob in self._conn.execute(
                    f"SELECT image_sha256, vector FROM embeddings WHERE image_sha256 IN ({marks})",
                    chunk):
                found[sha] = np.frombuffer(blob, dtype="<f4")
        return found

    def put(self, shas: list[str], vectors: np.ndarray) -> None:
        with transaction(self._conn) as conn:
            conn.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)",
                             [(sha, v.astype("<f4").tobytes())
                              for sha, v in zip(shas, vectors, strict=True)])


def embed_files(model: nn.Module, head_prefix: str, pre: Preprocessing, files: list[Path],
                cache: EmbeddingCache, device: torch.device, batch_size: int = 256,
                num_workers: int = 0) -> np.ndarray:
    """[len(files), D] float32 embeddings: from the cache where known, else computed in
    batches (each batch committed as it is done) with a progress line per ~10 s."""
    shas = [sha256_file(p) for p in files]
    known = cache.get(sorted(set(shas)))
    missing: dict[str, Path] = {}
    for sha, path in zip(shas, files, strict=True):
        if sha not in known:
            missing.setdefault(sha, path)
    if missing:
        _compute(model, head_prefix, pre, missing, cache, known, device, batch_size,
                 num_workers)
    return np.stack([known[sha] for sha in shas]).astype(np.float32)


def _compute(model: nn.Module, head_prefix: str, pre: Preprocessing, missing: dict[str, Path],
             cache: EmbeddingCache, known: dict[str, np.ndarray], device: torch.device,
             batch_size: int, num_workers: int) -> None:
    todo = list(missing.items())
    dataset = ImageListDataset([(path, i) for i, (_, path) in enumerate(todo)],
                               partial(preprocess_image, pre=pre))
    # a worker process costs ~5 s to start: more than one batch of images takes to decode
    workers = num_workers if len(todo) > batch_size else 0
    loader = DataLoader(dataset, batch_size=batch_size, **loader_workers(workers))
    started = last_report = time.monotonic()
    done = 0
    model = model.to(device).eval()
    with torch.inference_mode(), head_removed(model, head_prefix) as backbone:
        for images, indexes in loader:
            vectors = backbone(images.to(device)).float().cpu().numpy()
            batch_shas = [todo[i][0] for i in indexes.tolist()]
            cache.put(batch_shas, vectors)
            known.update(zip(batch_shas, vectors, strict=True))
            done += len(batch_shas)
            now = time.monotonic()
            if now - last_report >= 10 or done == len(todo):
                rate = done / (now - started)
                log.info("embeddings: %d/%d images, %.0f img/s, ETA %.0fs", done, len(todo),
                         rate, (len(todo) - done) / rate)
                last_report = now
