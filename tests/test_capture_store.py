"""The capture store on both index backends: SQLite in the capture directory, and a real
PostgreSQL server (tests/postgres.py). Every test that takes `capture_database` runs on each."""

import multiprocessing
import sqlite3
import time

import pytest

from tests import postgres
from visionloop.core.capture_spool import CaptureSpool
from visionloop.core.capture_store import (
    DB_FILE,
    MIGRATIONS,
    SCHEMA_VERSION,
    CaptureStore,
    CaptureStoreError,
    database_url,
    image_path,
    redacted,
)
from visionloop.core.reply import ClassScore, Prediction, Uncertainty
from visionloop.serving.capture import CapturePolicy, Capturer


def reply(max_prob: float, label: str = "a") -> Prediction:
    return Prediction(model="fm", version="v1", predictions=(ClassScore(label, max_prob),),
                      probabilities=(max_prob, 1 - max_prob),
                      uncertainty=Uncertainty(max_prob, 2 * max_prob - 1, 0.5))


def rows(root, database) -> list:
    store = CaptureStore(root, url=database)
    try:
        return store.captures()
    finally:
        store.close()


@pytest.fixture
def opened():
    """opened(store) returns the store and closes it after the test. A PostgreSQL store's
    pool runs threads (and one pointed at a closed port keeps retrying and logging): left
    open, they would outlive the test and run through the rest of the session, and anything
    that forks the pytest process later copies their locks."""
    stores = []

    def close_after_the_test(store):
        stores.append(store)
        return store

    yield close_after_the_test
    while stores:
        stores.pop().close()


def test_capture_keeps_only_uncertain_predictions_content_addressed(tmp_path, capture_database,
                                                                    opened):
    store = opened(Capturer(tmp_path, CapturePolicy(max_confidence=0.7),
                            database=capture_database))
    assert store.maybe_capture(b"img-1", "r1", reply(0.55))
    assert not store.maybe_capture(b"img-2", "r2", reply(0.95))
    assert store.maybe_capture(b"img-1", "r3", reply(0.6))  # same image, second request
    found = rows(tmp_path, capture_database)
    assert [r.request_id for r in found] == ["r1", "r3"] and found[0].sha == found[1].sha
    assert image_path(tmp_path, found[0].sha).read_bytes() == b"img-1"
    assert found[0].probabilities == pytest.approx([0.55, 0.45])
    assert len(list((tmp_path / "images").rglob("*"))) == 2  # one folder, one file
    assert (tmp_path / DB_FILE).exists() == (capture_database is None)


