"""Run a job at a fixed interval, for the services that do their work on a schedule
(`visionloop retrain --every`, `visionloop label push --every`), each with its own
Prometheus scrape endpoint when given a port (--metrics-port):
    visionloop_job_runs_total{job, outcome}            runs that finished ok / failed
    visionloop_job_last_run_seconds{job}               how long the last run took
    visionloop_job_last_success_timestamp_seconds{job} when the last good run ended
What the runs did (tasks pushed, gate decisions) is counted from the stores by the ML
backend's /metrics (labeling.loop_metrics); these say whether the schedule itself runs.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from visionloop.core.errors import InputError

log = logging.getLogger(__name__)

FIRST_RETRY_S = 30.0  # after a failed run; doubling while runs fail


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


@dataclass(frozen=True)
class MetricsAddress:
    host: str
    port: int


def add_schedule_arguments(parser: argparse.ArgumentParser, every_help: str) -> None:
    """--every and the scrape endpoint of a job that keeps running."""
    parser.add_argument("--every", metavar="DURATION", help=every_help)
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="with --every: serve the schedule's Prometheus metrics on PORT")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="where --metrics-port listens (0.0.0.0 in a container)")
    parser.add_argument("--retry-after", metavar="DURATION", default=f"{FIRST_RETRY_S:g}s",
                        help="with --every: after a failed run, try again this soon, "
                             "doubling while runs fail, never later than --every "
                             "(default %(default)s)")


def metrics_address(args: argparse.Namespace) -> MetricsAddress | None:
    if args.metrics_port is None:
        return None
    if not args.every:
        raise InputError("--metrics-port serves a scheduled job's metrics: give --every too")
    return MetricsAddress(args.metrics_host, args.metrics_port)


class JobMetrics:
    """A scheduled job's counters, served on their own port by prometheus_client's HTTP
    server (a daemon thread: it goes when the job's process does)."""

    def __init__(self, job: str, address: MetricsAddress | None) -> None:
        self.job, self.registry = job, CollectorRegistry()
        self.runs = Counter("visionloop_job_runs", "scheduled runs that finished, by outcome",
                            ["job", "outcome"], registry=self.registry)
        self.seconds = Gauge("visionloop_job_last_run_seconds", "how long the last run took",
                             ["job"], registry=self.registry)
        self.last_success = Gauge("visionloop_job_last_success_timestamp_seconds",
                                  "when the last run that did not fail ended", ["job"],
                                  registry=self.registry)
        for outcome in ("ok", "failed"):  # both series from the start: rate() needs them
            self.runs.labels(job, outcome)
        if address is not None:
            start_http_server(address.port, addr=address.host, registry=self.registry)
            log.info("%s metrics on http://%s:%d/metrics", job, address.host, address.port)

    def record(self, ok: bool, seconds: float) -> None:
        self.runs.labels(self.job, "ok" if ok else "failed").inc()
        self.seconds.labels(self.job).set(seconds)
        if ok:
            self.last_success.labels(self.job).set_to_current_time()


def run_every(interval_s: float, run: Callable[[], object], what: str,
              max_runs: int | None = None, metrics: JobMetrics | None = None,
              first_retry_s: float = FIRST_RETRY_S) -> None:
    """Run, sleep the rest of the interval, repeat; a failed run is logged and retried
    sooner: after `first_retry_s`, doubling while runs keep failing, never later than the
    interval (a server still starting when the stack comes up costs a minute, not a 6 h
    retrain interval). A run fails when it raises or returns a non-zero exit code."""
    runs = 0
    retry_s = first_retry_s
    while max_runs is None or runs < max_runs:
        started = time.monotonic()
        ok = False
        try:
            ok = run() in (None, 0)
            if not ok:
                log.error("%s ended with a non-zero exit code", what)
        except Exception:  # noqa: BLE001 - a scheduler outlives one bad run
            log.exception("%s failed; the next run tries again", what)
        if metrics is not None:
            metrics.record(ok, time.monotonic() - started)
        runs += 1
        if ok:
            retry_s = first_retry_s
            wait_s = interval_s
        else:
            wait_s = min(retry_s, interval_s)
            retry_s *= 2
        time.sleep(max(0.0, wait_s - (time.monotonic() - started)))
