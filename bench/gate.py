"""How often does the retrain gate decide wrongly? Repeated noise-only retrains on the same
data, judged by the gate on val/ and checked against the 5000-image test split.

The champion is the product's head learner on the long-tailed Fashion-MNIST scenario (seed
0 of bench.active_learning, same embeddings). Each challenger re-fits the head on a
bootstrap resample of the same training set (plus, for half of them, the pool's minority
images: a challenger that should be better), so the challengers differ by training noise
and some by real gains. The gate (visionloop.gate, the retrain's margins) sees only val/;
the "truth" is the paired difference on test/:
- truly worse: test delta of macro-F1 below -margin or of minority recall below -margin;
- truly better: test delta >= 0 on both.
Reported: promoted among the truly worse (false promotion), kept out among the truly
better (false rejection), and the counts.

--kind random-labels: each challenger is the champion's training set plus 300 pool images
drawn at random (what the demo's random branch trains on): near-equal challengers, the hard
case for a non-inferiority margin.

    python -m bench.gate --challengers 60
    python -m bench.gate --challengers 60 --kind random-labels
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from bench.active_learning import Learner, build_data, default_scenario, embeddings
from visionloop.configs import RetrainConfig
from visionloop.core.bootstrap import paired_difference
from visionloop.core.fsutil import atomic_write_text
from visionloop.core.scenario import class_names
from visionloop.gate import GateRule, decide
from visionloop.trainer.head import fit_linear_head

log = logging.getLogger("bench.gate")


def predictions(learner: Learner, head: tuple, split: str) -> np.ndarray:
    return (learner.x[split] @ head[0].T + head[1]).argmax(axis=1)


KINDS = {"resample": "head re-fit on a bootstrap resample of the training set; every second "
                     "one also with the pool's 90 minority images",
         "random-labels": "head re-fit on the training set plus 300 pool images drawn at "
                          "random, a new draw each"}
RANDOM_LABELS = 300


def challenger(learner: Learner, rng: np.random.Generator, with_minority: bool,
               kind: str = "resample") -> tuple:
    if kind == "random-labels":
        picks = rng.choice(len(learner.y["pool"]), RANDOM_LABELS, replace=False)
        x = np.concatenate([learner.x["train"], learner.x["pool"][picks]])
        y = np.concatenate([learner.train_y, learner.y["pool"][picks]])
        return fit_linear_head(x, y, learner.prior, l2=learner.l2, init=learner.champion)
    rows = rng.integers(0, len(learner.train_y), len(learner.train_y))
    x, y = learner.x["train"][rows], learner.train_y[rows]
    if with_minority:
        found = np.isin(learner.y["pool"], learner.minority)
        x = np.concatenate([x, learner.x["pool"][found]])
        y = np.concatenate([y, learner.y["pool"][found]])
    return fit_linear_head(x, y, learner.prior, l2=learner.l2, init=learner.champion)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--challengers", type=int, default=60)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-al"))
    parser.add_argument("--kind", choices=tuple(KINDS), default="resample")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/gate-cpu.md (resample), "
                             "gate-cpu-random-labels.md")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path("bench/results/" + ("gate-cpu.md" if args.kind == "resample"
                                            else f"gate-cpu-{args.kind}.md"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    scenario = default_scenario()
    data = build_data(args.work_dir, scenario, 0)
    classes = class_names(data)
    minority = [classes.index(c) for c in scenario.minority]
    learner = Learner(embeddings(data, args.work_dir / "embeddings", 64), classes, minority)
    defaults = RetrainConfig()
    rule = GateRule(defaults.max_macro_f1_drop, defaults.max_minority_recall_drop)
    margin = {"macro_f1": rule.max_macro_f1_drop,
              "minority_recall": rule.max_minority_recall_drop}
    champion = {s: predictions(learner, learner.champion, s) for s in ("val", "test")}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.challengers):
        head = challenger(learner, rng, with_minority=i % 2 == 1, kind=args.kind)
        pred = {s: predictions(learner, head, s) for s in ("val", "test")}
        promoted, _, _ = decide(learner.y["val"], champion["val"], pred["val"], len(classes),
                                minority, rule, seed=i)
        truth = paired_difference(learner.y["test"], champion["test"], pred["test"],
                                  len(classes), minority, resamples=10, seed=i)
        worse = any(truth[k].estimate < -margin[k] for k in margin)
        better = all(truth[k].estimate >= 0 for k in margin)
        rows.append((i % 2 == 1 and args.kind == "resample", promoted, worse, better,
                     truth["macro_f1"].estimate, truth["minority_recall"].estimate))
        log.info("challenger %d: promoted %s, test delta macro-F1 %+.4f, minority recall "
                 "%+.4f", i, promoted, rows[-1][4], rows[-1][5])
    worse = [r for r in rows if r[2]]
    better = [r for r in rows if r[3]]
    lines = ["# The gate's wrong decisions over noise-only retrains", "",
             f"`python -m bench.gate --challengers {args.challengers} --kind {args.kind}`: "
             f"{len(rows)} challengers ({KINDS[args.kind]}), gate on val/ (1000 images), truth "
             f"on test/ (5000). Rule: {rule.describe()}.", "",
             "| | challengers | promoted | kept out |", "|---|---|---|---|",
             f"| truly worse (test delta below -margin) | {len(worse)} | "
             f"{sum(r[1] for r in worse)} | {sum(not r[1] for r in worse)} |",
             f"| truly better (test delta >= 0 on both) | {len(better)} | "
             f"{sum(r[1] for r in better)} | {sum(not r[1] for r in better)} |",
             f"| neither (within the margin, below 0 on one) | "
             f"{len(rows) - len(worse) - len(better)} | "
             f"{sum(r[1] for r in rows if not r[2] and not r[3])} | "
             f"{sum(not r[1] for r in rows if not r[2] and not r[3])} |",
             f"| all | {len(rows)} | {sum(r[1] for r in rows)} | "
             f"{sum(not r[1] for r in rows)} |", "",
             f"False promotion rate: {sum(r[1] for r in worse)}/{len(worse)}; false rejection "
             f"rate: {sum(not r[1] for r in better)}/{len(better)}.", "",
             "| challenger | + pool minority (resample) | promoted | test delta macro-F1 | "
             "test delta minority recall |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {'yes' if r[0] else 'no'} | {'yes' if r[1] else 'no'} | {r[4]:+.4f} | "
              f"{r[5]:+.4f} |" for i, r in enumerate(rows)]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
