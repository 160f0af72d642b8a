"""Two TorchServe replicas on one host, one PostgreSQL capture index, HAProxy in front.

What several machines need, run on loopback with the real servers: every `captured: true`
reply has its row and image in the shared store, push reads that store, captures made while
PostgreSQL is down wait in the spool and reach it once it is back, a promotion rolls
through the replicas with no failed request, and a replica that is down stops it without
advancing the champion record, until the next run converges every replica.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests import postgres
from tests.servers import free_ports, kill_worker, predict, start_haproxy, stop_process
from tests.test_retrain import write_labels
from visionloop.configs import RetrainConfig
from visionloop.core.capture_store import CaptureStore, image_path
from visionloop.core.manifest import ModelManifest
from visionloop.core.model_store import ModelStore
from visionloop.core.registry import Registry
from visionloop.core.scenario import read_pool
from visionloop.retrain import restore_champion_serving, retrain_once
from visionloop.serving import server
from visionloop.serving.archive import package
from visionloop.serving.promote import RolloutIncomplete, registered_versions

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    replicas: list[server.ServerConfig]
    balancer_port: int
    store: Path  # the model store (versions)
    capture_dir: Path
    database: str
    mar_v1: str
    postgres: postgres.PostgresServer

    @property
    def management_urls(self) -> list[str]:
        return [r.url("management") for r in self.replicas]


def copy_version(store: Path, source: Path, version: str) -> None:
    """Another version of the same weights: what promotion moves between is the version."""
    import shutil

    target = store / "fm" / version
    shutil.copytree(source, target)
    replace(ModelManifest.load(target), version=version).save(target)


@pytest.fixture(scope="module")
def cluster(trained_version, postgres_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    store = root / "store"
    copy_version(store, trained_version, "v1")
    copy_version(store, trained_version, "v2")
    copy_version(store, trained_version, "v3")
    Registry(ModelStore(store), "fm").set_champion("v1")
    database = postgres.create_database(postgres_server, "replica_captures")
    shared_mars = root / "mars"  # the volume every replica registers archives from
    mar = package(store / "fm" / "v1", shared_mars, "torchscript", batch_size=4).name
    replicas = [server.ServerConfig(home=root / f"torchserve-{i}", model_store=shared_mars,
                                    capture_dir=root / "captures", capture_database=database,
                                    **free_ports()) for i in range(2)]
    started = []
    try:
        for cfg in replicas:
            server.start(cfg, {"fm": mar})
            started.append(cfg)
        balancer, port = start_haproxy(root, [r.inference_port for r in replicas])
        yield Cluster(replicas, port, store, root / "captures", database, mar, postgres_server)
        stop_process(balancer)
    finally:
        for cfg in started:
            server.stop(cfg)


@dataclass
class Outcome:
    sent: float
    answered: float
    status: int
    version: str | None
    captured: bool | None
    uncertain: bool
    sha: str


def post(url: str, body: bytes) -> Outcome:
    sent = time.monotonic()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, reply = response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        status, reply = exc.code, {}
    except OSError:  # refused or reset: a failed request all the same
        status, reply = 0, {}
    uncertain = reply.get("uncertainty", {}).get("max_prob", 1.0) < 0.7
    return Outcome(sent, time.monotonic(), status, reply.get("version"), reply.get("captured"),
                   uncertain, hashlib.sha256(body).hexdigest())


def load(urls: list[str], bodies: list[bytes], stop: threading.Event, threads: int = 4,
         max_requests: int = 5000) -> tuple[list[Outcome], list[threading.Thread]]:
    """Requests from `threads` threads until stop is set (bounded by max_requests)."""
    outcomes: list[Outcome] = []
    counter = iter(range(max_requests))

    def run() -> None:
        for i in counter:
            if stop.is_set():
                return
            outcomes.append(post(urls[i % len(urls)], bodies[i % len(bodies)]))

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    return outcomes, workers


def finish(stop: threading.Event, workers: list[threading.Thread]) -> None:
    stop.set()
    for w in workers:
        w.join(90)


def pool_bodies(small_scenario: Path) -> list[bytes]:
    return [p.read_bytes() for p, _ in read_pool(small_scenario)]


def direct_urls(cluster: Cluster) -> list[str]:
    return [f"{r.url('inference')}/predictions/fm" for r in cluster.replicas]


def stored(cluster: Cluster) -> Counter:
    store = CaptureStore(cluster.capture_dir, url=cluster.database)
    try:
        return Counter(r.sha for r in store.captures())
    finally:
        store.close()


def assert_every_capture_stored(cluster: Cluster, outcomes: list[Outcome]) -> None:
    rows = stored(cluster)
    captured = Counter(o.sha for o in outcomes if o.captured)
    for sha, count in captured.items():
        assert rows[sha] >= count, f"{count - rows[sha]} captures of {sha} lost"
        assert hashlib.sha256(image_path(cluster.capture_dir, sha).read_bytes()).hexdigest() \
            == sha


def test_two_replicas_write_one_postgresql_store_under_load(cluster, small_scenario, capsys):
    bodies = pool_bodies(small_scenario)
    stop = threading.Event()
    outcomes, workers = load(direct_urls(cluster), bodies, stop, threads=6, max_requests=300)
    for w in workers:
        w.join(180)
    stop.set()
    assert len(outcomes) == 300 and all(o.status == 200 for o in outcomes)
    captured = [o for o in outcomes if o.captured]
    assert captured and all(o.uncertain or o.captured for o in captured)
    rows = stored(cluster)
    assert_every_capture_stored(cluster, outcomes)
    lost = sum(max(0, n - rows[sha]) for sha, n in Counter(o.sha for o in captured).items())
    with capsys.disabled():
        print(f"\ntwo replicas, one PostgreSQL store: {len(outcomes)} requests, "
              f"{len(captured)} captured, {sum(rows.values())} rows, lost {lost}")
    assert not (cluster.capture_dir / "captures.sqlite3").exists()  # nothing went to SQLite
    assert sum(rows.values()) == len(captured)


def test_push_reads_the_shared_store(cluster, labelstudio, trained_version):
    from visionloop.labeling.client import connect
    from visionloop.labeling.project import ensure_project
    from visionloop.labeling.push import PushOptions, push

    client = connect(labelstudio)
    project = ensure_project(client, "replicas' shared store",
                             ModelManifest.load(trained_version).classes)
    options = PushOptions(budget=5, transport="base64")
    first = push(cluster.capture_dir, client, project, "fm", ["coat", "sandal", "bag"], options,
                 capture_database=cluster.database)
    assert first.pushed == 5
    store = CaptureStore(cluster.capture_dir, url=cluster.database)
    try:
        linked = {r.task_id for r in store.captures() if r.task_id is not None}
    finally:
        store.close()
    assert linked == set(first.task_ids)
    again = push(cluster.capture_dir, client, project, "fm", ["coat", "sandal", "bag"],
                 replace(options, budget=0), capture_database=cluster.database)
    assert again.pushed == 0 and again.reconciled == 0  # the links are in PostgreSQL


def test_captures_wait_on_disk_through_a_postgresql_outage(cluster, small_scenario, capsys):
    """PostgreSQL down for ~8 s under load, a worker kill -9'd in the middle of it: every reply
    is 200, the captures acknowledged while it was down wait in the spool, and once it is
    back they are in the index, each once."""
    bodies = pool_bodies(small_scenario)
    rows_before = stored(cluster)
    stop = threading.Event()
    outcomes, workers = load(direct_urls(cluster), bodies, stop, threads=4)
    time.sleep(3)
    went_down = postgres.halt(cluster.postgres)
    time.sleep(3)
    spooled_before_kill = len(list((cluster.capture_dir / "spool").glob("*.jsonl")))
    killed, worker_back = kill_worker(cluster.replicas[0], "fm")
    time.sleep(2)
    back = postgres.resume(cluster.postgres)
    time.sleep(6)  # the pools reconnect; the next writes replay the spool
    finish(stop, workers)
    failed = [o for o in outcomes if o.status != 200]
    # the kill only: each failed request was in flight at the kill or sent before the new
    # worker was up (queued behind a batch the outage slowed: one was sent over 1 s before)
    assert all(o.answered >= killed and o.sent <= worker_back + 1 for o in failed), failed
    during = [o for o in outcomes if went_down < o.sent and o.answered < back - 0.5]
    captured_during = [o for o in during if o.captured]
    assert captured_during, "nothing was captured while PostgreSQL was down"
    assert spooled_before_kill >= 1
    assert not list((cluster.capture_dir / "spool").glob("*.jsonl")), "the spool was not replayed"
    rows_after = stored(cluster)
    new_rows = rows_after - rows_before
    acknowledged = Counter(o.sha for o in outcomes if o.captured)
    lost = sum((acknowledged - new_rows).values())
    duplicated = sum((new_rows - acknowledged).values())
    with capsys.disabled():
        print(f"\nPostgreSQL down {back - went_down:.1f} s mid-load, a worker kill -9'd while "
              f"it was down: {len(outcomes)} requests, {len(failed)} failed (the kill); "
              f"{len(during)} requests while down, {len(captured_during)} captured (spooled); "
              f"{sum(new_rows.values())} rows written for {sum(acknowledged.values())} "
              f"acknowledged captures: lost {lost}, duplicated {duplicated}")
    assert lost == 0 and duplicated == 0
    assert all(rows_after[sha] >= n for sha, n in rows_before.items())  # nothing committed lost


def test_a_worker_killed_mid_load_loses_no_capture_on_postgresql(cluster, small_scenario,
                                                                  capsys):
    replica = cluster.replicas[0]
    stop = threading.Event()
    outcomes, workers = load(direct_urls(cluster), pool_bodies(small_scenario), stop, threads=4)
    time.sleep(2)
    killed, back = kill_worker(replica, "fm")
    time.sleep(3)
    finish(stop, workers)
    failed = [o for o in outcomes if o.status != 200]
    assert all(o.sent <= back + 1 for o in failed), failed  # only around the kill
    assert any(o.captured for o in outcomes if o.sent > back + 1)
    assert_every_capture_stored(cluster, outcomes)
    with capsys.disabled():
        print(f"\nkill -9 of a worker mid-load (PostgreSQL index): {len(outcomes)} requests, "
              f"{len(failed)} failed, worker back in {back - killed:.1f} s, "
              f"{sum(bool(o.captured) for o in outcomes)} captured, every one stored")


def promote_cli(cluster: Cluster, version: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "visionloop.cli", "promote", version, "--name", "fm",
               "--store", str(cluster.store), "--export-path",
               str(cluster.replicas[0].model_store)]
    for url in cluster.management_urls:
        command += ["--management-url", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_rolling_promotion_behind_the_balancer_fails_no_request(cluster, small_scenario,
                                                                  capsys):
    bodies = pool_bodies(small_scenario)
    stop = threading.Event()
    balancer = f"http://127.0.0.1:{cluster.balancer_port}/predictions/fm"
    outcomes, workers = load([balancer], bodies, stop, threads=4)
    time.sleep(1)
    started = time.monotonic()
    result = promote_cli(cluster, "v2")
    took = time.monotonic() - started
    time.sleep(1)
    finish(stop, workers)
    assert result.returncode == 0, result.stderr
    failed = [o for o in outcomes if o.status != 200]
    with capsys.disabled():
        drains = [line.split("after draining it ")[1] for line in result.stderr.splitlines()
                  if "after draining it" in line]
        print(f"\nrolling promotion v1 -> v2 over 2 replicas behind HAProxy: "
              f"{len(outcomes)} requests, {len(failed)} failed; {took:.1f} s in all; "
              f"drains: {'; '.join(drains)}; {result.stdout.strip().splitlines()[-1]}")
    assert outcomes and not failed, Counter(o.status for o in failed)
    # each replica drained v1 before unregistering it; whether a batch of v1 was still
    # running at the check is a race with the load (CI saw both), so no assertion on it
    assert len(drains) == len(cluster.replicas), result.stderr[-2000:]
    assert {o.version for o in outcomes} == {"v1", "v2"}
    for cfg in cluster.replicas:
        assert registered_versions(cfg, "fm") == ["v2"]
    assert Registry(ModelStore(cluster.store), "fm").champion() == "v2"


def test_a_replica_down_stops_the_promotion_and_the_next_run_converges(cluster,
                                                                       small_scenario):
    down = cluster.replicas[1]
    assert server.stop(down)
    result = promote_cli(cluster, "v3")
    assert result.returncode == 5, result.stdout + result.stderr
    assert down.url("management") in result.stderr and "unreachable" in result.stderr
    assert f"{cluster.replicas[0].url('management')} v2" in result.stderr  # who serves what
    assert registered_versions(cluster.replicas[0], "fm") == ["v2"]  # nothing was changed
    assert Registry(ModelStore(cluster.store), "fm").champion() == "v2"

    # a scheduled retrain meets the same: its challenger passes the gate (margins wide open)
    # but the rollout stops, the decision is recorded as not promoted, the champion stays
    labels = cluster.capture_dir.parent / "labels"
    write_labels(labels, small_scenario)
    retrain = RetrainConfig(name="fm", store=cluster.store, data=small_scenario,
                            labels_dir=labels, pull=False, learner="finetune", epochs=1,
                            base_per_class=10, min_new_labels=1, max_macro_f1_drop=1.0,
                            max_minority_recall_drop=1.0,
                            work_dir=cluster.capture_dir.parent / "work")
    with pytest.raises(RolloutIncomplete, match="unreachable"):
        retrain_once(retrain, torchserve=cluster.replicas)
    registry = Registry(ModelStore(cluster.store), "fm")
    last = registry.decisions()[-1]
    assert not last.promoted and "rollout" in last.reason and "stays v2" in last.reason
    assert registry.champion() == "v2"
    assert registered_versions(cluster.replicas[0], "fm") == ["v2"]

    server.start(down, {"fm": cluster.mar_v1})  # back, with the archive it starts with
    assert registered_versions(down, "fm") == ["v1"]
    cfg = RetrainConfig(name="fm", store=cluster.store, data=Path("unused"),
                        labels_dir=Path("unused"))
    assert restore_champion_serving(cfg, cluster.replicas, "v2")  # what the next run does first
    image = pool_bodies(small_scenario)[0]
    for replica in cluster.replicas:
        assert registered_versions(replica, "fm") == ["v2"]
        status, reply = predict(replica, "fm", image)
        assert status == 200 and reply["version"] == "v2"
