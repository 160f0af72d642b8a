"""Which learner should `visionloop train` default to? The trainer's default, the loop's head
learner and a small CNN trained from scratch, on the same long-tailed data, same run.

Per seed (the scenarios of bench.active_learning: Fashion-MNIST, ratio 100, three minority
classes, balanced val/ and test/):
- finetune: `visionloop train --learner finetune --image-size 32` (Lite0 fine-tuned, 8
  epochs, logit adjustment: the trainer's default until this bench);
- head: the loop's learner and now the trainer's default (Lite0 frozen at 64 px, linear
  head on cached embeddings);
- small_cnn: trainer.models' 66k-parameter CNN from scratch at 28 px, logit adjustment,
  15 epochs, light augmentation (the baseline a 28 px data set suggests).
Test macro-F1 and minority recall from each published version's manifest (the trainer's
own test evaluation), mean ± std over seeds, and the wall time of each training run.

    python -m bench.learners --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from bench.active_learning import build_data, default_scenario
from core.fsutil import atomic_write_json, atomic_write_text
from core.manifest import ModelManifest
from trainer.config import TrainConfig
from trainer.train import run_training

LEARNERS = {
    # the trainer's default until this bench (since then the head learner at 64 px)
    "finetune": {"learner": "finetune", "image_size": 32},
    "head": {"learner": "head", "image_size": 64},
    "small_cnn": {"arch": "small_cnn", "weights": "none", "image_size": 28, "epochs": 15,
                  "freeze_epochs": 0, "lr": 3e-3},
}


def train(data: Path, root: Path, name: str, seed: int, options: dict) -> dict:
    started = time.monotonic()
    version = run_training(TrainConfig(
        data=str(data), out=str(root / "store"), name=f"{name}-{seed}", seed=seed,
        embedding_cache=str(root.parent / "embeddings"), show_progress=False,
        work_dir=str(root / "work" / f"{name}-{seed}"), **options))
    metrics = ModelManifest.load(version).metrics
    return {"macro_f1": metrics["test"]["macro_f1"], "minority_recall": metrics["minority_recall"],
            "seconds": round(time.monotonic() - started, 1)}


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-al"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/learners-cpu"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    scenario = default_scenario()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    # runs already in results.json are kept: a long run can be continued or extended
    results: dict[str, list[dict]] = json.loads(saved.read_text()) if saved.exists() else {}
    for name in args.learners.split(","):
        results.setdefault(name, [])
    for seed in seeds:
        data = build_data(args.work_dir, scenario, seed)
        for name in args.learners.split(","):
            if any(r["seed"] == seed for r in results[name]):
                continue
            results[name].append({"seed": seed, **train(data, args.work_dir / "learners", name,
                                                         seed, LEARNERS[name])})
            atomic_write_json(args.out / "results.json", results)
    lines = ["# Learners on the same long-tailed data", "",
             "`python -m bench.learners` on this machine (2 CPU cores; seeds and learners as "
             "listed; runs in results.json are kept and extended); "
             "test/ is balanced (500 per class); mean ± std over seeds.", "",
             "| learner | macro-F1 | minority recall | per seed (macro-F1 / minority recall) "
             "| seconds per run |", "|---|---|---|---|---|"]
    for name, runs in results.items():
        if not runs:
            continue
        per_seed = ", ".join(f"{r['macro_f1']:.3f} / {r['minority_recall']:.3f}" for r in runs)
        lines.append(f"| {name} | {_mean_std([r['macro_f1'] for r in runs])} | "
                     f"{_mean_std([r['minority_recall'] for r in runs])} | {per_seed} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    atomic_write_text(args.out / "README.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
