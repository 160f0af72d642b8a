"""The retrain job's small parts: the lock, durations, the gate, label bookkeeping."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest

from core.lock import FileLock, LockBusy
from visionloop.retrain import Evaluation, RetrainConfig, gate, label_files, parse_duration


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
from core.lock import FileLock
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


def evaluation(f1: float, recall: float) -> Evaluation:
    return Evaluation(macro_f1=f1, minority_recall=recall, accuracy=f1, ece=0.05,
                      per_class_recall={})


def test_gate_keeps_out_a_challenger_worse_on_either_measure():
    cfg = RetrainConfig(max_macro_f1_drop=0.005, max_minority_recall_drop=0.02)
    champion = evaluation(0.80, 0.60)
    assert gate(champion, evaluation(0.81, 0.65), cfg)[0]
    assert gate(champion, evaluation(0.797, 0.59), cfg)[0]  # within both tolerances
    promoted, reason = gate(champion, evaluation(0.79, 0.70), cfg)
    assert not promoted and "macro-F1 fell" in reason
    promoted, reason = gate(champion, evaluation(0.85, 0.55), cfg)
    assert not promoted and "minority recall fell" in reason
    assert not math.isnan(evaluation(0.8, 0.6).minority_recall)


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
