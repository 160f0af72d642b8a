"""A steady request rate through a real TorchServe while its worker is killed with kill -9.

Failed requests are counted and must fall inside the outage; the worker comes back; every
prediction captured before the kill is still in the capture store, whose SQLite database
passes an integrity check. `make test` soaks for VISIONLOOP_SOAK_SECONDS=40; `make soak`
for several minutes.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections import Counter

import pytest

from tests.load import Load, first_success_after, summary
from tests.servers import free_ports, kill_worker
from visionloop.core.capture_store import DB_FILE, image_path
from visionloop.serving import server
from visionloop.serving.archive import package

pytestmark = pytest.mark.slow
SOAK_SECONDS = float(os.environ.get("VISIONLOOP_SOAK_SECONDS", "40"))
RATE_PER_SECOND = 16
CLIENTS = 8


def test_worker_killed_mid_soak_loses_no_capture(trained_version, small_scenario, tmp_path):
    cfg = server.ServerConfig(home=tmp_path / "ts", model_store=tmp_path / "mars",
                              capture_dir=tmp_path / "captures", **free_ports())
    server.start(cfg, {"fm": package(trained_version, cfg.model_store, "torchscript").name})
    bodies = [p.read_bytes() for p in sorted((small_scenario / "pool").glob("*.png"))]
    requests = int(RATE_PER_SECOND * SOAK_SECONDS)
    # bounded by count: a slow machine stretches the soak instead of shortening it; the
    # time bound only keeps a server that stops answering from hanging the test
    load = Load([f"{cfg.url('inference')}/predictions/fm"], bodies, threads=CLIENTS,
                rate=RATE_PER_SECOND, max_requests=requests, max_seconds=4 * SOAK_SECONDS + 300)
    try:
        with load:
            # a third of the soak, with captures made before the kill
            load.wait_for("a third of the soak answered, captures among it",
                          lambda got: len(got) >= requests // 3 and any(o.captured for o in got),
                          timeout=4 * SOAK_SECONDS)
            killed, back = kill_worker(cfg, "fm")
            outcomes = load.join(timeout=4 * SOAK_SECONDS + 300)
    finally:
        server.stop(cfg)

    failed = [o for o in outcomes if not o.ok]
    recovered = first_success_after(outcomes, back)  # the end of the outage, as seen
    after_recovery = [o for o in outcomes if o.sent >= recovered]
    took = max(o.answered for o in outcomes) - load.started
    print(f"soak of {requests} requests at {RATE_PER_SECOND}/s ({took:.0f} s): "
          f"{dict(summary(outcomes))}, worker back {back - killed:.1f} s after kill -9, "
          f"{sum(bool(o.captured) for o in outcomes)} captured")
    assert len(outcomes) == requests, summary(outcomes)  # every request sent has its outcome
    # failures only during the outage: answered after the kill (in flight at it, or sent
    # after it) and sent no later than the first success once the worker was back
    assert all(o.answered >= killed and o.sent <= recovered for o in failed), failed[:10]
    assert len(after_recovery) >= RATE_PER_SECOND, "under a second of load after the outage"
    assert all(o.ok for o in after_recovery)

    conn = sqlite3.connect(cfg.capture_dir / DB_FILE)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = Counter(sha for (sha,) in conn.execute("SELECT image_sha256 FROM captures"))
    captured = Counter(o.sha for o in outcomes if o.captured)
    before_kill = Counter(o.sha for o in outcomes if o.captured and o.answered < killed)
    assert sum(before_kill.values()) > 0
    for sha, count in captured.items():
        assert rows[sha] >= count, f"{count - rows[sha]} captures of {sha} lost"
        assert hashlib.sha256(image_path(cfg.capture_dir, sha).read_bytes()).hexdigest() == sha
