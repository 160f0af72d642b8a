"""Duplicate detection: the same bytes (sha256), or nearly the same picture.

Near-duplicates are what a client re-sending a re-encoded or brightened frame produces;
one label covers them all. Two images are near-duplicates when their 16x16 grayscale
thumbnails, centred and scaled to unit length, correlate above a threshold: that ignores
encoding noise and uniform brightness and contrast changes. (A difference hash failed
here: on Fashion-MNIST's flat black backgrounds JPEG noise flipped up to 48 of 256 bits.)
Measured on the pool (python -m bench.label_strategies --dedupe): see README, Labeling.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

THUMBNAIL_SIDE = 16
NEAR_DUPLICATE_CORRELATION = 0.98


def thumbnail_signature(image_bytes: bytes, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """Unit-length, zero-mean grayscale thumbnail (side*side floats)."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        thumb = image.convert("L").resize((side, side), Image.Resampling.BOX)
    pixels = np.asarray(thumb, dtype=np.float32).ravel()
    pixels -= pixels.mean()
    norm = float(np.linalg.norm(pixels))
    return pixels / norm if norm > 0 else pixels


class NearDuplicateFilter:
    """Keeps one image per near-duplicate group, in the order images are offered."""

    def __init__(self, min_correlation: float = NEAR_DUPLICATE_CORRELATION) -> None:
        self.min_correlation = min_correlation
        self._keys: list[str] = []
        # grown by doubling: appending row by row would copy the matrix every time
        self._buffer = np.zeros((64, THUMBNAIL_SIDE * THUMBNAIL_SIDE), dtype=np.float32)

    def add_seen(self, key: str, signature: np.ndarray) -> None:
        """An image already pushed: later near-copies of it are duplicates."""
        if len(self._keys) == len(self._buffer):
            self._buffer = np.vstack([self._buffer, np.zeros_like(self._buffer)])
        self._buffer[len(self._keys)] = signature
        self._keys.append(key)

    def offer(self, key: str, signature: np.ndarray) -> str | None:
        """None if kept (and remembered); else the key of the image it nearly duplicates."""
        if self._keys:
            correlations = self._buffer[:len(self._keys)] @ signature
            best = int(correlations.argmax())
            if correlations[best] >= self.min_correlation:
                return self._keys[best]
        self.add_seen(key, signature)
        return None
