"""The retrain job against real training, real files and a real TorchServe: too few labels
do nothing; a worse challenger is kept out; one within tolerance is promoted and answers the
next request; a retrain killed mid-training leaves the champion serving and the next run
recovers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import free_ports, predict
from visionloop.core.lock import FileLock
from visionloop.core.model_store import ModelStore
from visionloop.core.registry import Registry
from visionloop.core.scenario import read_pool
from visionloop.retrain import RetrainConfig, retrain_once
from visionloop.serving import server
from visionloop.serving.archive import package
from visionloop.serving.promote import registered_versions

pytestmark = pytest.mark.slow


def make_store(trained_version: Path, root: Path) -> Path:
    """A private model_store holding a copy of the session's trained version as champion."""
    store = root / "store"
    shutil.copytree(trained_version, store / trained_version.parent.name / trained_version.name)
    return store


def write_labels(labels_dir: Path, small_scenario: Path, wrong: bool = False) -> int:
    """The pool with its true labels (or every label shifted by one class), as pull writes it."""
    pool = read_pool(small_scenario)
    classes = sorted({label for _, label in pool})
    for path, label in pool:
        if wrong:
            label = classes[(classes.index(label) + 1) % len(classes)]
        target = labels_dir / "images" / label / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return len(pool)


def config(store: Path, small_scenario: Path, labels: Path, **overrides) -> RetrainConfig:
    # these tests exercise the fine-tune learner's checkpoints and faults (the head
    # learner's retrain runs in tests/test_demo.py)
    values = dict(name="fm", store=store, data=small_scenario, labels_dir=labels, pull=False,
                  learner="finetune", min_new_labels=10, epochs=2, base_per_class=20, lr=1e-3,
                  work_dir=store.parent / "work")  # the gate's default tolerances
    values.update(overrides)
    return RetrainConfig(**values)


@pytest.fixture(scope="module")
def serving_champion(trained_version: Path, tmp_path_factory: pytest.TempPathFactory):
    """TorchServe serving the champion (v1 of a private store)."""
    root = tmp_path_factory.mktemp("retrain")
    store = make_store(trained_version, root)
    home = root / "torchserve"
    cfg = server.ServerConfig(home=home, model_store=home / "model-store",
                              capture_dir=root / "captures", **free_ports())
    mar = package(store / "fm" / "v1", cfg.model_store, "torchscript")
    server.start(cfg, {"fm": mar.name})
    yield store, cfg
    server.stop(cfg)


def test_too_few_new_labels_do_nothing(trained_version, small_scenario, tmp_path):
    store = make_store(trained_version, tmp_path)
    labels = tmp_path / "labels"
    write_labels(labels, small_scenario)
    cfg = config(store, small_scenario, labels, min_new_labels=1000)
    assert retrain_once(cfg) is None
    assert ModelStore(store).versions("fm") == ["v1"]
    assert not (store / "fm" / "registry.md").exists()


def test_worse_challenger_is_kept_out_and_a_good_one_serves_the_next_request(
        serving_champion, small_scenario, tmp_path):
    store, torchserve = serving_champion
    versions, registry = ModelStore(store), Registry(ModelStore(store), "fm")
    # v1 when this test runs first; the module's other tests promote versions of their own
    champion = registry.champion()
    image = next((small_scenario / "test").rglob("*.png")).read_bytes()
    assert predict(torchserve, "fm", image)[1]["version"] == champion

    wrong = tmp_path / "wrong-labels"
    write_labels(wrong, small_scenario, wrong=True)
    bad_version = versions.next_version("fm")
    bad = retrain_once(config(store, small_scenario, wrong, epochs=3, lr=5e-3, base_per_class=2),
                       torchserve=torchserve)
    assert bad is not None and not bad.promoted, bad
    assert bad.champion == champion and bad.challenger == bad_version
    # kept out because the gate's paired interval on val/ admits a drop beyond a margin
    evidence = bad.gate
    assert (evidence["delta_macro_f1"]["low"] < -0.01
            or evidence["delta_minority_recall"]["low"] < -0.03), evidence
    assert evidence["split"] == "val/" and "paired-bootstrap" in evidence["rule"]
    assert registry.champion() == champion
    assert predict(torchserve, "fm", image)[1]["version"] == champion

    right = tmp_path / "labels"
    write_labels(right, small_scenario)
    # This half tests what promotion does, not the gate's rule (tests/test_loop_parts.py,
    # measured in bench/gate.py). The small scenario's val/ has 200 images: the paired 95%
    # interval of a 2-epoch fine-tune on the true labels spans about +-0.07 macro-F1 and
    # +-0.13 minority recall (CI saw [-0.052, +0.095] and [-0.110, +0.146]), so the
    # default margins would keep out a challenger no worse than its champion.
    good_version = versions.next_version("fm")
    good = retrain_once(config(store, small_scenario, right, max_macro_f1_drop=0.15,
                               max_minority_recall_drop=0.3),
                        torchserve=torchserve)
    assert good is not None and good.promoted, good
    assert good.champion == champion and good.challenger == good_version
    assert registry.champion() == good_version
    status, reply = predict(torchserve, "fm", image)
    assert status == 200 and reply["version"] == good_version
    # the log a person reads ends with this test's two decisions
    kept_row, promoted_row = (store / "fm" / "registry.md").read_text().splitlines()[-2:]
    assert f"| {champion} | {bad_version} |" in kept_row and "| kept champion |" in kept_row
    assert f"| {champion} | {good_version} |" in promoted_row and "| promoted |" in promoted_row
    # the same labels again are not new: a scheduled run does nothing
    assert retrain_once(config(store, small_scenario, right), torchserve=torchserve) is None


