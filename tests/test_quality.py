"""What a user of the loop notices first, checked against the figures bench/ recorded.

- The default `visionloop train` (every flag at its default: `--learner auto` and its
  candidates) on fixed, seeded long-tailed scenarios of bench.scenarios (Fashion-MNIST with
  five classes, two of them rare; scikit-learn's handwritten digits, three rare) reaches the
  test macro-F1 and minority recall that `python -m bench.learners` recorded for the same
  seeds (bench/results/learners-cpu/results.json, tabulated in docs/benchmarks.md), within a
  tolerance taken from the recorded spread over those seeds.
- The loop, simulated on cached embeddings (serving's capture policy, push's default
  strategy and minority share, the head re-fit on train/ plus the labels as a retrain
  does), beats the same number of random labels beyond the paired 95% interval.

`make test-quality` runs them; `make test` does not (they take minutes, not seconds).
Set VISIONLOOP_QUALITY_DIR to keep the scenarios and embeddings between runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.active_learning import Learner, embeddings
from bench.scenarios import scenario_data
from visionloop.core.bootstrap import paired_difference_to_mean
from visionloop.core.manifest import ModelManifest
from visionloop.core.model_store import ModelStore
from visionloop.core.scenario import class_names
from visionloop.labeling.push_options import PushOptions
from visionloop.labeling.strategies import rank
from visionloop.serving.capture import CAPTURE_BELOW
from visionloop.trainer import fashion_mnist

pytestmark = pytest.mark.quality

RECORDED = Path(__file__).parent.parent / "bench" / "results" / "learners-cpu" / "results.json"
SEEDS = (0, 1, 2)
# How far below the recorded mean over SEEDS today's mean may fall, in standard errors of
# the difference of two such means (one-sided, ~2.3% false alarms when nothing changed but
# the random draws a change of code makes differently).
TOLERANCE_Z = 2.0
FIGURES = ("test_macro_f1", "test_minority_recall")


@pytest.fixture(scope="session")
def quality_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kept = os.environ.get("VISIONLOOP_QUALITY_DIR")
    return Path(kept) if kept else tmp_path_factory.mktemp("quality")


def recorded_picks(scenario: str) -> dict[int, dict[str, float]]:
    """Per seed, the test figures of auto's pick as bench.learners recorded them."""
    runs = json.loads(RECORDED.read_text())[scenario]
    return {run["seed"]: {f: run["selection"]["candidates"][run["selection"]["picked"]][f]
                          for f in FIGURES} for run in runs}


def tolerance(recorded: list[float]) -> float:
    """TOLERANCE_Z standard errors of (today's mean - the recorded mean) over as many seeds,
    the standard deviation over seeds taken from the recorded runs."""
    return TOLERANCE_Z * statistics.stdev(recorded) * math.sqrt(2 / len(recorded))


def train_default(data: Path, root: Path, seed: int, cache: Path) -> dict[str, float]:
    """`visionloop train` as a user runs it (defaults only, but the seed and where files
    go); the test figures of the version it publishes."""
    store, name = root / "store", f"{data.name}-quality"
    command = [sys.executable, "-m", "visionloop.cli", "train", "--data", str(data),
               "--out", str(store), "--name", name, "--seed", str(seed),
               "--work-dir", str(root / "work"), "--embedding-cache", str(cache)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [version] = ModelStore(store).versions(name)
    manifest = ModelManifest.load(store / name / version)
    selection = manifest.metrics["selection"]
    return {f: selection["candidates"][selection["picked"]][f] for f in FIGURES}


@pytest.mark.timeout(3600)  # three trainings of every candidate: ~4 min each on 2 cores
@pytest.mark.parametrize("scenario", ["fashion-5-classes", "digits"])
def test_the_default_train_keeps_the_recorded_quality(scenario, quality_dir, tmp_path):
    recorded = recorded_picks(scenario)
    assert set(SEEDS) <= set(recorded), f"{RECORDED} has no run of {scenario} for {SEEDS}"
    today = {seed: train_default(scenario_data(quality_dir, scenario, seed),
                                 tmp_path / f"seed{seed}", seed, quality_dir / "train-embeddings")
             for seed in SEEDS}
    failures = []
    for figure in FIGURES:
        before = [recorded[s][figure] for s in SEEDS]
        now = [today[s][figure] for s in SEEDS]
        allowed = tolerance(before)
        drop = statistics.mean(before) - statistics.mean(now)
        print(f"\n{scenario} {figure}: recorded {statistics.mean(before):.4f} "
              f"(per seed {', '.join(f'{x:.3f}' for x in before)}), today "
              f"{statistics.mean(now):.4f} ({', '.join(f'{x:.3f}' for x in now)}), "
              f"drop {drop:+.4f}, allowed {allowed:.4f}")
        if drop > allowed:
            failures.append(f"{figure} fell {drop:.4f} (allowed {allowed:.4f})")
    assert not failures, f"{scenario}: " + "; ".join(failures)


# The loop's scenario: Fashion-MNIST at the demo's 1:100 with a pool as long-tailed as
# train/ (30 rare images among 7,030), small enough to embed in about a minute.
LOOP_SCENARIO = dict(minority=("coat", "sandal", "bag"), imbalance_ratio=100.0,
                     train_per_class=300, pool_per_class=1000, val_per_class=50,
                     test_per_class=200)
LOOP_ROUNDS, LOOP_BUDGET = 3, 100  # the demo's: 300 labels in three rounds
RANDOM_DRAWS = 5
LOOP_SEEDS = (0,)  # embedding a scenario takes minutes on 2 cores; the loop itself seconds
LOOP_IMAGE_SIZE = 64  # the bench's frozen Lite0 head (bench.active_learning)


def loop_learner(root: Path, seed: int) -> Learner:
    data = root / f"loop-seed{seed}"
    if not (data / "scenario.json").exists():
        fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(out=data, seed=seed,
                                                                  **LOOP_SCENARIO))
    classes = class_names(data)
    minority = [classes.index(c) for c in LOOP_SCENARIO["minority"]]
    return Learner(embeddings(data, root / "embeddings", LOOP_IMAGE_SIZE), classes, minority)


