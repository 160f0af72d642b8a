"""Does the drift measure (core.drift) move when the traffic does, and stay quiet when it
does not?

Per seed, the long-tailed Fashion-MNIST scenario of bench/active_learning.py and its
champion (the frozen Lite0 head the product trains on a CPU). The reference is fit as the
trainer does: class centres on val/ logits, thresholds from bootstrap windows of test/ (here
drawn with the training split's class mix, as a user's own test split has it; 1% false
alarms per window for either statistic). Streams, in windows of 200 predictions:
- unshifted: the pool, as long-tailed as training, in random order (false alarms);
- class mix: the balanced test split (every class 10%: the minority classes ~30x as common
  as in training);
- inverted / rotated 90 degrees / blurred (Gaussian, radius 1.5 px): test images
  transformed, embedded through the product's cache.
Reported per stream: the share of windows that cross a threshold (on unshifted traffic:
the false-alarm rate), the two statistics' means, and, as a retrain trigger would see it,
the windows of shifted traffic it takes to fire after 20 windows of unshifted traffic;
then the same shares at each distance margin (core.drift.DISTANCE_MARGIN: the default, and
the others for the trade-off), with and without the per-prediction cap.

    python -m bench.drift --out bench/results/drift-cpu --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from bench.active_learning import Learner, default_scenario, seed_learner
from bench.report import run_seeds
from visionloop.core.drift import (
    DISTANCE_CAP_PERCENTILE,
    DISTANCE_MARGIN,
    FALSE_ALARM,
    WINDOW,
    fit_reference,
    read,
)
from visionloop.core.manifest import Preprocessing
from visionloop.core.scenario import class_names
from visionloop.trainer.embeddings import EmbeddingCache, backbone_fingerprint, embed_files
from visionloop.trainer.models import LITE0, build_model

log = logging.getLogger("bench.drift")
TRANSFORMS = {
    "inverted": lambda image: ImageOps.invert(image.convert("L")),
    "rotated 90": lambda image: image.rotate(90),
    "blurred": lambda image: image.filter(ImageFilter.GaussianBlur(1.5)),
}
LEAD_WINDOWS = 20  # unshifted windows before a shift, for the trigger's delay
MARGINS = (0.0, 0.1, 0.2, 0.3)


def transformed_embeddings(data: Path, work: Path, image_size: int, per_transform: int,
                           learner: Learner) -> dict[str, np.ndarray]:
    """Standardised embeddings of `per_transform` test images under each transform."""
    classes = class_names(data)
    tests = sorted(p for c in classes for p in (data / "test" / c).iterdir())
    picked = [tests[i] for i in np.random.default_rng(0).permutation(len(tests))[:per_transform]]
    built = build_model(LITE0, 2, "DEFAULT")
    pre = Preprocessing(image_size, image_size, built.mean, built.std)
    cache = EmbeddingCache(work / "embeddings", backbone_fingerprint(
        built.model, built.head_prefix, LITE0, pre))
    out = {}
    try:
        for name, transform in TRANSFORMS.items():
            folder = work / "drift-images" / name.replace(" ", "-")
            folder.mkdir(parents=True, exist_ok=True)
            paths = []
            for path in picked:
                target = folder / f"{path.parent.name}-{path.name}"
                if not target.exists():
                    with Image.open(path) as image:
                        transform(image).save(target)
                paths.append(target)
            raw = embed_files(built.model, built.head_prefix, pre, paths, cache,
                              torch.device("cpu"))
            out[name] = ((raw - learner.mean) / learner.scale).astype(np.float32)
    finally:
        cache.close()
    return out


def long_tailed_rows(labels: np.ndarray, counts: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Rows of a balanced set drawn with the class mix `counts` (the training split's), as
    many as the rarest class allows."""
    share = counts / counts.sum()
    per_class = np.bincount(labels, minlength=len(counts))
    total = int(min(per_class[k] / share[k] for k in range(len(counts)) if share[k] > 0))
    return np.concatenate([rng.choice(np.flatnonzero(labels == k), int(round(total * share[k])),
                                      replace=False) for k in range(len(counts))])


