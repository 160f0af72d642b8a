"""Does the loop pay? Labels each query strategy needs, against random labelling, to reach
80% of the minority-recall gain of labelling the whole pool.

Per seed: the long-tailed Fashion-MNIST scenario (train ratio 100, a pool as long-tailed
as train: 21,090 images with 90 of the minority classes, a balanced test set of 5000), and
the loop's learner as the product runs it on a CPU: the pretrained Lite0 backbone frozen
at 64 px, embeddings from the trainer's cache (trainer.embeddings), the linear head fit
with logit adjustment and the champion's prior kept (trainer.head; L2 chosen on val/ for
the champion, then kept). Each strategy, in rounds of --budget labels:
- score the unlabeled pool with the current head;
- keep what the serving capture policy keeps (calibrated confidence < 0.7, or a predicted
  minority class) and rank it (labeling.strategies); random picks from the whole pool, as
  labelling without a model would;
- label them with the true labels and re-fit the head on train + all labels so far;
- score the test set (macro-F1, minority recall).
Rounds of --budget labels (5x that after 1000 labels); random runs in doubling steps after
300 labels until it reaches the target (or has labelled the whole pool).

Reported per strategy, over seeds: labels to the target (interpolated between rounds) and
the ratio to random's, minority images found, and macro-F1 / minority recall after 300
labels with their bootstrap 95% interval on the test set.

    python -m bench.active_learning --out bench/results/active-learning-cpu --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import mean_std, run_seeds
from visionloop.core.bootstrap import intervals
from visionloop.core.fsutil import atomic_write_text
from visionloop.core.manifest import Preprocessing
from visionloop.core.scenario import class_names, read_pool
from visionloop.labeling.strategies import rank
from visionloop.serving.capture import CAPTURE_BELOW
from visionloop.trainer import fashion_mnist
from visionloop.trainer.embeddings import EmbeddingCache, backbone_fingerprint, embed_files
from visionloop.trainer.head import fit_head, fit_linear_head
from visionloop.trainer.models import LITE0, build_model

log = logging.getLogger("bench.active_learning")
# <strategy>_all: the minority share at 1.0 instead of push's default 0.5
STRATEGIES = ("random", "least_confidence", "margin", "entropy", "class_balanced",
              "class_balanced_all", "minority_boundary", "minority_boundary_all")
GAIN_FRACTION = 0.8
REPORT_AT = 300
LONG_RUN = 1000


def default_scenario() -> argparse.Namespace:
    """The scenario options main() defaults to, for the benches that reuse its data."""
    return argparse.Namespace(minority=["coat", "sandal", "bag"], imbalance_ratio=100.0,
                              pool_per_class=3000, source_dir=fashion_mnist.DEBIAN_DIR)


def build_data(root: Path, args: argparse.Namespace, seed: int) -> Path:
    out = root / f"data-seed{seed}"
    if not (out / "scenario.json").exists():
        fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(
            out=out, minority=tuple(args.minority), imbalance_ratio=args.imbalance_ratio,
            pool_per_class=args.pool_per_class, seed=seed, source_dir=args.source_dir))
    return out


def embeddings(data: Path, cache_root: Path, image_size: int) -> dict[str, tuple]:
    """(embeddings, labels) of train/, val/, test/ and the pool, through the product's cache."""
    built = build_model(LITE0, 2, "DEFAULT")
    pre = Preprocessing(image_size, image_size, built.mean, built.std)
    cache = EmbeddingCache(cache_root, backbone_fingerprint(built.model, built.head_prefix,
                                                            LITE0, pre))
    classes = class_names(data)
    splits = {split: [(p, i) for i, c in enumerate(classes)
                      for p in sorted((data / split / c).iterdir())]
              for split in ("train", "val", "test")}
    splits["pool"] = [(p, classes.index(label)) for p, label in read_pool(data)]
    try:
        return {split: (embed_files(built.model, built.head_prefix, pre, [p for p, _ in items],
                                    cache, torch.device("cpu")),
                        np.array([y for _, y in items])) for split, items in splits.items()}
    finally:
        cache.close()