def predicted_on_test(learner: Learner, head: tuple) -> np.ndarray:
    return (learner.x["test"] @ head[0].T + head[1]).argmax(axis=1)


def run_loop(learner: Learner, options: PushOptions) -> tuple:
    """LOOP_ROUNDS rounds: score the unlabelled pool with the current head, keep what
    serving captures (calibrated confidence under CAPTURE_BELOW, or a predicted minority
    class), let push's strategy pick LOOP_BUDGET of them, label them truly, re-fit."""
    labelled = np.zeros(len(learner.y["pool"]), dtype=bool)
    head = learner.champion
    for round_ in range(LOOP_ROUNDS):
        unlabelled = np.flatnonzero(~labelled)
        probs = learner.probabilities(head, unlabelled)
        captured = np.flatnonzero((probs.max(axis=1) < CAPTURE_BELOW)
                                  | np.isin(probs.argmax(axis=1), learner.minority))
        order = rank(probs[captured], options.strategy, budget=LOOP_BUDGET,
                     minority=learner.minority, minority_share=options.minority_share,
                     seed=options.seed + round_)
        labelled[unlabelled[captured[order[:LOOP_BUDGET]]]] = True
        head = learner.refit(labelled, head)
    return head, int(np.isin(learner.y["pool"][labelled], learner.minority).sum())


@pytest.mark.parametrize("seed", LOOP_SEEDS)
def test_the_loop_beats_random_labels_beyond_the_noise(seed, quality_dir):
    learner = loop_learner(quality_dir, seed)
    head, rare_found = run_loop(learner, PushOptions(budget=LOOP_BUDGET))
    labels = LOOP_ROUNDS * LOOP_BUDGET
    draw_predictions, draws_found = [], []
    for draw in range(RANDOM_DRAWS):  # labelling without a model: any pool image alike
        labelled = np.zeros(len(learner.y["pool"]), dtype=bool)
        labelled[np.random.default_rng((seed, draw)).choice(len(labelled), labels,
                                                            replace=False)] = True
        draws_found.append(int(np.isin(learner.y["pool"][labelled], learner.minority).sum()))
        draw_predictions.append(predicted_on_test(learner, learner.refit(labelled,
                                                                         learner.champion)))
    gain = paired_difference_to_mean(learner.y["test"], draw_predictions,
                                     predicted_on_test(learner, head), len(learner.classes),
                                     learner.minority)
    print(f"\nseed {seed}: loop found {rare_found} rare images in {labels} labels, random "
          f"draws {draws_found}; loop - random mean: "
          + ", ".join(f"{k} {v.estimate:+.4f} [{v.low:+.4f}, {v.high:+.4f}]"
                      for k, v in gain.items()))
    behind = [f"{figure} {interval}" for figure, interval in gain.items() if interval.low <= 0]
    assert not behind, f"loop - random mean is not above the noise: {'; '.join(behind)}"
