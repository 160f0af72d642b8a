"""Run a job at a fixed interval, for the services that do their work on a schedule
(`visionloop retrain --every`, `visionloop label push --every`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from visionloop.core.errors import InputError

log = logging.getLogger(__name__)


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise InputError(f"duration {text!r}: use a number and s, m, h or d (e.g. 30m)") from None
    if value <= 0:
        raise InputError(f"duration must be positive, got {text!r}")
    return value * unit


def run_every(interval_s: float, run: Callable[[], object], what: str,
              max_runs: int | None = None) -> None:
    """Run, sleep the rest of the interval, repeat; a failed run is logged, the next one
    tries (a server that is still starting or briefly down costs one run, not the service)."""
    runs = 0
    while max_runs is None or runs < max_runs:
        started = time.monotonic()
        try:
            run()
        except Exception:  # noqa: BLE001 - a scheduler outlives one bad run
            log.exception("%s failed; the next run tries again", what)
        runs += 1
        time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
