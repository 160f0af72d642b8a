"""Share of minority classes among the images each query strategy would push, against random.

The long-tailed Fashion-MNIST pool (`make demo` builds it; as long-tailed as train) goes
through the served model path in-process; what the capture policy keeps goes into a real
capture store; then push's own selection (labeling.push: one capture per image, ranking,
near-duplicate walk) picks `budget` images per strategy. Only Label Studio's import is
left out. Random baselines at the same budget, over many draws: random images from the
whole pool (labelling without a model) and random among the captures.

    python -m bench.label_strategies [--version-dir model_store/fashion/v1] [--budgets 50,100,200]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from visionloop.core.capture_store import CaptureStore
from visionloop.core.model_store import ModelStore
from visionloop.core.scenario import read_pool
from visionloop.labeling.project import Project
from visionloop.labeling.push import PushOptions, choose, unlinked_candidates
from visionloop.labeling.strategies import rank
from visionloop.serving.capture import CapturePolicy, Capturer
from visionloop.serving.offline import InProcessModel

RANKED = ("least_confidence", "margin", "entropy", "class_balanced")


def load_pool(data: Path) -> tuple[list[bytes], list[str]]:
    pool = read_pool(data)
    return [path.read_bytes() for path, _ in pool], [label for _, label in pool]


def share(labels: list[str], minority: set[str]) -> float:
    return sum(label in minority for label in labels) / max(1, len(labels))


def run(args: argparse.Namespace) -> str:
    images, labels = load_pool(args.data)
    truth = {hashlib.sha256(d).hexdigest(): label for d, label in zip(images, labels,
                                                                        strict=True)}
    model = InProcessModel(args.version_dir)
    started = time.perf_counter()
    replies = model.predict(images)
    predict_s = time.perf_counter() - started
    minority = list(model.manifest.minority_classes)
    minority_set = set(minority)
    lines = [f"# Minority share of pushed images per query strategy ({args.version_dir})", "",
             f"Pool: {len(images)} images, {sum(lbl in minority_set for lbl in labels)} of "
             f"minority classes {minority} ({share(labels, minority_set):.2%}); predicted "
             f"in-process in {predict_s:.0f} s.",
             f"Capture policy: calibrated confidence < {args.capture_below}, and every "
             f"prediction of a minority class."]
    with tempfile.TemporaryDirectory() as tmp:
        capturer = Capturer(tmp, CapturePolicy(max_confidence=args.capture_below,
                                               always_classes=tuple(minority),
                                               per_minute=10**9))
        capturer.capture_batch([(d, f"pool-{i}", r) for i, (d, r) in
                                enumerate(zip(images, replies, strict=True))])
        store = CaptureStore(tmp)
        project = Project(0, "bench", model.manifest.classes, ())
        candidates, _ = unlinked_candidates(store, model.manifest.name, len(project.classes),
                                            project.classes)
        store.close()
        captured_minority = sum(truth[c.sha] in minority_set for c in candidates)
        lines += [f"Captured: {len(candidates)} images, {captured_minority} of them minority "
                  f"({captured_minority / max(1, len(candidates)):.2%}).", "",
                  "| budget | strategy | minority share | minority images | x random (pool) "
                  "| near-duplicates skipped |", "|---|---|---|---|---|---|"]
        probs = np.stack([c.probabilities for c in candidates])
        minority_idx = [project.classes.index(c) for c in minority]
        rng = np.random.default_rng(0)
        for budget in args.budgets:
            pool_draws = [share([labels[i] for i in rng.choice(len(labels), budget,
                                                                replace=False)], minority_set)
                          for _ in range(args.draws)]
            # random's expected share is the pool's share exactly; the draws show its spread
            baseline = share(labels, minority_set)
            drawn = statistics.mean(pool_draws)
            lines.append(f"| {budget} | random (pool, {args.draws} draws) | {drawn:.2%} "
                         f"± {statistics.stdev(pool_draws):.2%} | {drawn * budget:.1f} | "
                         f"{drawn / baseline:.1f} | - |")
            capture_draws = []
            for seed in range(args.draws):
                order = rank(probs, "random", budget=budget, seed=seed)
                chosen, _ = choose(candidates, order, Path(tmp), {}, PushOptions(budget=budget))
                capture_draws.append(share([truth[c.sha] for c in chosen], minority_set))
            mean = statistics.mean(capture_draws)
            lines.append(f"| {budget} | random (captures, {args.draws} draws) | {mean:.2%} ± "
                         f"{statistics.stdev(capture_draws):.2%} | {mean * budget:.1f} | "
                         f"{mean / baseline:.1f} | - |")
            for strategy in RANKED:
                order = rank(probs, strategy, budget=budget, minority=minority_idx,
                             minority_share=args.minority_share)
                chosen, twins = choose(candidates, order, Path(tmp), {},
                                       PushOptions(budget=budget))
                found = [truth[c.sha] for c in chosen]
                s = share(found, minority_set)
                lines.append(f"| {budget} | {strategy} | {s:.2%} | "
                             f"{sum(f in minority_set for f in found)} | {s / baseline:.1f} | "
                             f"{len(twins)} |")
    lines += ["", "x random: share / the pool's minority share (random sampling's expectation).",
              f"class_balanced keeps {args.minority_share:.0%} of the budget for the "
              "highest predicted minority-class probability mass."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version-dir", type=Path, default=None,
                        help="model version (default: latest of model_store/fashion)")
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist-lt"))
    parser.add_argument("--budgets", default="50,100,200")
    parser.add_argument("--capture-below", type=float, default=0.7)
    parser.add_argument("--minority-share", type=float, default=0.5)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("bench/results/label-strategies.md"))
    args = parser.parse_args()
    args.budgets = [int(b) for b in args.budgets.split(",")]
    if args.version_dir is None:
        store = ModelStore("model_store")
        args.version_dir = store.version_dir("fashion", store.resolve_version("fashion",
                                                                              "latest"))
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
