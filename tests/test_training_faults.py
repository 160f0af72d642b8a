"""Training faults with real files: a disk that fills while checkpointing (a real tmpfs), a
corrupt or mismatched checkpoint, a damaged champion in model_store. Each ends with the
store as it was and a clear error; the next run recovers."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.test_retrain import config, make_store, write_labels
from visionloop.core.manifest import ManifestError
from visionloop.core.model_store import ModelStore
from visionloop.core.registry import Registry
from visionloop.retrain import retrain_once
from visionloop.serving.archive import package
from visionloop.trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MiB tmpfs: a checkpoint of the test model (~15 MB) cannot fit."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs (needs root): {mounted.stderr}"
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def store_state(store: Path) -> dict[str, bytes]:
    """Every file but the lock and the CHAMPION pin (a run records the champion it started
    from before training: the same version, written explicitly)."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name not in (".retrain.lock", "CHAMPION")}


def test_disk_full_while_checkpointing_loses_nothing_and_the_next_run_recovers(
        trained_version, small_scenario, tmp_path, small_disk):
    store = make_store(trained_version, tmp_path)
    labels = tmp_path / "labels"
    write_labels(labels, small_scenario)
    before = store_state(store)
    with pytest.raises(CheckpointError, match="No space left on device"):
        retrain_once(config(store, small_scenario, labels, epochs=1, work_dir=small_disk))
    assert store_state(store) == before  # no version, no staging, labels not marked used
    assert Registry(ModelStore(store), "fm").champion() == "v1"
    assert not [p for p in small_disk.rglob("*") if p.is_file()]  # no half-written file

    # the next run, with room and a corrupt checkpoint left in its work dir, trains afresh
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)
    (work / "checkpoints" / "last.pt").write_bytes(b"\x00garbage")
    (work / "checkpoints" / "last.json").write_text("{not json")
    started = time.monotonic()
    decision = retrain_once(config(store, small_scenario, labels, epochs=1, work_dir=work,
                                   max_macro_f1_drop=1.0, max_minority_recall_drop=1.0))
    assert decision is not None and decision.promoted
    print(f"disk full: the next run trained and promoted in {time.monotonic() - started:.1f}s")
    assert Registry(ModelStore(store), "fm").champion() == decision.challenger


def test_corrupt_or_mismatched_checkpoints_are_refused_by_name(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}}, {"epoch": 3})
    assert load_checkpoint(path)[1]["epoch"] == 3
    # a run stopped between the two writes: tensors of epoch 4, metadata of epoch 3
    tensors = path.read_bytes()
    save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, {"epoch": 4})
    (tmp_path / "last.json").write_text(json.dumps({"epoch": 3}))
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_checkpoint(path)
    path.write_bytes(tensors[: len(tensors) // 2])  # truncated
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["manifest", "artifact"])
def test_a_damaged_champion_is_refused_before_training_and_packaging(
        trained_version, small_scenario, tmp_path, damage):
    store = make_store(trained_version, tmp_path)
    labels = tmp_path / "labels"
    write_labels(labels, small_scenario)
    version_dir = store / "fm" / "v1"
    target = version_dir / ("manifest.json" if damage == "manifest" else "model.torchscript.pt")
    pristine = target.read_bytes()
    damaged = bytearray(pristine)
    damaged[len(damaged) // 2] ^= 0xFF
    target.write_bytes(bytes(damaged))
    before = store_state(store)
    with pytest.raises(ManifestError, match=str(target)):
        retrain_once(config(store, small_scenario, labels, epochs=1))
    assert store_state(store) == before  # nothing trained, published or marked used
    if damage == "artifact":
        with pytest.raises(ManifestError, match="does not match the sha256"):
            package(version_dir, tmp_path / "mars", "torchscript")
    # restored (from a backup, by an operator): the next run proceeds
    target.write_bytes(pristine)
    decision = retrain_once(config(store, small_scenario, labels, epochs=1,
                                   max_macro_f1_drop=1.0, max_minority_recall_drop=1.0))
    assert decision is not None and decision.promoted, decision
    assert Registry(ModelStore(store), "fm").champion() == decision.challenger == "v2"
