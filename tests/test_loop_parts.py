"""The retrain job's small parts: the lock, durations, the gate, label bookkeeping."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from visionloop.core.lock import FileLock, LockBusy
from visionloop.core.schedule import JobMetrics, MetricsAddress, parse_duration, run_every
from visionloop.core.trained_labels import label_files
from visionloop.retrain import RetrainConfig, gate


def test_a_second_retrain_is_refused_while_the_first_holds_the_lock(tmp_path):
    path = tmp_path / ".retrain.lock"
    with FileLock(path):
        with pytest.raises(LockBusy, match="held"):
            with FileLock(path):
                pass
    with FileLock(path):  # released on exit
        pass


def test_a_killed_runs_lock_frees_when_its_forked_children_are_gone(tmp_path):
    """A DataLoader worker forked by the run shares its flock: the lock waits for it."""
    path = tmp_path / ".retrain.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import os, signal, sys, time
from visionloop.core.lock import FileLock
lock = FileLock({str(path)!r}).__enter__()
if os.fork() == 0:   # the worker outlives its parent by two seconds
    time.sleep(2)
    os._exit(0)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.wait(10)
    with pytest.raises(LockBusy):  # the parent is dead, its child still holds the lock
        with FileLock(path):
            pass
    started = time.monotonic()
    with FileLock(path, wait_s=20):
        pass
    assert time.monotonic() - started < 10


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900
    assert parse_duration("6h") == 6 * 3600 and parse_duration("1d") == 86400
    for bad in ("6", "h", "-1m", "1w"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_a_scheduled_job_serves_its_runs_on_its_own_metrics_port():
    """Three runs: one ok, one that raises, one with a non-zero exit code; scraped over
    HTTP as Prometheus does, with the official client's parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from visionloop.core.ports import free_loopback_ports

    (port,) = free_loopback_ports(1)
    outcomes = iter([lambda: 0, lambda: 1 / 0, lambda: 2])
    started = time.time()
    run_every(0.01, lambda: next(outcomes)(), "a job", max_runs=3,
              metrics=JobMetrics("push", MetricsAddress("127.0.0.1", port)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {(s.name, s.labels.get("outcome")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.labels.get("job") == "push"}
    assert samples[("visionloop_job_runs_total", "ok")] == 1
    assert samples[("visionloop_job_runs_total", "failed")] == 2
    assert started <= samples[("visionloop_job_last_success_timestamp_seconds", None)] <= \
        time.time()
    assert ("visionloop_job_last_run_seconds", None) in samples


def test_a_failed_run_is_retried_sooner_doubling_up_to_the_interval(monkeypatch):
    """A server still starting must not cost a whole interval (6 h for retrain)."""
    import visionloop.core.schedule as schedule

    waits = []
    monkeypatch.setattr(schedule.time, "sleep", waits.append)
    monotonic = iter(range(0, 1000, 1))  # every run takes 1 s
    monkeypatch.setattr(schedule.time, "monotonic", lambda: float(next(monotonic)))
    outcomes = iter([1, 1, 1, 1, 0, 1, 0])
    run_every(100.0, lambda: next(outcomes), "a job", max_runs=7, first_retry_s=30.0)
    # each wait is measured from the run's start, so 1 s less than the delay
    assert waits == [29.0, 59.0, 99.0, 99.0, 99.0, 29.0, 99.0]


def test_gate_promotes_only_when_a_drop_beyond_the_margin_is_ruled_out():
    """The paired-bootstrap non-inferiority rule on a balanced gate split of 10 x 100."""
    cfg = RetrainConfig(max_macro_f1_drop=0.01, max_minority_recall_drop=0.03)
    classes = tuple("abcdefghij")
    minority = ["e", "f", "i"]
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    champion = np.where(rng.random(1000) < 0.8, labels, (labels + 1) % 10)
    promoted, reason, record = gate(labels, champion, champion.copy(), classes, minority, cfg)
    assert promoted and "not worse" in reason  # the same predictions: no evidence of a drop
    assert record["delta_macro_f1"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    better = np.where(rng.random(1000) < 0.5, labels, champion)  # fixes half its errors
    assert gate(labels, champion, better, classes, minority, cfg)[0]
    minority_rows = np.isin(labels, [4, 5, 8])
    worse = np.where(minority_rows & (rng.random(1000) < 0.3), (labels + 1) % 10, champion)
    promoted, reason, record = gate(labels, champion, worse, classes, minority, cfg)
    assert not promoted and "minority recall may have fallen" in reason
    assert record["delta_minority_recall"]["high"] < 0
    everywhere = np.where(rng.random(1000) < 0.2, (labels + 3) % 10, champion)
    promoted, reason, _ = gate(labels, champion, everywhere, classes, minority, cfg)
    assert not promoted and "macro-F1 may have fallen" in reason
    assert "paired-bootstrap interval" in record["rule"] and record["images"] == 1000


def test_label_files_are_the_pulled_tree(tmp_path):
    (tmp_path / "images" / "coat").mkdir(parents=True)
    (tmp_path / "images" / "coat" / "ab.png").write_bytes(b"x")
    (tmp_path / "images" / "coat" / ".ab2.png.tmp").write_bytes(b"half")
    assert label_files(tmp_path) == {"coat/ab.png"}
    assert label_files(tmp_path / "missing") == set()


def test_demo_never_wipes_a_folder_it_did_not_make(tmp_path):
    from visionloop.demo import Demo, DemoConfig

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo directory"):
        Demo(DemoConfig(out=tmp_path)).run()
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_replica_urls_become_one_config_each_and_bad_ones_are_refused(tmp_path):
    from visionloop.serving.promote import RolloutIncomplete, describe, replica_configs

    replicas = replica_configs(["http://10.0.0.5:8081", "http://127.0.0.1:9081"], tmp_path)
    assert [r.url("management") for r in replicas] == ["http://10.0.0.5:8081",
                                                       "http://127.0.0.1:9081"]
    assert all(r.model_store == tmp_path and not r.token_auth for r in replicas)
    for bad in ("127.0.0.1:8081", "https://a:8081", "http://a"):
        with pytest.raises(ValueError, match="http://HOST:PORT"):
            replica_configs([bad], tmp_path)
    with pytest.raises(ValueError, match="named twice"):
        replica_configs(["http://a:1", "http://a:1"], tmp_path)
    serving = {"http://a:1": ["v2"], "http://b:1": None}
    assert describe(serving) == "http://a:1 v2; http://b:1 unreachable"
    assert "replicas serve: http://a:1 v2; http://b:1 unreachable" in str(
        RolloutIncomplete("v3", "b did not answer", serving))


def test_retrain_takes_several_replicas_on_its_command_line():
    from visionloop.cli import build_parser

    args = build_parser().parse_args(["retrain", "--torchserve-url", "http://127.0.0.1:1",
                                      "--torchserve-url", "http://127.0.0.1:2",
                                      "--torchserve-model-store", "shared"])
    assert args.torchserve_url == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    promote = build_parser().parse_args(["promote", "v2", "--name", "fm", "--management-url",
                                         "http://127.0.0.1:1"])
    assert promote.management_url == ["http://127.0.0.1:1"]


def test_labels_waiting_for_retrain_are_the_pulled_labels_no_retrain_used(tmp_path):
    from visionloop.core.model_store import ModelStore
    from visionloop.core.trained_labels import record_labels_used
    from visionloop.labeling.loop_metrics import LoopCollector, LoopStores

    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "labels" / "images" / "shirt").mkdir(parents=True, exist_ok=True)
        (tmp_path / "labels" / "images" / "shirt" / name).write_bytes(b"png")
    (tmp_path / "store").mkdir()
    stores = LoopStores(tmp_path / "labels", tmp_path / "captures", tmp_path / "store", "m")

    def waiting() -> float:
        (family,) = [f for f in LoopCollector(stores).collect()
                     if f.name == "visionloop_labels_waiting_for_retrain"]
        return family.samples[0].value

    assert waiting() == 3  # no retrain yet
    record_labels_used(ModelStore(tmp_path / "store"), "m", {"shirt/a.png", "shirt/b.png"})
    assert waiting() == 1