class Learner:
    """The product's head learner on fixed embeddings: standardised by train/, L2 chosen on
    val/ for the champion, the champion's prior and L2 kept for every re-fit. (A product
    retrain may move to a weaker L2, trainer.train.head_strengths; this bench's figures
    were measured before that rule and keep the champion's.)"""

    def __init__(self, data: dict[str, tuple], classes: tuple[str, ...], minority: list[int]):
        self.classes, self.minority = classes, minority
        train_x, self.train_y = data["train"]
        self.mean, self.scale = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
        self.x = {k: ((v[0] - self.mean) / self.scale).astype(np.float32) for k, v in data.items()}
        self.y = {k: v[1] for k, v in data.items()}
        self.prior = np.bincount(self.train_y, minlength=len(classes)).astype(np.float64)
        champion = fit_head(data["train"], data["val"], classes, self.prior)
        self.l2 = champion.l2
        self.champion = fit_linear_head(self.x["train"], self.train_y, self.prior, l2=self.l2)

    def refit(self, labelled: np.ndarray, start: tuple) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([self.x["train"], self.x["pool"][labelled]])
        y = np.concatenate([self.train_y, self.y["pool"][labelled]])
        return fit_linear_head(x, y, self.prior, l2=self.l2, init=start)

    def probabilities(self, head: tuple, rows: np.ndarray) -> np.ndarray:
        logits = self.x["pool"][rows] @ head[0].T + head[1]
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def score(self, head: tuple) -> dict:
        predicted = (self.x["test"] @ head[0].T + head[1]).argmax(axis=1)
        found = intervals(self.y["test"], predicted, len(self.classes), self.minority)
        return {k: v.to_dict() for k, v in found.items()}


def select(learner: Learner, strategy: str, head: tuple, unlabelled: np.ndarray, budget: int,
           rng: np.random.Generator) -> np.ndarray:
    if strategy == "random":
        return rng.choice(unlabelled, min(budget, len(unlabelled)), replace=False)
    probs = learner.probabilities(head, unlabelled)
    captured = (probs.max(axis=1) < CAPTURE_BELOW) | np.isin(probs.argmax(axis=1),
                                                            learner.minority)
    rows = np.flatnonzero(captured)
    share = 1.0 if strategy.endswith("_all") else 0.5
    order = rank(probs[rows], strategy.removesuffix("_all"), budget=budget,
                 minority=learner.minority, minority_share=share)
    return unlabelled[rows[order[:budget]]]


def step_size(strategy: str, spent: int, budget: int) -> int:
    """Rounds of `budget` labels; random doubles after REPORT_AT (it needs thousands), the
    query strategies take 5 x budget a round after LONG_RUN labels."""
    if spent < REPORT_AT:
        return budget
    if strategy == "random":
        return max(budget, spent)
    return budget if spent < LONG_RUN else 5 * budget


