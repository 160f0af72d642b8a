"""Compare class-imbalance methods on long-tailed Fashion-MNIST, in one run.

Trains the same backbone with each method on the long-tailed train set, plus two
references measured in the same run: the default method on the balanced train set
(same val/test images) and the default method from random init. Writes a markdown
table and the raw figures to --out.

    python -m bench.imbalance --out reports/bench-imbalance [--epochs 6 --seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from visionloop.core.fsutil import atomic_write_json, atomic_write_text
from visionloop.core.manifest import ModelManifest
from visionloop.trainer import fashion_mnist
from visionloop.trainer.config import TrainConfig
from visionloop.trainer.imbalance import METHODS
from visionloop.trainer.train import run_training

log = logging.getLogger("bench.imbalance")
DEFAULT_METHOD = TrainConfig.__dataclass_fields__["imbalance"].default


def build_data(root: Path, args: argparse.Namespace, seed: int) -> dict[str, Path]:
    """The long-tailed scenario and its balanced twin (same val/test images)."""
    paths = {}
    for label, ratio in (("long_tailed", args.imbalance_ratio), ("balanced", 1.0)):
        out = root / f"{label}-seed{seed}"
        fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(
            out=out, minority=args.minority, imbalance_ratio=ratio, pool_per_class=0,
            train_per_class=args.train_per_class, val_per_class=args.val_per_class,
            test_per_class=args.test_per_class, seed=seed, source_dir=args.source_dir))
        paths[label] = out
    return paths


def variants() -> list[tuple[str, str, str, str]]:
    """(row label, data, imbalance method, weights)."""
    rows = [(f"long-tailed, {m}", "long_tailed", m, "DEFAULT") for m in METHODS]
    rows.append((f"long-tailed, {DEFAULT_METHOD}, random init", "long_tailed",
                 DEFAULT_METHOD, "none"))
    rows.append((f"balanced train set, {DEFAULT_METHOD}", "balanced", DEFAULT_METHOD, "DEFAULT"))
    return rows


def run_one(data: Path, store: Path, method: str, weights: str, seed: int,
            args: argparse.Namespace) -> dict:
    cfg = TrainConfig(data=str(data), out=str(store), name=f"bench-{method}-{weights}",
                      learner="finetune", arch=args.arch, weights=weights, imbalance=method,
                      epochs=args.epochs,
                      freeze_epochs=args.freeze_epochs, image_size=args.image_size,
                      minority=tuple(args.minority), seed=seed, num_workers=args.num_workers,
                      work_dir=str(store / "runs" / f"{method}-{weights}-{seed}"),
                      show_progress=False)
    started = time.perf_counter()
    manifest = ModelManifest.load(run_training(cfg))
    m = manifest.metrics
    return {"macro_f1": m["test"]["macro_f1"], "minority_recall": m["minority_recall"],
            "balanced_accuracy": m["test"]["balanced_accuracy"],
            "ece_uncalibrated": m["ece_uncalibrated"], "ece_calibrated": m["ece_calibrated"],
            "temperature": m["temperature"], "seconds": time.perf_counter() - started}


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def markdown(results: dict[str, list[dict]], args: dict) -> str:
    keys = ("macro_f1", "minority_recall", "balanced_accuracy", "ece_uncalibrated",
            "ece_calibrated", "temperature")
    lines = [
        "# Class-imbalance methods on long-tailed Fashion-MNIST", "",
        f"arch {args['arch']}, {args['image_size']} px, {args['epochs']} epochs "
        f"({args['freeze_epochs']} head-only), train {args['train_per_class']}/class, minority "
        f"{', '.join(args['minority'])} cut to 1/{args['imbalance_ratio']:g}; test "
        f"{args['test_per_class']}/class; seeds {args['seeds']}. Mean ± std over seeds.", "",
        "| run | " + " | ".join(keys) + " | seconds |", "|---" * (len(keys) + 2) + "|",
    ]
    for label in (label for label, *_ in variants() if label in results):
        runs = results[label]
        cells = [_fmt([r[k] for r in runs]) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    default = statistics.mean(r["macro_f1"] for r in results[f"long-tailed, {DEFAULT_METHOD}"])
    balanced = statistics.mean(
        r["macro_f1"] for r in results[f"balanced train set, {DEFAULT_METHOD}"])
    scratch = statistics.mean(
        r["macro_f1"] for r in results[f"long-tailed, {DEFAULT_METHOD}, random init"])
    lines += ["", f"Default ({DEFAULT_METHOD}) macro-F1 / balanced-set macro-F1: "
              f"**{default / balanced:.3f}x** (goal >= 0.95x).",
              f"Pretrained / random-init macro-F1: **{default / scratch:.3f}x**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("reports/bench-imbalance"))
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int,
                        default=TrainConfig.__dataclass_fields__["epochs"].default)
    parser.add_argument("--freeze-epochs", type=int, default=1)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=500)
    parser.add_argument("--imbalance-ratio", type=float, default=100.0)
    parser.add_argument("--minority", type=fashion_mnist.parse_minority,
                        default=("coat", "sandal", "bag"))  # as in `make demo`
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--source-dir", type=Path, default=fashion_mnist.DEBIAN_DIR)
    parser.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="train nothing: combine results.json files of runs with other "
                             "seeds (same settings) into one table")
    args = parser.parse_args()
    if args.merge:
        write_results(args.out, *merge(args.merge))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results: dict[str, list[dict]] = {label: [] for label, *_ in variants()}
    with tempfile.TemporaryDirectory(prefix="bench-imbalance-") as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            data = build_data(Path(tmp), args, seed)
            for label, split, method, weights in variants():
                log.info("seed %d: %s", seed, label)
                results[label].append(run_one(data[split], Path(tmp) / "store", method, weights,
                                              seed, args))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "merge", "source_dir")}
    write_results(args.out, results, settings)


def merge(paths: list[Path]) -> tuple[dict[str, list[dict]], dict]:
    loaded = [json.loads(p.read_text()) for p in paths]
    settings = dict(loaded[0]["settings"])
    for other in loaded[1:]:
        differing = {k for k in settings
                     if k != "seeds" and other["settings"].get(k) != settings[k]}
        if differing:
            raise SystemExit(f"cannot merge runs whose settings differ in {sorted(differing)}")
    settings["seeds"] = ",".join(item["settings"]["seeds"] for item in loaded)
    results = {label: [run for item in loaded for run in item["runs"][label]]
               for label in loaded[0]["runs"]}
    return results, settings


def write_results(out: Path, results: dict[str, list[dict]], settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {"settings": settings, "runs": results})
    atomic_write_text(out / "results.md", markdown(results, settings))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
