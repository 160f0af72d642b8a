"""What a push is asked to do: light enough for the CLI's parser to import."""

from __future__ import annotations

from dataclasses import dataclass

from visionloop.core.errors import InputError
from visionloop.labeling.dedupe import NEAR_DUPLICATE_CORRELATION

TRANSPORTS = ("local-files", "base64")


@dataclass(frozen=True)
class PushOptions:
    budget: int
    strategy: str = "class_balanced"
    minority_share: float = 0.5  # class_balanced: share of the budget kept for minority classes
    # local-files: Label Studio serves the capture store's files (same host, nothing copied);
    # base64: the image travels inside the task (any host, but it bloats Label Studio's DB)
    transport: str = "local-files"
    base64_max_bytes: int = 65_536  # larger images go as local files even with base64
    chunk_size: int = 50
    min_correlation: float = NEAR_DUPLICATE_CORRELATION
    seed: int = 0

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise InputError(f"budget must be >= 0, got {self.budget}")
        if self.transport not in TRANSPORTS:
            raise InputError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
