"""Which classes count as minority: one rule shared by the trainer and labeling."""

from __future__ import annotations

import statistics
from collections.abc import Mapping

MINORITY_FRACTION_OF_MEDIAN = 0.5


def minority_classes(counts: Mapping[str, int]) -> list[str]:
    """Classes with fewer than half the median class count of labelled images."""
    if not counts:
        return []
    median = statistics.median(counts.values())
    return [name for name, count in counts.items()
            if count < MINORITY_FRACTION_OF_MEDIAN * median]
