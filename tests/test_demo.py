"""The demo's --quick path end to end: real TorchServe, real Label Studio, real training."""

from __future__ import annotations

import json
import re

import pytest

from visionloop.demo import Demo, DemoConfig
from visionloop.labeling import server as labelstudio_server
from visionloop.serving import server as torchserve_server

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_quick_demo_runs_the_whole_loop_and_reports(small_scenario, trained_version, tmp_path):
    cfg = DemoConfig.quick(scenario=small_scenario, out=tmp_path / "demo", champion=trained_version,
                           name="fm")
    demo = Demo(cfg)
    report = demo.run()

    text = report.read_text()
    assert (report.parent / "report.png").stat().st_size > 10_000
    rows = re.findall(r"^\| (\d) \| (loop|random) \| (\d+) \| (\d+) \|", text, re.MULTILINE)
    assert [(r[0], r[1]) for r in rows] == [(str(i), b) for i in range(3)
                                             for b in ("loop", "random")]
    spent = {(int(r[0]), r[1]): int(r[2]) for r in rows}
    assert spent[(2, "random")] == 2 * cfg.budget  # the baseline spends the same budget
    assert 0 < spent[(1, "loop")] <= cfg.budget < spent[(2, "loop")] <= 2 * cfg.budget
    # every round's retrain decision is in the registry, and the report quotes it
    registry = (cfg.out / "model_store" / "fm" / "registry.md").read_text()
    assert len(re.findall(r"^\| 20", registry, re.MULTILINE)) == cfg.rounds
    assert "Retraining decisions" in text
    # the random baseline is drawn random_draws times; the comparison is against their mean
    assert re.search(rf"^\| mean of {cfg.random_draws} \|", text, re.MULTILINE)
    summary = json.loads((report.parent / "report.json").read_text())
    assert [d["draw"] for d in summary["random_draws"]] == list(range(1, cfg.random_draws + 1))
    assert all(d["minority_labels"] <= 2 * cfg.budget for d in summary["random_draws"])
    mean = summary["comparison"]["random_mean"]["minority_recall"]
    assert mean["low"] <= mean["estimate"] <= mean["high"]
    assert "loop_minus_random_mean" in summary["comparison"]
    # captures came through TorchServe and labels came back from Label Studio
    assert any((cfg.out / "captures" / "images").rglob("*"))
    assert any((cfg.out / "labels" / "images").rglob("*.png"))
    # both servers are stopped
    assert torchserve_server.read_pid(demo.torchserve) is None
    assert labelstudio_server.read_pid(demo.labelstudio) is None