def test_retrain_killed_mid_training_leaves_the_champion_serving(
        serving_champion, small_scenario, tmp_path):
    store, torchserve = serving_champion
    champion = Registry(ModelStore(store), "fm").champion()
    versions_before = ModelStore(store).versions("fm")
    labels = tmp_path / "labels"
    write_labels(labels, small_scenario)
    # new label files (other names) so this run has work to do
    for path in list((labels / "images").rglob("*.png")):
        path.rename(path.with_name("again-" + path.name))
    work = tmp_path / "work"
    command = [sys.executable, "-m", "visionloop.cli", "retrain", "--name", "fm",
               "--learner", "finetune",
               "--store", str(store), "--data", str(small_scenario), "--labels-dir", str(labels),
               "--no-pull", "--min-new-labels", "10", "--epochs", "30", "--base-per-class", "60",
               "--work-dir", str(work), "--torchserve-home", str(torchserve.home),
               "--management-port", str(torchserve.management_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while not list((work / "checkpoints").glob("*.pt")):  # a finished epoch: mid-training
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)

    image = next((small_scenario / "test").rglob("*.png")).read_bytes()
    status, reply = predict(torchserve, "fm", image)
    assert status == 200 and reply["version"] == champion
    assert Registry(ModelStore(store), "fm").champion() == champion
    assert ModelStore(store).versions("fm") == versions_before
    # the dead run's lock is free once the kernel has reaped its DataLoader workers too
    with FileLock(store / "fm" / ".retrain.lock", wait_s=30):
        pass
    # the next run starts clean and finishes
    challenger = ModelStore(store).next_version("fm")
    decision = retrain_once(config(store, small_scenario, labels, epochs=1,
                                   max_macro_f1_drop=1.0, max_minority_recall_drop=1.0),
                            torchserve=torchserve)
    assert decision is not None and decision.promoted, decision
    assert decision.champion == champion and decision.challenger == challenger
    assert not list((store / "fm").glob(".staging-*"))
    assert predict(torchserve, "fm", image)[1]["version"] == decision.challenger


@pytest.mark.parametrize("point, challenger_briefly_served", [
    ("trainer.export", False),        # TorchScript written, ONNX not yet
    ("promote.registered", False),    # challenger registered beside the champion
    ("promote.default_set", True),    # challenger is the default, champion still registered
    ("retrain.served", True),         # promotion done, CHAMPION record not yet written
])
def test_retrain_killed_during_export_or_promotion_recovers_on_the_next_run(
        serving_champion, small_scenario, tmp_path, point, challenger_briefly_served):
    store, torchserve = serving_champion
    registry = Registry(ModelStore(store), "fm")
    champion = registry.champion()
    log = store / "fm" / "registry.jsonl"
    decisions_before = len(log.read_text().splitlines()) if log.exists() else 0
    labels = tmp_path / "labels"
    write_labels(labels, small_scenario)
    for path in list((labels / "images").rglob("*.png")):
        path.rename(path.with_name(f"{point}-{path.name}"))  # new labels for this run
    command = [sys.executable, "-m", "visionloop.cli", "retrain", "--name", "fm",
               "--learner", "finetune",
               "--store", str(store), "--data", str(small_scenario), "--labels-dir", str(labels),
               "--no-pull", "--min-new-labels", "10", "--epochs", "1", "--base-per-class", "20",
               "--max-macro-f1-drop", "1", "--max-minority-recall-drop", "1",
               "--work-dir", str(tmp_path / "work"), "--torchserve-home", str(torchserve.home),
               "--management-port", str(torchserve.management_port)]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VISIONLOOP_FAILPOINTS": point})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]

    image = next((small_scenario / "test").rglob("*.png")).read_bytes()
    status, reply = predict(torchserve, "fm", image)
    assert status == 200  # something always answers
    assert (reply["version"] != champion) == challenger_briefly_served
    assert registry.champion() == champion

    started = time.monotonic()
    retrain_once(config(store, small_scenario, labels, epochs=1, max_macro_f1_drop=1.0,
                        max_minority_recall_drop=1.0), torchserve=torchserve)
    recovered = registry.champion()
    assert registered_versions(torchserve, "fm") == [recovered]
    assert predict(torchserve, "fm", image)[1]["version"] == recovered
    assert not list((store / "fm").glob(".staging-*"))
    decisions = len(log.read_text().splitlines()) if log.exists() else 0
    if point == "trainer.export":  # the labels were not used: the next run trains and promotes
        assert recovered != champion and decisions == decisions_before + 1
    else:  # they were: the next run restores the champion and waits for new labels
        assert recovered == champion and decisions == decisions_before
    print(f"{point}: recovered in {time.monotonic() - started:.1f}s, serving {recovered}")


def test_a_manual_promote_is_refused_while_a_retrain_holds_the_lock(trained_version, tmp_path):
    store = make_store(trained_version, tmp_path)
    command = [sys.executable, "-m", "visionloop.cli", "promote", "v1", "--name", "fm",
               "--store", str(store), "--export-path", str(tmp_path / "mars"),
               "--home", str(tmp_path / "ts"),
               "--management-port", str(free_ports()["management_port"])]
    with Registry(ModelStore(store), "fm").writer_lock():
        refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 4 and "a retrain is running" in refused.stderr, refused.stderr
    assert not (store / "fm" / "CHAMPION").exists()
