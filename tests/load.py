"""The one load client of the tests that send requests while something breaks or changes.

Every request becomes an Outcome, whatever happened to it: an HTTP status, or the kind of
failure that left no status (a refused or reset connection, a timeout, anything else with
its text). A client thread never dies on an exception, so "0 failed" means every request
sent was answered with 200, not that the failing ones were never counted. Tests wait for
what they need (a number of outcomes, a version seen) with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, TypeVar

T = TypeVar("T")


class Failure(str, Enum):
    """Why a request got no HTTP status."""

    CONNECTION = "connection error"  # refused, reset, or cut before the whole reply
    TIMEOUT = "timeout"
    EXCEPTION = "exception"  # anything else; Outcome.error has its text


@dataclass(frozen=True)
class Outcome:
    """One request, as the client saw it. Times are time.monotonic()."""

    url: str
    sha: str  # sha256 of the body sent: what the capture store names the image by
    sent: float
    answered: float  # when the reply, or the failure, came
    status: int | None = None  # None when no HTTP reply came (see failure)
    failure: Failure | None = None
    error: str = ""  # the exception's text, or the body of a reply that is not a prediction
    version: str | None = None
    label: str | None = None  # the top prediction
    captured: bool | None = None  # None when the server has no capture store
    uncertainty: dict[str, float] | None = None  # max_prob, margin, entropy

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.failure is None

    @property
    def kind(self) -> str:
        """What happened, for counting: 'HTTP 200', 'HTTP 503', 'timeout', ..."""
        return self.failure.value if self.failure is not None else f"HTTP {self.status}"


def failure_of(exc: Exception) -> Failure:
    # urllib wraps what the socket raised while connecting in URLError(reason)
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, Exception):
        exc = exc.reason
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return Failure.TIMEOUT
    # RemoteDisconnected and IncompleteRead are HTTPExceptions: the server cut the reply
    if isinstance(exc, (ConnectionError, http.client.HTTPException)):
        return Failure.CONNECTION
    return Failure.EXCEPTION


def _post(url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:  # a status all the same: not a failure of its own
        return exc.code, exc.read()


def _from_reply(outcome: Outcome, status: int, text: bytes) -> Outcome:
    """The outcome completed with the reply's status and fields."""
    try:
        reply: Any = json.loads(text)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        # a 200 that is not a prediction failed the client all the same
        return replace(outcome, status=status,
                       failure=Failure.EXCEPTION if status == 200 else None,
                       error=text[:300].decode(errors="replace"))
    predictions = reply.get("predictions") or [{}]
    return replace(outcome, status=status, version=reply.get("version"),
                   label=predictions[0].get("label"), captured=reply.get("captured"),
                   uncertainty=reply.get("uncertainty"),
                   error="" if status == 200 else str(reply.get("error", reply))[:300])


def send(url: str, body: bytes, timeout: float = 60.0) -> Outcome:
    """POST one image; never raises an Exception: what went wrong is in the Outcome."""
    sha = hashlib.sha256(body).hexdigest()
    sent = time.monotonic()
    try:
        status, text = _post(url, body, timeout)
    except Exception as exc:  # every failure is an outcome: none escapes uncounted
        return Outcome(url, sha, sent, time.monotonic(), failure=failure_of(exc),
                       error=f"{type(exc).__name__}: {exc}")
    return _from_reply(Outcome(url, sha, sent, time.monotonic()), status, text)


def summary(outcomes: Sequence[Outcome]) -> Counter[str]:
    """Counts by what happened: {'HTTP 200': 412, 'HTTP 503': 3, 'connection error': 1}."""
    return Counter(o.kind for o in outcomes)


def first_success_after(outcomes: Sequence[Outcome], moment: float,
                        url: str | None = None) -> float:
    """The send time of the first request sent at or after `moment` (to `url`, if given)
    that was answered with 200; infinity if none was. With `moment` the time a killed
    server was back, this is where the outage ends as the clients saw it."""
    return min((o.sent for o in outcomes
                if o.ok and o.sent >= moment and url in (None, o.url)), default=math.inf)


