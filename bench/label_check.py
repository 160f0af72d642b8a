"""Does checking labels before they train pay, when an annotator is wrong a known share of
the time?

Per seed, the loop of bench/active_learning.py (long-tailed Fashion-MNIST, ratio 100; the
frozen Lite0 head the product runs on a CPU; push's default class_balanced ranking over what
the capture policy keeps) labels --labels images in rounds of --budget, with a simulated
annotator who gives a uniformly chosen wrong class for --flip of the images (which ones is
fixed per seed, so every arm sees the same annotator). Three arms:
- clean: the true labels (what the loop would reach with a perfect annotator);
- no check: the annotator's answers train as given;
- check: labeling.label_check's rule with the serving model's calibrated probabilities
  (temperature fit on val/ after every re-fit, as the trainer does): a flagged label goes
  to a second annotator, as wrong as the first (--flip, drawn independently), whose answer
  trains; the rest train at once.
Reported: flips caught and right labels sent back (per seed and in all), reviews asked,
final test macro-F1 and minority recall per arm, and check - no check paired over seeds
and on the test set (bootstrap 95%, seed 0).

    python -m bench.label_check --out bench/results/label-check-cpu --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from bench.active_learning import Learner, default_scenario, seed_learner, select
from bench.report import mean_std, run_seeds
from visionloop.core.bootstrap import paired_difference
from visionloop.labeling.label_check import REVIEW_BELOW, flagged
from visionloop.trainer.calibration import fit_temperature
from visionloop.trainer.head import fit_linear_head

log = logging.getLogger("bench.label_check")
ARMS = ("clean", "no_check", "check")
STRATEGY = "class_balanced"  # push's default


def wrong_answers(y: np.ndarray, n_classes: int, share: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(is_flipped, answer): a uniformly chosen other class for `share` of the images."""
    flipped = rng.random(len(y)) < share
    answer = np.where(flipped, (y + rng.integers(1, n_classes, len(y))) % n_classes, y)
    return flipped, answer


class NoisyLoop:
    """One arm of the loop: the head re-fit on train + the labels as they were decided."""

    def __init__(self, learner: Learner, arm: str, first: tuple, second: tuple,
                 review_below: float) -> None:
        self.learner, self.arm, self.review_below = learner, arm, review_below
        (self.flipped, self.answer), (self.second_flipped, self.second_answer) = first, second
        n = len(learner.y["pool"])
        self.labelled = np.zeros(n, dtype=bool)
        self.trained_label = np.full(n, -1)
        self.head = learner.champion
        self.temperature = self._temperature()
        self.counts = {"flips": 0, "flips_caught": 0, "right": 0, "right_sent_back": 0,
                       "reviews": 0, "wrong_after_review": 0, "wrong_trained": 0}

    def _logits(self, split: str, rows: np.ndarray | None = None) -> np.ndarray:
        x = self.learner.x[split] if rows is None else self.learner.x[split][rows]
        return x @ self.head[0].T + self.head[1]

    def _temperature(self) -> float:
        return fit_temperature(torch.from_numpy(self._logits("val")),
                               torch.from_numpy(self.learner.y["val"]))

    def calibrated(self, rows: np.ndarray) -> np.ndarray:
        logits = self._logits("pool", rows) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def label(self, picks: np.ndarray) -> None:
        truth = self.learner.y["pool"][picks]
        if self.arm == "clean":
            decided = truth
        else:
            decided = self.answer[picks].copy()
            flips = self.flipped[picks]
            self.counts["flips"] += int(flips.sum())
            self.counts["right"] += int((~flips).sum())
            if self.arm == "check":
                sent = flagged(decided, self.calibrated(picks), self.review_below)
                self.counts["flips_caught"] += int((sent & flips).sum())
                self.counts["right_sent_back"] += int((sent & ~flips).sum())
                self.counts["reviews"] += int(sent.sum())
                decided[sent] = self.second_answer[picks][sent]
                self.counts["wrong_after_review"] += int((sent & (decided != truth)).sum())
            self.counts["wrong_trained"] += int((decided != truth).sum())
        self.labelled[picks] = True
        self.trained_label[picks] = decided

    def refit(self) -> None:
        rows = np.flatnonzero(self.labelled)
        x = np.concatenate([self.learner.x["train"], self.learner.x["pool"][rows]])
        y = np.concatenate([self.learner.train_y, self.trained_label[rows]])
        self.head = fit_linear_head(x, y, self.learner.prior, l2=self.learner.l2,
                                    init=self.head)
        self.temperature = self._temperature()

    def test_predictions(self) -> np.ndarray:
        return self._logits("test").argmax(axis=1)