def run_strategy(learner: Learner, strategy: str, args: argparse.Namespace, target: float,
                 seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    labelled = np.zeros(len(learner.y["pool"]), dtype=bool)
    head, curve = learner.champion, []
    while labelled.sum() < len(labelled):
        spent = int(labelled.sum())
        step = step_size(strategy, spent, args.budget)
        if spent < REPORT_AT < spent + step:
            step = REPORT_AT - spent  # a point exactly at the reported budget
        picks = select(learner, strategy, head, np.flatnonzero(~labelled), step, rng)
        labelled[picks] = True
        head = learner.refit(labelled, head)
        scores = learner.score(head)
        found = int(np.isin(learner.y["pool"][labelled], learner.minority).sum())
        curve.append({"labels": int(labelled.sum()), "minority_found": found, **scores})
        log.info("seed %d %s: %d labels, %d minority, macro-F1 %.4f, minority recall %.4f",
                 seed, strategy, labelled.sum(), found, scores["macro_f1"]["estimate"],
                 scores["minority_recall"]["estimate"])
        reached = scores["minority_recall"]["estimate"] >= target
        if (reached and labelled.sum() >= REPORT_AT) or (
                strategy != "random" and labelled.sum() >= args.max_labels):
            break
    return curve


def labels_to(curve: list[dict], target: float, start: float) -> float | None:
    """Labels at which minority recall first reaches the target, linear between rounds."""
    previous = (0, start)
    for point in curve:
        recall = point["minority_recall"]["estimate"]
        if recall >= target:
            (l0, r0), l1 = previous, point["labels"]
            return l0 + (l1 - l0) * (target - r0) / (recall - r0) if recall > r0 else l1
        previous = (point["labels"], recall)
    return None


def random_draws(learner: Learner, seed: int, draws: int) -> list[dict]:
    """Minority recall after REPORT_AT random labels, for `draws` independent draws. Random
    selection does not look at the model, so one re-fit on the drawn labels gives the model
    the rounds would end with (the head's L2-regularised fit has one optimum)."""
    out = []
    for draw in range(draws):
        rng = np.random.default_rng((seed, draw))
        labelled = np.zeros(len(learner.y["pool"]), dtype=bool)
        labelled[rng.choice(len(labelled), REPORT_AT, replace=False)] = True
        scores = learner.score(learner.refit(labelled, learner.champion))
        found = int(np.isin(learner.y["pool"][labelled], learner.minority).sum())
        out.append({"draw": draw, "minority_found": found, **scores})
        log.info("seed %d random draw %d: %d minority, minority recall %.4f", seed, draw, found,
                 scores["minority_recall"]["estimate"])
    return out


def seed_learner(args: argparse.Namespace, seed: int) -> Learner:
    """The seed's scenario, embedded through the cache, and its champion head."""
    data = build_data(args.work_dir, args, seed)
    classes = class_names(data)
    minority = [classes.index(c) for c in args.minority]
    return Learner(embeddings(data, args.work_dir / "embeddings", args.image_size),
                   classes, minority)


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    started = time.monotonic()
    learner = seed_learner(args, seed)
    champion = learner.score(learner.champion)
    full = learner.score(learner.refit(np.ones(len(learner.y["pool"]), dtype=bool),
                                       learner.champion))
    start = champion["minority_recall"]["estimate"]
    target = start + GAIN_FRACTION * (full["minority_recall"]["estimate"] - start)
    log.info("seed %d: l2 %g, champion %s, whole pool %s, target minority recall %.4f",
             seed, learner.l2, champion, full, target)
    result = {"seed": seed, "l2": learner.l2, "champion": champion, "full_pool": full,
              "target_minority_recall": target, "pool": len(learner.y["pool"]),
              "pool_minority": int(np.isin(learner.y["pool"], learner.minority).sum()),
              "curves": {}}
    for strategy in args.strategies:
        curve = run_strategy(learner, strategy, args, target, seed)
        result["curves"][strategy] = {"curve": curve,
                                      "labels_to_target": labels_to(curve, target, start)}
    if args.random_draws:
        result["random_draws"] = random_draws(learner, seed, args.random_draws)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _ratios_text(ratios: list[float], seeds: int) -> str:
    """Per-seed ratios and, when every seed reached the target, their geometric mean: the
    ratio a user should expect, since the per-seed ratios differ by a factor of ten."""
    if not ratios:
        return "-"
    text = ", ".join(f"{x:.1f}" for x in ratios)
    if len(ratios) == seeds > 1:
        text += f" (geometric mean {statistics.geometric_mean(ratios):.1f})"
    return text


def _at(curve: list[dict], labels: int) -> dict | None:
    return next((p for p in curve if p["labels"] == labels), None)


def _non_default_flags(args: argparse.Namespace) -> str:
    flags = ""
    if list(args.strategies) != list(STRATEGIES):
        flags += f" --strategies {','.join(args.strategies)}"
    if args.max_labels != 3000:
        flags += f" --max-labels {args.max_labels}"
    if getattr(args, "random_draws", 0):
        flags += f" --random-draws {args.random_draws}"
    return flags


def summarise(results: list[dict], args: argparse.Namespace) -> str:
    seeds = [r["seed"] for r in results]
    lines = ["# Labels to 80% of the whole-pool minority-recall gain, per strategy", "",
             f"`python -m bench.active_learning --seeds {','.join(map(str, seeds))} "
             f"--budget {args.budget}{_non_default_flags(args)}` on this machine (2 CPU "
             "cores). Learner: frozen "
             f"pretrained Lite0 at {args.image_size} px, linear head with logit adjustment, "
             "the champion's prior kept. Pool as long-tailed as train "
             f"({results[0]['pool']} images, {results[0]['pool_minority']} minority); test: "
             "5000 balanced. Mean ± std over seeds; [a, b] is the test-set bootstrap 95% "
             "interval (seed 0).", "",
             "| seed | l2 | champion macro-F1 / minority recall | whole pool labelled | "
             "target minority recall |", "|---|---|---|---|---|"]
    for r in results:
        c, f = r["champion"], r["full_pool"]
        lines.append(f"| {r['seed']} | {r['l2']:g} | {c['macro_f1']['estimate']:.3f} / "
                     f"{c['minority_recall']['estimate']:.3f} | {f['macro_f1']['estimate']:.3f}"
                     f" / {f['minority_recall']['estimate']:.3f} | "
                     f"{r['target_minority_recall']:.3f} |")
    lines += ["", f"| strategy | labels to target (per seed) | x fewer than random (per seed) "
                  f"| minority found in {REPORT_AT} | macro-F1 at {REPORT_AT} | minority recall "
                  f"at {REPORT_AT} | seed 0 minority recall at {REPORT_AT} [95% CI] |",
              "|---|---|---|---|---|---|---|"]
    for strategy in args.strategies:
        needed, ratios, found, f1, recall = [], [], [], [], []
        for r in results:
            entry = r["curves"][strategy]
            needed.append(entry["labels_to_target"])
            base = r["curves"]["random"]["labels_to_target"] if "random" in r["curves"] else None
            if base and entry["labels_to_target"]:
                ratios.append(base / entry["labels_to_target"])
            point = _at(entry["curve"], REPORT_AT)
            if point:
                found.append(point["minority_found"])
                f1.append(point["macro_f1"]["estimate"])
                recall.append(point["minority_recall"]["estimate"])
        first = _at(results[0]["curves"][strategy]["curve"], REPORT_AT)
        ci = first["minority_recall"] if first else None
        needed_text = ", ".join(f"{n:.0f}" if n else f">{args.max_labels}" for n in needed)
        lines.append(
            f"| {strategy} | {needed_text} "
            f"| {_ratios_text(ratios, len(results))} | {mean_std(found)} | "
            f"{mean_std(f1)} | {mean_std(recall)} | "
            + (f"{ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else "-")
            + " |")
    if "random" in args.strategies:
        lines += area_table(results, args.strategies)
    if any("random_draws" in r for r in results):
        lines += draws_table(results)
    return "\n".join(lines) + "\n"


def recall_at(curve: list[dict], start: float, labels: np.ndarray) -> np.ndarray:
    """Minority recall along a label grid: linear between rounds, the champion at 0 labels,
    the last round's value held after it (a strategy stops once it reached the target)."""
    xs = [0] + [p["labels"] for p in curve]
    ys = [start] + [p["minority_recall"]["estimate"] for p in curve]
    return np.interp(labels, xs, ys)


def normalised_area(result: dict, strategy: str, up_to: int) -> float:
    """Mean over 0..up_to labels of (strategy - random) minority recall, as a share of the
    gain that labelling the whole pool gives: 0 = no better than random on average, 1 =
    the whole pool's gain from the first label on. Unlike labels-to-target it does not hang
    on where a flat curve first crosses a line."""
    grid = np.linspace(0, up_to, 301)
    start = result["champion"]["minority_recall"]["estimate"]
    gain = result["full_pool"]["minority_recall"]["estimate"] - start
    diff = (recall_at(result["curves"][strategy]["curve"], start, grid)
            - recall_at(result["curves"]["random"]["curve"], start, grid))
    return float(diff.mean() / gain)


def area_table(results: list[dict], strategies: list[str]) -> list[str]:
    """The normalised area per seed and its mean with a paired bootstrap over seeds (the
    strategy and random resampled together, seed by seed)."""
    lines = ["", "Normalised area between each strategy's minority-recall curve and random's "
             "(mean gap over the label range as a share of the whole pool's gain; bootstrap "
             "95% over seeds, 2000 resamples; with 3 seeds the interval is coarse):", "",
             "| strategy | 0-300 labels per seed | mean [95%] | 0-3000 labels per seed | "
             "mean [95%] |", "|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(results), (2000, len(results)))
    for strategy in strategies:
        if strategy == "random":
            continue
        cells = []
        for up_to in (REPORT_AT, 3000):
            per_seed = np.array([normalised_area(r, strategy, up_to) for r in results])
            low, high = np.percentile(per_seed[picks].mean(axis=1), [2.5, 97.5])
            cells += [", ".join(f"{a:+.2f}" for a in per_seed),
                      f"{per_seed.mean():+.2f} [{low:+.2f}, {high:+.2f}]"]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines


def draws_table(results: list[dict]) -> list[str]:
    """How far one random draw of REPORT_AT labels moves: what a single-draw baseline (the
    demo's) can land on, against class_balanced's figure on the same seed."""
    lines = ["", f"Random labelling is a draw: {len(results[0]['random_draws'])} independent "
             f"draws of {REPORT_AT} random pool labels per seed (`--random-draws`).", "",
             f"| seed | minority found (min-max) | minority recall at {REPORT_AT}: mean ± std "
             "(min-max) | class_balanced at 300 | class_balanced - draws' mean |",
             "|---|---|---|---|---|"]
    for r in results:
        recall = [d["minority_recall"]["estimate"] for d in r.get("random_draws", [])]
        found = [d["minority_found"] for d in r.get("random_draws", [])]
        if not recall:
            continue
        point = _at(r["curves"].get("class_balanced", {}).get("curve", []), REPORT_AT)
        cb = point["minority_recall"]["estimate"] if point else None
        mean = statistics.mean(recall)
        lines.append(f"| {r['seed']} | {min(found)}-{max(found)} | {mean:.3f} ± "
                     f"{statistics.pstdev(recall):.3f} ({min(recall):.3f}-{max(recall):.3f}) | "
                     + (f"{cb:.3f} | {cb - mean:+.3f} |" if cb is not None else "- | - |"))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/active-learning-cpu"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-al"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--budget", type=int, default=50, help="labels per round")
    parser.add_argument("--max-labels", type=int, default=3000,
                        help="a query strategy stops here if it has not reached the target")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--imbalance-ratio", type=float, default=100.0)
    parser.add_argument("--pool-per-class", type=int, default=3000)
    parser.add_argument("--minority", default="coat,sandal,bag")
    parser.add_argument("--source-dir", type=Path, default=fashion_mnist.DEBIAN_DIR)
    parser.add_argument("--random-draws", type=int, default=0,
                        help=f"also: N independent draws of {REPORT_AT} random labels per seed")
    parser.add_argument("--summarise", type=Path, metavar="RESULTS_JSON",
                        help="only rewrite README.md beside an earlier run's results.json")
    args = parser.parse_args()
    args.minority = args.minority.split(",")
    args.strategies = args.strategies.split(",")
    if args.summarise:
        results = json.loads(args.summarise.read_text())
        args.strategies = [s for s in STRATEGIES if s in results[0]["curves"]]
        args.random_draws = len(results[0].get("random_draws", []))
        atomic_write_text(args.summarise.parent / "README.md", summarise(results, args))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = run_seeds(args, args.out, run_seed, summarise)
    print(json.dumps([{s: r["curves"][s]["labels_to_target"] for s in r["curves"]}
                      for r in results], indent=2))


if __name__ == "__main__":
    main()