def test_capture_rate_cap_never_raises(tmp_path, capture_database, opened):
    store = opened(Capturer(tmp_path / "ok", CapturePolicy(per_minute=3),
                            database=capture_database))
    results = [store.maybe_capture(bytes([i]), f"r{i}", reply(0.5)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert store.counts == {"captured": 3, "spooled": 0, "replayed": 0, "dropped_rate_limit": 2,
                            "dropped_spool_full": 0, "errors": 0}


def test_a_broken_capture_directory_is_a_counted_error(tmp_path, opened):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the capture directory should be")
    broken = opened(Capturer(blocked))
    assert broken.maybe_capture(b"x", "r", reply(0.5)) is False
    assert broken.counts["errors"] == 1


def unreachable_database() -> str:
    from visionloop.core.ports import free_loopback_ports

    (port,) = free_loopback_ports(1)  # nothing listens there
    return f"postgresql://visionloop:secret-pw@127.0.0.1:{port}/captures"


def test_an_unreachable_database_spools_the_captures_within_seconds(tmp_path, opened):
    url = unreachable_database()
    store = opened(Capturer(tmp_path, CapturePolicy(per_minute=100), database=url))
    started = time.monotonic()
    assert [store.maybe_capture(bytes([i]), f"r{i}", reply(0.5)) for i in range(3)] == [True] * 3
    assert time.monotonic() - started < 5  # one first-connection wait, then the 0.2 s timeout
    assert store.counts["spooled"] == store.counts["captured"] == 3
    store.store.close()
    with pytest.raises(CaptureStoreError) as err:
        opened(CaptureStore(tmp_path, url=url)).captures()
    assert "secret-pw" not in str(err.value) and "***" in str(err.value)


def test_captures_spooled_while_the_index_is_down_reach_it_in_order_once(tmp_path,
                                                                        capture_database, opened):
    down = opened(Capturer(tmp_path, CapturePolicy(max_confidence=0.7),
                           database=unreachable_database()))
    assert down.capture_batch([(b"a", "r1", reply(0.5)), (b"b", "r2", reply(0.9))]) == [
        True, False]
    assert down.maybe_capture(b"c", "r3", reply(0.6))
    assert down.counts["spooled"] == 2 and len(CaptureSpool(tmp_path).files()) == 1
    up = opened(Capturer(tmp_path, CapturePolicy(max_confidence=0.7), database=capture_database))
    assert up.maybe_capture(b"d", "r4", reply(0.5))  # replays the spool first
    assert up.counts["replayed"] == 2 and not CaptureSpool(tmp_path).files()
    assert [r.request_id for r in rows(tmp_path, capture_database)] == ["r1", "r3", "r4"]
    assert down.maybe_capture(b"e", "r5", reply(0.5))  # a new file: its old one was replayed
    assert up.maybe_capture(b"f", "r6", reply(0.5))
    assert [r.request_id for r in rows(tmp_path, capture_database)] == [
        "r1", "r3", "r4", "r5", "r6"]


def test_a_replay_killed_after_its_commit_writes_nothing_twice(tmp_path, capture_database, opened):
    store = opened(CaptureStore(tmp_path, url=capture_database))
    batch = store.rows([(b"a", "r1", reply(0.5)), (b"b", "r2", reply(0.4))])
    CaptureSpool(tmp_path).append(batch)
    store.insert(batch)  # a replay's commit, its process killed before it deleted the file
    assert store.replay_spool() == 2
    assert [r.request_id for r in store.captures()] == ["r1", "r2"]
    assert not CaptureSpool(tmp_path).files()


def test_the_spool_skips_a_torn_line_and_drops_beyond_its_cap(tmp_path, opened):
    spool = CaptureSpool(tmp_path)
    store = opened(CaptureStore(tmp_path))
    spool.append(store.rows([(b"a", "r1", reply(0.5))]))
    with open(spool.files()[0], "ab") as f:
        f.write(b'{"request_id": "torn')  # its writer killed mid-append, before replying
    assert store.replay_spool() == 1
    assert [r.request_id for r in store.captures()] == ["r1"]
    capped = opened(Capturer(tmp_path / "capped", CapturePolicy(per_minute=100),
                             database=unreachable_database(), spool_max_bytes=1000))
    flags = [capped.maybe_capture(bytes([i]), f"r{i}", reply(0.5)) for i in range(6)]
    assert flags[0] and not flags[-1]
    assert capped.counts["spooled"] + capped.counts["dropped_spool_full"] == 6
    assert capped.counts["dropped_spool_full"] >= 1 and capped.spool.size() <= 1000


SPOOL_AND_DIE = """
import os, signal, sys
from visionloop.core.capture_spool import CaptureSpool
from visionloop.core.reply import ClassScore, Prediction, Uncertainty
from visionloop.serving.capture import CapturePolicy, Capturer
reply = Prediction(model="fm", version="v1", predictions=(ClassScore("a", 0.5),),
                   probabilities=(0.5, 0.5), uncertainty=Uncertainty(0.5, 0.0, 0.5))
capturer = Capturer(sys.argv[1], CapturePolicy(), database=sys.argv[2])
assert capturer.maybe_capture(b"acked", "acked", reply)
print("captured", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_capture_acknowledged_from_the_spool_survives_kill_9(tmp_path, capture_database, opened):
    import subprocess
    import sys

    died = subprocess.run([sys.executable, "-c", SPOOL_AND_DIE, str(tmp_path),
                           unreachable_database()], capture_output=True, text=True, timeout=60)
    assert died.returncode == -9 and died.stdout.strip() == "captured"
    assert opened(CaptureStore(tmp_path, url=capture_database)).replay_spool() == 1
    assert [r.request_id for r in rows(tmp_path, capture_database)] == ["acked"]


def _writer(root: str, database: str | None, worker: int, count: int) -> None:
    store = Capturer(root, CapturePolicy(per_minute=10_000), database=database)
    for i in range(count):
        assert store.maybe_capture(f"{worker}-{i}".encode(), f"{worker}-{i}", reply(0.5))


def test_concurrent_writers_lose_nothing(tmp_path, capture_database):
    """Several worker processes open a fresh store and capture at once: the schema is made
    once, every row arrives."""
    spawn = multiprocessing.get_context("spawn")  # no fork of a process with pool threads
    processes = [spawn.Process(target=_writer, args=(str(tmp_path), capture_database, w, 50))
                 for w in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    found = rows(tmp_path, capture_database)
    assert len({r.request_id for r in found}) == len(found) == 200
    if capture_database is None:
        conn = sqlite3.connect(tmp_path / DB_FILE)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_capture_batch_marks_exactly_the_uncertain_ones(tmp_path, capture_database, opened):
    store = opened(Capturer(tmp_path, CapturePolicy(max_confidence=0.7, per_minute=2),
                            database=capture_database))
    items = [(b"a", "r1", reply(0.9)), (b"b", "r2", reply(0.5)), (b"c", "r3", reply(0.6)),
             (b"d", "r4", reply(0.4))]
    assert store.capture_batch(items) == [False, True, True, False]  # r4: over the rate cap
    assert store.counts == {"captured": 2, "spooled": 0, "replayed": 0, "dropped_rate_limit": 1,
                            "dropped_spool_full": 0, "errors": 0}
    assert [r.request_id for r in rows(tmp_path, capture_database)] == ["r2", "r3"]


def test_capture_takes_every_prediction_of_the_always_classes(tmp_path, capture_database, opened):
    store = opened(Capturer(tmp_path, CapturePolicy(max_confidence=0.7, always_classes=["a"]),
                            database=capture_database))
    assert store.maybe_capture(b"rare", "r1", reply(0.99))  # a minority class, confident
    assert not store.maybe_capture(b"common", "r2", reply(0.99, label="b"))
    assert CapturePolicy(always_classes=["a"]).always_classes == ("a",)  # from serving.json


def test_labeling_queries_link_and_unlink(tmp_path, capture_database, opened):
    """What push relies on: unlinked captures oldest first, linking every capture of an
    image, pushed images, and unlinking tasks deleted in Label Studio."""
    writer = opened(Capturer(tmp_path, CapturePolicy(max_confidence=1.01),
                             database=capture_database))
    writer.capture_batch([(b"x", "r1", reply(0.5)), (b"y", "r2", reply(0.6)),
                          (b"x", "r3", reply(0.55))])
    store = opened(CaptureStore(tmp_path, url=capture_database))
    unlinked = store.unlinked("fm")
    assert [r.max_prob for r in unlinked] == [0.5, 0.6, 0.55]
    assert store.unlinked("another model") == []
    assert (store.count("fm"), store.count("another model")) == (3, 0)
    x, y = unlinked[0].sha, unlinked[1].sha
    assert store.link({x: 7}, "fm") == 2  # both captures of x
    assert store.link({x: 8}, "fm") == 0  # already linked: kept
    assert store.pushed_tasks("fm") == {x: 7}
    assert [r.sha for r in store.unlinked("fm")] == [y]
    store.link({y: 9}, "fm")
    assert store.unlink_tasks_not_in({9}, "fm") == 2  # task 7 was deleted
    assert store.pushed_tasks("fm") == {y: 9}
    assert {r.task_id for r in store.captures()} == {None, 9}


def test_a_fresh_store_has_every_migration_once(tmp_path, capture_database, opened):
    store = opened(CaptureStore(tmp_path, url=capture_database))
    assert store.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1][0]
    store.close()
    again = opened(CaptureStore(tmp_path, url=capture_database))
    assert again.schema_version() == SCHEMA_VERSION
    if capture_database is not None:
        name = capture_database.rsplit("/", 1)[1]
        applied = postgres.query_url(capture_database,
                                     "SELECT string_agg(version::text, ',' ORDER BY version)"
                                     " FROM schema_migrations")
        assert applied == ",".join(str(m[0]) for m in MIGRATIONS), name


OLD_SCHEMA = """
CREATE TABLE captures (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL,
    image_sha256 TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
    predicted TEXT NOT NULL, probabilities TEXT NOT NULL, max_prob REAL NOT NULL,
    margin REAL NOT NULL, entropy REAL NOT NULL, created_at TEXT NOT NULL, task_id INTEGER);
CREATE INDEX captures_sha ON captures(image_sha256);
CREATE INDEX captures_task ON captures(task_id);
INSERT INTO captures VALUES (1, 'old', 'aa', 'fm', 'v1', 'a', '[0.5, 0.5]', 0.5, 0.0, 1.0,
    '2026-01-01T00:00:00.000+00:00', NULL);
"""


def test_a_store_from_before_versioned_migrations_is_upgraded_in_place(tmp_path, opened):
    conn = sqlite3.connect(tmp_path / DB_FILE)
    conn.executescript(OLD_SCHEMA)
    conn.close()
    store = opened(CaptureStore(tmp_path))
    assert store.schema_version() == SCHEMA_VERSION
    assert [r.request_id for r in store.captures()] == ["old"]
    assert [r.capture_id for r in store.unlinked("fm")] == [1]


def test_a_store_newer_than_the_code_is_refused(tmp_path, capture_database, opened):
    store = opened(CaptureStore(tmp_path, url=capture_database))
    store.schema_version()
    store.close()
    if capture_database is None:
        conn = sqlite3.connect(tmp_path / DB_FILE)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 'x')",
                     (SCHEMA_VERSION + 1,))
        conn.commit()
        conn.close()
    else:
        postgres.query_url(capture_database, "INSERT INTO schema_migrations VALUES "
                           f"({SCHEMA_VERSION + 1}, 'from the future', 'x')")
    capturer = opened(Capturer(tmp_path, CapturePolicy(), database=capture_database))
    assert capturer.maybe_capture(b"x", "r", reply(0.5))  # waits in the spool for an upgrade
    assert capturer.counts["spooled"] == 1
    with pytest.raises(CaptureStoreError, match="newer than this visionloop"):
        opened(CaptureStore(tmp_path, url=capture_database)).captures()


def test_database_urls(tmp_path, monkeypatch):
    monkeypatch.delenv("VISIONLOOP_CAPTURE_DATABASE", raising=False)
    assert database_url(tmp_path) == f"sqlite:///{(tmp_path / DB_FILE).resolve()}"
    monkeypatch.setenv("VISIONLOOP_CAPTURE_DATABASE", "postgresql://u:pw@127.0.0.1:1/db")
    assert database_url(tmp_path).startswith("postgresql://")
    assert database_url(tmp_path, "sqlite:///x.db") == "sqlite:///x.db"  # the flag wins
    with pytest.raises(ValueError, match="sqlite:///PATH or postgresql") as err:
        database_url(tmp_path, "mysql://u:hunter2@h/db")
    assert "hunter2" not in str(err.value)
    assert redacted("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"


def test_a_worker_that_started_during_an_outage_writes_once_postgresql_is_back(tmp_path, opened):
    """Its first connection fails (the pool gives up and closes): it spools, and once the
    server is back it opens the index again and replays."""
    server = postgres.start()
    try:
        postgres.halt(server)
        capturer = opened(Capturer(tmp_path, CapturePolicy(), database=server.url))
        assert capturer.maybe_capture(b"a", "during", reply(0.5))
        assert capturer.counts["spooled"] == 1
        postgres.resume(server)
        assert capturer.maybe_capture(b"b", "after", reply(0.5))
        assert capturer.counts["replayed"] == 1 and capturer.counts["spooled"] == 1
        assert [r.request_id for r in rows(tmp_path, server.url)] == ["during", "after"]
    finally:
        postgres.stop(server)
