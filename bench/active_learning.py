"""Does the loop pay? Query strategies against random labelling on long-tailed Fashion-MNIST.

Per seed: a long-tailed scenario whose unlabeled pool is as long-tailed as train (a
production-like stream) and a champion trained with the trainer's defaults. Then, for each
strategy, `rounds` rounds of:
- predict the unlabeled pool with the served path (TorchScript, handler functions);
- keep what the serving capture policy keeps (calibrated confidence < 0.7, and every
  prediction of a minority class);
- pick `budget` of them (labeling.strategies); random picks from the whole stream, as
  labelling without a model would;
- label them with the true labels, fine-tune from the previous model on train + all labels
  so far (the trainer: warm start, its rebalanced default), evaluate on the test set.
One branch repeats class-balanced selection with a plain cross-entropy learner. Training
noise: the champion trained from several init seeds on the same data.

Reported, mean ± std over seeds:
- minority images found per label, as a multiple of random's;
- labels needed to reach the random branch's final macro-F1 and minority recall, as a
  multiple of fewer than random (random needs its whole budget by construction).

    python -m bench.active_learning --out reports/bench-al [--seeds 0,1,2 --rounds 4 --budget 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from core.fsutil import atomic_write_json, atomic_write_text
from core.manifest import ModelManifest
from labeling.strategies import rank
from serving.capture import CapturePolicy
from serving.offline import InProcessModel
from trainer import fashion_mnist
from trainer.config import TrainConfig
from trainer.train import run_training

log = logging.getLogger("bench.active_learning")
CAPTURE_BELOW = 0.7


def build_data(root: Path, args: argparse.Namespace, seed: int) -> Path:
    out = root / f"data-seed{seed}"
    if not (out / "scenario.json").exists():
        fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(
            out=out, minority=tuple(args.minority), imbalance_ratio=args.imbalance_ratio,
            pool_per_class=args.pool_per_class, seed=seed, source_dir=args.source_dir))
    return out


def train(args: argparse.Namespace, data: Path, store: Path, name: str, seed: int,
          parent: str | None = None, labels: Path | None = None, epochs: int | None = None,
          imbalance: str = "logit_adjust") -> Path:
    cfg = TrainConfig(
        data=str(data), out=str(store), name=name, parent=parent, seed=seed,
        extra_train=(str(labels / "images"),) if labels and (labels / "images").exists() else (),
        epochs=epochs or args.champion_epochs, freeze_epochs=0 if parent else 1,
        lr=args.retrain_lr if parent else TrainConfig.lr, image_size=args.image_size,
        imbalance=imbalance, minority=tuple(args.minority), num_workers=args.num_workers,
        show_progress=False, work_dir=str(store / "runs" / f"{name}-{seed}"))
    return run_training(cfg)


def metrics(version_dir: Path) -> dict:
    m = ModelManifest.load(version_dir).metrics
    return {"macro_f1": m["test"]["macro_f1"], "minority_recall": m["minority_recall"]}


def pool(data: Path) -> tuple[list[Path], list[str]]:
    entries = fashion_mnist.read_pool(data)
    return [path for path, _ in entries], [label for _, label in entries]


def select(strategy: str, model: InProcessModel, files: list[Path], unlabeled: list[int],
           budget: int, minority: list[str], rng: random.Random) -> list[int]:
    if strategy == "random":
        return rng.sample(unlabeled, min(budget, len(unlabeled)))
    replies = model.predict([files[i].read_bytes() for i in unlabeled], batch_size=512)
    policy = CapturePolicy(max_confidence=CAPTURE_BELOW, always_classes=tuple(minority))
    captured = [(i, r) for i, r in zip(unlabeled, replies, strict=True) if policy.wants(r)]
    probs = np.array([r.probabilities for _, r in captured])
    classes = model.manifest.classes
    order = rank(probs, strategy.removesuffix("+ce"), budget=budget,
                 minority=[classes.index(c) for c in minority])
    return [captured[j][0] for j in order[:budget]]


def run_branch(args, data: Path, store: Path, champion: Path, strategy: str, seed: int,
               gpu: int | None) -> list[dict]:
    files, truth = pool(data)
    name = strategy.replace("+", "-")
    shutil.copytree(champion, store / name / "v1")
    labels = store / f"labels-{name}"
    rng = random.Random(seed)
    unlabeled = list(range(len(files)))
    version_dir = store / name / "v1"
    rows = [{"round": 0, "labels": 0, "minority_labels": 0, **metrics(version_dir)}]
    minority = list(args.minority)
    chosen_labels: list[str] = []
    for round_ in range(1, args.rounds + 1):
        model = InProcessModel(version_dir, gpu_id=gpu)
        chosen = select(strategy, model, files, unlabeled, args.budget, minority, rng)
        taken = set(chosen)
        unlabeled = [i for i in unlabeled if i not in taken]
        for i in chosen:
            target = labels / "images" / truth[i] / files[i].name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(files[i], target)
            chosen_labels.append(truth[i])
        version_dir = train(args, data, store, name, seed, parent="latest", labels=labels,
                            epochs=args.retrain_epochs,
                            imbalance="none" if strategy.endswith("+ce") else "logit_adjust")
        rows.append({"round": round_, "labels": len(chosen_labels),
                     "minority_labels": sum(lbl in minority for lbl in chosen_labels),
                     **metrics(version_dir)})
        log.info("seed %d %s round %d: %s", seed, strategy, round_, rows[-1])
    return rows


def labels_to_reach(rows: list[dict], key: str, target: float) -> float | None:
    """Labels at which the curve first reaches target (linear between rounds); None: never."""
    if rows[0][key] >= target:
        return 0.0
    for before, after in zip(rows, rows[1:], strict=False):
        if after[key] >= target:
            gain = after[key] - before[key]
            return before["labels"] + (target - before[key]) / gain * (after["labels"]
                                                                       - before["labels"])
    return None


def pool_minority_share(settings: dict) -> float:
    """Random labelling's expected share of minority images: the pool's own share."""
    minority = len(settings["minority"])
    per_minority = settings["pool_per_class"] / settings["imbalance_ratio"]
    return minority * per_minority / ((10 - minority) * settings["pool_per_class"]
                                      + minority * per_minority)


def noise_std(noise: list[dict], key: str, default: float) -> float:
    values = [n[key] for n in noise]
    return statistics.stdev(values) if len(values) > 1 else default


def summarize(results: dict, noise: list[dict], settings: dict) -> tuple[dict, dict]:
    """Per strategy and seed: minority found per label / random's expected rate, and the
    labels needed to beat the champion by one training-noise std (macro-F1, minority recall)."""
    expected = pool_minority_share(settings)
    margins = {"macro_f1": noise_std(noise, "macro_f1", 0.02),
               "minority_recall": noise_std(noise, "minority_recall", 0.04)}
    found = list(next(iter(results.values())))
    strategies = ["random", *[s for s in found if s != "random"]] if "random" in found else found
    summary = {s: {"found_ratio": [], "labels_f1": [], "labels_recall": [],
                   "final_macro_f1": [], "final_minority_recall": []} for s in strategies}
    for by_strategy in results.values():
        for s, rows in by_strategy.items():
            out = summary[s]
            out["found_ratio"].append(rows[-1]["minority_labels"] / rows[-1]["labels"] / expected)
            out["final_macro_f1"].append(rows[-1]["macro_f1"])
            out["final_minority_recall"].append(rows[-1]["minority_recall"])
            for key, field in (("macro_f1", "labels_f1"), ("minority_recall", "labels_recall")):
                out[field].append(labels_to_reach(rows, key, rows[0][key] + margins[key]))
    return summary, {"expected_share": expected, **margins}


def fmt(values: list, digits: int = 2) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "not reached"
    text = f"{statistics.mean(known):.{digits}f}"
    text += f" ± {statistics.stdev(known):.{digits}f}" if len(known) > 1 else ""
    missing = len(values) - len(known)
    return text + (f" (not reached in {missing} of {len(values)} seeds)" if missing else "")


def markdown(results: dict, noise: list[dict], settings: dict, wall_s: float) -> str:
    summary, targets = summarize(results, noise, settings)
    budget = settings["rounds"] * settings["budget"]
    lines = [
        "# Active learning against random labelling (bench/active_learning.py)", "",
        f"Long-tailed Fashion-MNIST, ratio {settings['imbalance_ratio']:g}, minority "
        f"{', '.join(settings['minority'])}; pool {settings['pool_per_class']}/majority class, "
        f"as long-tailed as train (minority share {targets['expected_share']:.2%}); "
        f"{settings['rounds']} rounds x {settings['budget']} labels; champion "
        f"{settings['champion_epochs']} epochs, each round a warm-start fine-tune of "
        f"{settings['retrain_epochs']} epochs on train + labels; {settings['image_size']} px; "
        f"seeds {', '.join(sorted(map(str, results)))}; {settings.get('device', '')}; "
        f"wall {wall_s / 60:.1f} min.", "",
        "Minority found per label: share of minority images among the labels spent, divided by "
        "random labelling's expected share (the pool's). Labels to target: labels spent until "
        f"macro-F1 rose {targets['macro_f1']:.3f} / minority recall "
        f"{targets['minority_recall']:.3f} above the champion (one std of training noise), "
        f"within {budget} labels.", "",
        "| strategy | minority found per label (x random) | labels to macro-F1 target "
        "| labels to minority-recall target | final macro-F1 | final minority recall |",
        "|---|---|---|---|---|---|"]
    for s, r in summary.items():
        lines.append(f"| {s} | {fmt(r['found_ratio'], 1)} | {fmt(r['labels_f1'], 0)} | "
                     f"{fmt(r['labels_recall'], 0)} | {fmt(r['final_macro_f1'], 3)} | "
                     f"{fmt(r['final_minority_recall'], 3)} |")
    if noise:
        lines += ["", f"Training noise (champion from init seeds "
                      f"{[n['init_seed'] for n in noise]} on the same data): macro-F1 "
                      f"{fmt([n['macro_f1'] for n in noise], 3)}, minority recall "
                      f"{fmt([n['minority_recall'] for n in noise], 3)}."]
    lines += ["", "Per round (labels/minority labels: macro-F1, minority recall):", ""]
    for seed, by_strategy in results.items():
        for s, rows in by_strategy.items():
            cells = "; ".join(f"{r['labels']}/{r['minority_labels']}: {r['macro_f1']:.3f}, "
                              f"{r['minority_recall']:.3f}" for r in rows)
            lines.append(f"- seed {seed}, {s}: {cells}")
    return "\n".join(lines) + "\n"


def settings_of(args: argparse.Namespace) -> dict:
    return {"minority": list(args.minority), "pool_per_class": args.pool_per_class,
            "imbalance_ratio": args.imbalance_ratio, "rounds": args.rounds,
            "budget": args.budget, "champion_epochs": args.champion_epochs,
            "retrain_epochs": args.retrain_epochs, "image_size": args.image_size,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/bench-al"),
                        help="results.json and results.md")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scenarios and model stores (default: --out)")
    parser.add_argument("--merge", type=Path, nargs="*", default=None,
                        help="only merge these results.json files (e.g. one per seed) into "
                             "--out; the other flags must describe those runs")
    parser.add_argument("--device-name", help="with --merge: where the runs ran")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default="random,least_confidence,entropy,"
                                                "class_balanced,class_balanced+ce")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--pool-per-class", type=int, default=3000)
    parser.add_argument("--imbalance-ratio", type=float, default=100.0)
    parser.add_argument("--minority", default="coat,sandal,bag")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--champion-epochs", type=int, default=8)
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--retrain-lr", type=float, default=1e-3)
    parser.add_argument("--noise-inits", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--source-dir", type=Path, default=fashion_mnist.DEBIAN_DIR)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.minority = args.minority.split(",")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(args)
        return
    work = args.work_dir or args.out
    gpu = 0 if torch.cuda.is_available() else None
    started = time.monotonic()
    results: dict = {}
    noise: list[dict] = []
    for seed in args.seeds:
        data = build_data(work, args, seed)
        store = work / f"store-seed{seed}"
        shutil.rmtree(store, ignore_errors=True)
        champion = train(args, data, store, "champion", seed)
        if seed == args.seeds[0] and args.noise_inits > 1:
            noise.append({"init_seed": seed, **metrics(champion)})
            for init in range(1, args.noise_inits):
                noise.append({"init_seed": seed + init, **metrics(
                    train(args, data, store, f"noise{init}", seed + init))})
        results[seed] = {}
        for strategy in args.strategies.split(","):
            results[seed][strategy] = run_branch(args, data, store, champion, strategy, seed,
                                                 gpu)
            # after every branch: a run cut short still leaves what it measured
            atomic_write_json(args.out / "results.json",
                              {"results": results, "noise": noise, "settings": settings_of(args),
                               "wall_s": time.monotonic() - started})
        atomic_write_text(args.out / "results.md", markdown(
            results, noise, settings_of(args), time.monotonic() - started))
    print((args.out / "results.md").read_text())


def merge(args: argparse.Namespace) -> None:
    """One table from several runs (e.g. one seed per run, on a machine with a time limit)."""
    results, noise, wall, settings = {}, [], 0.0, settings_of(args)
    for path in args.merge:
        loaded = json.loads(path.read_text())
        results.update(loaded["results"])
        if len(loaded["noise"]) > 1:  # one init alone is no spread (and another data seed)
            noise += loaded["noise"]
        wall += loaded["wall_s"]
    if args.device_name:
        settings["device"] = args.device_name
    atomic_write_text(args.out / "results.md", markdown(results, noise, settings, wall))
    atomic_write_json(args.out / "results.json", {"results": results, "noise": noise,
                                                  "settings": settings, "wall_s": wall})
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