def windows(logits: np.ndarray, size: int) -> list[np.ndarray]:
    return [logits[i:i + size] for i in range(0, len(logits) - size + 1, size)]


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    learner = seed_learner(args, seed)
    w, b = learner.champion

    def logits(x: np.ndarray) -> np.ndarray:
        return x @ w.T + b

    # as the trainer fits it: centres on val/, thresholds and mix on test/. This scenario's
    # test/ is balanced, so the test split drawn as the pool is (long-tailed) stands in
    test_x, test_y = learner.x["test"], learner.y["test"]
    like_train = long_tailed_rows(test_y, learner.prior, rng=np.random.default_rng(seed))
    fit = {"val": logits(learner.x["val"]), "labels": learner.y["val"],
           "test": logits(test_x[like_train])}
    reference = fit_reference(fit["val"], fit["labels"], fit["test"], window=args.window,
                              seed=seed)
    rng = np.random.default_rng(seed)
    pool = logits(learner.x["pool"])[rng.permutation(len(learner.x["pool"]))]
    streams = {"unshifted (pool)": pool,
               "class mix (balanced test)": logits(test_x)[rng.permutation(len(test_x))]}
    data = args.work_dir / f"data-seed{seed}"
    for name, x in transformed_embeddings(data, args.work_dir, args.image_size,
                                          args.per_transform, learner).items():
        streams[name] = logits(x)
    result = {"seed": seed, "distance_threshold": reference.distance_threshold,
              "mix_threshold": reference.mix_threshold, "streams": {}}
    lead = windows(pool, args.window)[:LEAD_WINDOWS]
    for name, stream in streams.items():
        readings = [read(reference, chunk) for chunk in windows(stream, args.window)]
        entry = {"windows": len(readings),
                 "flagged": sum(r.drifted for r in readings) / len(readings),
                 "distance": statistics.mean(r.distance for r in readings),
                 "mix": statistics.mean(r.mix for r in readings)}
        if not name.startswith("unshifted"):
            # the trigger: unshifted traffic, then the shift; windows until it fires
            fired = [read(reference, chunk).drifted
                     for chunk in lead + windows(stream, args.window)]
            entry["false_alarms_before"] = sum(fired[:LEAD_WINDOWS])
            after = fired[LEAD_WINDOWS:]
            entry["windows_to_fire"] = after.index(True) + 1 if True in after else None
        result["streams"][name] = entry
        log.info("seed %d %s: %s", seed, name, entry)
    result["margins"] = margin_sweep(fit, streams, args.window, seed)
    return result


def margin_sweep(fit: dict, streams: dict[str, np.ndarray], window: int,
                 seed: int) -> dict[str, dict[str, float]]:
    """'margin m, capped|uncapped' -> stream -> share of windows flagged."""
    out = {}
    for margin in MARGINS:
        for capped in (True, False):  # uncapped: thresholds and readings without the cap
            reference = fit_reference(fit["val"], fit["labels"], fit["test"], window=window,
                                      seed=seed, margin=margin,
                                      cap_percentile=DISTANCE_CAP_PERCENTILE if capped else None)
            out[f"{margin:.1f}, {'capped' if capped else 'uncapped'}"] = {
                name: float(np.mean([read(reference, chunk).drifted
                                     for chunk in windows(stream, window)]))
                for name, stream in streams.items()}
    return out


def summarise(results: list[dict], args: argparse.Namespace) -> str:
    seeds = ",".join(str(r["seed"]) for r in results)
    lines = ["# Drift in the traffic: the measure on unshifted and shifted streams", "",
             f"`python -m bench.drift --seeds {seeds} --window {args.window} --per-transform "
             f"{args.per_transform}` on this machine (2 CPU cores). Windows of "
             f"{args.window} predictions; thresholds for {FALSE_ALARM:.0%} false alarms per "
             "window from bootstrap windows of test/ (drawn with the training mix; class "
             "centres from val/), each prediction's distance capped at test/'s 99th "
             f"percentile, the distance threshold at least {1 + DISTANCE_MARGIN:.1f} x "
             "test/'s mean distance. Mean ± std over seeds.", "",
             "| seed | distance threshold | mix threshold |", "|---|---|---|"]
    for r in results:
        lines.append(f"| {r['seed']} | {r['distance_threshold']:.2f} | "
                     f"{r['mix_threshold']:.3f} |")
    lines += ["", "| stream | windows | share flagged | mean distance | mean mix (TV) | "
                  f"windows to fire after {LEAD_WINDOWS} unshifted (per seed) |",
              "|---|---|---|---|---|---|"]
    for name in results[0]["streams"]:
        rows = [r["streams"][name] for r in results]

        def spread(key: str, fmt: str, values: list[dict] = rows) -> str:
            xs = [v[key] for v in values]
            std = statistics.stdev(xs) if len(xs) > 1 else 0.0
            return f"{statistics.mean(xs):{fmt}} ± {std:{fmt}}"

        fire = ", ".join("-" if "windows_to_fire" not in v else
                         ("never" if v["windows_to_fire"] is None else str(v["windows_to_fire"]))
                         for v in rows)
        lines.append(f"| {name} | {rows[0]['windows']} | {spread('flagged', '.3f')} | "
                     f"{spread('distance', '.2f')} | {spread('mix', '.3f')} | {fire} |")
    if "margins" in results[0]:
        lines += margin_lines(results)
    return "\n".join(lines) + "\n"


def margin_lines(results: list[dict]) -> list[str]:
    names = list(results[0]["streams"])
    lines = ["", f"Share of windows flagged at each distance margin (default "
                 f"{DISTANCE_MARGIN:.1f}), with the per-prediction cap (the default) and "
                 "without; mean over seeds, max in brackets.", "",
             "| margin | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for setting in results[0]["margins"]:
        cells = []
        for name in names:
            shares = [r["margins"][setting][name] for r in results]
            cells.append(f"{statistics.mean(shares):.3f} ({max(shares):.3f})")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/drift-cpu"))
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-al"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--per-transform", type=int, default=2000,
                        help="test images per transformed stream")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    for key, value in vars(default_scenario()).items():
        setattr(args, key, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run_seeds(args, args.out, run_seed, summarise)
    print(summarise(results, args))


if __name__ == "__main__":
    main()