def wait_until(what: str, condition: Callable[[], T], timeout: float = 120.0,
               poll: float = 0.2) -> T:
    """Poll condition() until it returns something true, and return that; fail the test
    naming `what` when the deadline passes first."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(poll)


class Load:
    """Requests from `threads` threads, bodies and URLs taken in turn (request i sends
    bodies[i % len] to urls[i % len]), until stop(), max_requests or max_seconds.

    With `rate` (requests per second, all threads together) request i is sent at
    start + i / rate, as long as a thread is free: a steady rate, not as fast as possible.
    Use it as a context manager, or start() then stop() (or join() to let the bounds end
    it); both check that every thread finished and every request sent has its outcome.
    """

    def __init__(self, urls: Sequence[str], bodies: Sequence[bytes], threads: int = 4,
                 rate: float | None = None, max_requests: int = 10_000,
                 max_seconds: float = 600.0, timeout: float = 60.0) -> None:
        if not urls or not bodies or threads < 1 or max_requests < 1:
            raise ValueError("a load needs urls, bodies, threads >= 1 and max_requests >= 1")
        self.urls, self.bodies, self.rate = list(urls), list(bodies), rate
        self.max_requests, self.max_seconds, self.timeout = max_requests, max_seconds, timeout
        self._threads = [threading.Thread(target=self._client, daemon=True,
                                          name=f"load-{i}") for i in range(threads)]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._outcomes: list[Outcome] = []
        self._next = 0  # the next request's index (its place in the schedule)
        self._sent = 0  # requests actually sent: each must end as one outcome
        self._crashes: list[str] = []  # a client thread that died anyway (a bug of this file)
        self.started = 0.0

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        self._halt(self.timeout + 60)
        if exc_type is None:  # else the test's own error says more than these checks
            self._check()

    def start(self) -> Load:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def _take(self) -> int | None:
        """The index of the next request to send, or None when a bound or stop() ends it."""
        with self._lock:
            if (self._stop.is_set() or self._next >= self.max_requests
                    or time.monotonic() - self.started > self.max_seconds):
                return None
            self._next += 1
            return self._next - 1

    def _client(self) -> None:
        try:
            while (index := self._take()) is not None:
                if self.rate and self._stop.wait(
                        max(0.0, self.started + index / self.rate - time.monotonic())):
                    return  # stopped while waiting for its turn: this one was never sent
                with self._lock:
                    self._sent += 1
                outcome = send(self.urls[index % len(self.urls)],
                               self.bodies[index % len(self.bodies)], self.timeout)
                with self._lock:
                    self._outcomes.append(outcome)
        except Exception as exc:  # recorded, and fails the check: never a silent death
            with self._lock:
                self._crashes.append(f"{type(exc).__name__}: {exc}")

    def outcomes(self) -> list[Outcome]:
        """Every outcome so far, in the order the replies (or failures) came."""
        with self._lock:
            return list(self._outcomes)

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def wait_for(self, what: str, condition: Callable[[list[Outcome]], bool],
                 timeout: float = 120.0) -> list[Outcome]:
        """Wait until condition(outcomes so far) holds; returns those outcomes. Fails when
        the deadline passes, or the load ends by its bounds, first."""
        def met() -> list[Outcome] | None:
            outcomes = self.outcomes()
            if condition(outcomes):
                return outcomes
            assert self.running(), (f"the load ended ({summary(outcomes)}) before: {what}; "
                                    f"{self._crashes}")
            return None

        return wait_until(what, met, timeout)

    def wait_for_outcomes(self, count: int, sent_after: float = float("-inf"),
                          timeout: float = 120.0) -> list[Outcome]:
        """Wait until `count` requests sent after `sent_after` (monotonic) have outcomes."""
        return self.wait_for(f"{count} outcomes of requests sent after {sent_after:.1f}",
                             lambda got: sum(o.sent > sent_after for o in got) >= count,
                             timeout)

    def join(self, timeout: float = 600.0) -> list[Outcome]:
        """Wait for the bounds (max_requests, max_seconds) to end the load; check it."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._check()
        return self.outcomes()

    def stop(self, timeout: float | None = None) -> list[Outcome]:
        """Send no more (requests in flight get their outcome); check; every outcome."""
        self._halt(self.timeout + 60 if timeout is None else timeout)
        self._check()
        return self.outcomes()

    def _halt(self, timeout: float) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _check(self) -> None:
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"load threads still running: {alive}"
        assert not self._crashes, f"load threads died: {self._crashes}"
        assert self._sent == len(self._outcomes), \
            f"{self._sent} requests sent, {len(self._outcomes)} outcomes recorded"

    def summary(self) -> Counter[str]:
        return summary(self.outcomes())
