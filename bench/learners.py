"""Which learner, on which data? `--learner auto` on every scenario of bench.scenarios, with
every candidate trained (no budget), over seeds, on this machine.

Per scenario and seed, one `run_training(learner="auto")`: each candidate of
trainer.config.CANDIDATES is trained on train/, scored on val/ (what auto picks on) and on
test/ (reported only), and timed; the manifest records them all, with each candidate's
paired 95% bootstrap interval of (its test score - the pick's). Then the loop's retrain of
the pick (its backbone kept, the head re-fit on cached embeddings) is timed once.

Reported per scenario: each candidate's test macro-F1 and minority recall (mean ± std over
seeds) and seconds; auto's pick per seed and its scores; how many seeds some candidate beat
the pick beyond the noise (its paired interval's low end above 0); the pick's minority
recall against the small CNN's.

    python -m bench.learners --seeds 0,1,2 [--scenarios a,b] [--candidates a,b]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

from bench.report import mean_std
from bench.scenarios import SCENARIOS, scenario_data
from visionloop.core.fsutil import atomic_write_json, atomic_write_text
from visionloop.core.manifest import ModelManifest
from visionloop.trainer.config import CANDIDATES, TrainConfig
from visionloop.trainer.train import run_training


def run_auto(data: Path, root: Path, name: str, seed: int, candidates: tuple[str, ...]) -> dict:
    common = dict(data=str(data), out=str(root / "store"), name=name, seed=seed,
                  embedding_cache=str(root.parent / "embeddings"), show_progress=False)
    started = time.monotonic()
    version = run_training(TrainConfig(learner="auto", candidates=candidates, budget_s=1e9,
                                       work_dir=str(root / "work" / name), **common))
    seconds = time.monotonic() - started
    manifest = ModelManifest.load(version)
    started = time.monotonic()
    run_training(TrainConfig(learner="head", parent=manifest.version,
                             work_dir=str(root / "work" / f"{name}-retrain"), **common))
    return {"seed": seed, "auto_seconds": round(seconds, 1),
            "retrain_seconds": round(time.monotonic() - started, 1),
            "selection": manifest.metrics["selection"]}


def pooled_difference(rows: list[dict]) -> str:
    """The mean over seeds of (candidate - pick) test macro-F1, with a 95% interval pooled
    from each seed's paired bootstrap interval (normal approximation: the seeds' test sets
    are independent draws, so their variances add)."""
    deltas = [row["test_minus_picked"]["macro_f1"] for row in rows]
    mean = statistics.mean(d["estimate"] for d in deltas)
    half = 1.96 * math.sqrt(sum(((d["high"] - d["low"]) / 3.92) ** 2 for d in deltas)) / len(deltas)
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


def scenario_lines(name: str, runs: list[dict]) -> list[str]:
    lines = [f"### {name}: {SCENARIOS[name].summary}", "",
             "| learner | test macro-F1 | test minority recall | per seed (F1 / recall) | "
             "seconds | seeds it beat the pick beyond the noise (F1) | minus the pick, "
             "mean over seeds (F1) |",
             "|---|---|---|---|---|---|---|"]
    names = list(runs[0]["selection"]["candidates"])
    for candidate in names:
        rows = [r["selection"]["candidates"][candidate] for r in runs]
        if any("skipped" in row for row in rows):
            continue
        beat = sum(row["test_minus_picked"]["macro_f1"]["low"] > 0 for row in rows)
        lines.append(
            f"| {candidate} | {mean_std([r['test_macro_f1'] for r in rows])} | "
            f"{mean_std([r['test_minority_recall'] for r in rows])} | "
            + ", ".join(f"{r['test_macro_f1']:.3f} / {r['test_minority_recall']:.3f}"
                        for r in rows)
            + f" | {statistics.mean(r['seconds'] for r in rows):.0f} | {beat} of {len(rows)} | "
            f"{pooled_difference(rows)} |")
    picks = [r["selection"]["candidates"][r["selection"]["picked"]] for r in runs]
    lines.append(
        f"| **auto** (picked {', '.join(r['selection']['picked'] for r in runs)}) | "
        f"{mean_std([p['test_macro_f1'] for p in picks])} | "
        f"{mean_std([p['test_minority_recall'] for p in picks])} | "
        + ", ".join(f"{p['test_macro_f1']:.3f} / {p['test_minority_recall']:.3f}" for p in picks)
        + f" | {statistics.mean(r['auto_seconds'] for r in runs):.0f} (all candidates) | - | - |")
    lines += ["", f"Retrain of the pick (head re-fit on its backbone, embeddings computed "
                  f"once): {statistics.mean(r['retrain_seconds'] for r in runs):.0f} s "
                  "on average.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-al"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/learners-cpu"))
    parser.add_argument("--summarise", action="store_true",
                        help="only rewrite README.md from results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    # runs already in results.json are kept: a long run can be continued or extended
    results: dict[str, list[dict]] = json.loads(saved.read_text()) if saved.exists() else {}
    candidates = tuple(args.candidates.split(","))
    for seed in [] if args.summarise else [int(s) for s in args.seeds.split(",")]:
        for name in args.scenarios.split(","):
            runs = results.setdefault(name, [])
            if any(r["seed"] == seed for r in runs):
                continue
            data = scenario_data(args.work_dir, name, seed)
            runs.append(run_auto(data, args.work_dir / "learners", f"{name}-{seed}", seed,
                                 candidates))
            atomic_write_json(saved, results)
    lines = ["# Learners on long-tailed data: `--learner auto` and every candidate", "",
             "`python -m bench.learners` on this machine (2 CPU cores, no GPU); every "
             "candidate trained (no budget); test/ is balanced and never used by the pick; "
             "mean ± std over seeds. 'Beat the pick beyond the noise': the paired 95% "
             "bootstrap interval (test images) of the candidate's macro-F1 minus the pick's "
             "lies above 0.", ""]
    for name in SCENARIOS:
        if results.get(name):
            lines += scenario_lines(name, results[name])
    atomic_write_text(args.out / "README.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
