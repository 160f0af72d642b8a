"""What every bench writes: one seed at a time, results.json and README.md rewritten after
each, so a run stopped half-way still leaves its finished seeds readable."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

from visionloop.core.fsutil import atomic_write_json, atomic_write_text


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' over seeds; '-' when there is nothing to average."""
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def run_seeds(args: argparse.Namespace, out: Path,
              run_seed: Callable[[argparse.Namespace, int], dict],
              summarise: Callable[[list[dict], argparse.Namespace], str]) -> list[dict]:
    """Runs `run_seed` for each of args.seeds ("0,1,2"), saving after every seed."""
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for seed in (int(s) for s in args.seeds.split(",")):
        results.append(run_seed(args, seed))
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / "README.md", summarise(results, args))
    return results