def run_arm(learner: Learner, arm: str, args: argparse.Namespace, seed: int,
            first: tuple, second: tuple) -> NoisyLoop:
    loop = NoisyLoop(learner, arm, first, second, args.review_below)
    rng = np.random.default_rng(seed)
    while loop.labelled.sum() < args.labels:
        step = min(args.budget, args.labels - int(loop.labelled.sum()))
        picks = select(learner, STRATEGY, loop.head, np.flatnonzero(~loop.labelled), step, rng)
        loop.label(picks)
        loop.refit()
    return loop


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    started = time.monotonic()
    learner = seed_learner(args, seed)
    classes, minority = learner.classes, learner.minority
    y_pool = learner.y["pool"]
    annotators = np.random.default_rng((seed, 1))
    first = wrong_answers(y_pool, len(classes), args.flip, annotators)
    second = wrong_answers(y_pool, len(classes), args.flip, annotators)
    result = {"seed": seed, "arms": {}}
    predictions = {}
    for arm in ARMS:
        loop = run_arm(learner, arm, args, seed, first, second)
        predictions[arm] = loop.test_predictions()
        scores = learner.score(loop.head)
        result["arms"][arm] = {"counts": loop.counts, **scores}
        log.info("seed %d %s: %s macro-F1 %.4f minority recall %.4f", seed, arm, loop.counts,
                 scores["macro_f1"]["estimate"], scores["minority_recall"]["estimate"])
    y_test = learner.y["test"]
    result["check_minus_no_check"] = {
        k: v.to_dict() for k, v in paired_difference(
            y_test, predictions["no_check"], predictions["check"], len(classes),
            minority).items()}
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _over_seeds(per_seed: np.ndarray) -> str:
    """Mean and a bootstrap 95% interval over seeds (2000 resamples)."""
    picks = np.random.default_rng(0).integers(0, len(per_seed), (2000, len(per_seed)))
    low, high = np.percentile(per_seed[picks].mean(axis=1), [2.5, 97.5])
    return f"{per_seed.mean():+.3f} [{low:+.3f}, {high:+.3f}]"


def summarise(results: list[dict], args: argparse.Namespace) -> str:
    seeds = ",".join(str(r["seed"]) for r in results)
    lines = ["# Labels checked before they train", "",
             f"`python -m bench.label_check --seeds {seeds} --labels {args.labels} --flip "
             f"{args.flip} --review-below {args.review_below}` on this machine (2 CPU cores): "
             f"{args.labels} loop labels in rounds of {args.budget}, an annotator wrong on "
             f"{args.flip:.0%} of the images, a reviewer as wrong, independently. "
             "Mean ± std over seeds.", "",
             "| seed | flips | caught | right labels | sent back | reviews | wrong labels "
             "trained: no check / check |", "|---|---|---|---|---|---|---|"]
    totals = dict.fromkeys(("flips", "flips_caught", "right", "right_sent_back"), 0)
    for r in results:
        c, n = r["arms"]["check"]["counts"], r["arms"]["no_check"]["counts"]
        for key in totals:
            totals[key] += c[key]
        lines.append(f"| {r['seed']} | {c['flips']} | {c['flips_caught']} | {c['right']} | "
                     f"{c['right_sent_back']} | {c['reviews']} | {n['wrong_trained']} / "
                     f"{c['wrong_trained']} |")
    lines += ["", f"In all: {totals['flips_caught']} of {totals['flips']} flips caught "
              f"({totals['flips_caught'] / max(1, totals['flips']):.0%}), "
              f"{totals['right_sent_back']} of {totals['right']} right labels sent back "
              f"({totals['right_sent_back'] / max(1, totals['right']):.1%}).", "",
              "| arm | macro-F1 | minority recall |", "|---|---|---|"]
    for arm in ARMS:
        f1 = [r["arms"][arm]["macro_f1"]["estimate"] for r in results]
        recall = [r["arms"][arm]["minority_recall"]["estimate"] for r in results]
        lines.append(f"| {arm} | {mean_std(f1)} | {mean_std(recall)} |")
    lines += ["", "check - no check, paired by seed (mean [bootstrap 95% over seeds]) and on "
              "seed 0's test set (paired bootstrap 95%):", "",
              "| metric | per seed | over seeds | seed 0 test set |", "|---|---|---|---|"]
    for metric in ("macro_f1", "minority_recall"):
        diffs = np.array([r["arms"]["check"][metric]["estimate"]
                          - r["arms"]["no_check"][metric]["estimate"] for r in results])
        first = results[0]["check_minus_no_check"][metric]
        lines.append(f"| {metric} | {', '.join(f'{d:+.3f}' for d in diffs)} | "
                     f"{_over_seeds(diffs)} | {first['estimate']:+.3f} "
                     f"[{first['low']:+.3f}, {first['high']:+.3f}] |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/label-check-cpu"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-al"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--labels", type=int, default=300, help="loop labels (the demo's)")
    parser.add_argument("--budget", type=int, default=50, help="labels per round")
    parser.add_argument("--flip", type=float, default=0.10,
                        help="share of images each annotator labels wrong")
    parser.add_argument("--review-below", type=float, default=REVIEW_BELOW)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    scenario = default_scenario()
    for key, value in vars(scenario).items():
        setattr(args, key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run_seeds(args, args.out, run_seed, summarise)
    print(summarise(results, args))


if __name__ == "__main__":
    main()
