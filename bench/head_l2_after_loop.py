"""After a `make demo`: what the loop's labels and each random draw's labels buy the
multi-block head at each L2 strength, re-fit offline on the demo's own data and labels.

A retrain tries its champion's L2 and the weaker ones (trainer.train.head_strengths says
why not the whole grid, and why not the champion's alone). This measures that rule: the head
is fit on train/ alone and on train/ plus the loop's pulled labels (runs/demo/labels) or one
random draw's (runs/demo/labels-random*), with the champion's prior kept, at every L2 of
trainer.head.L2_GRID, scored on val/ and test/ (macro-F1, minority recall); then what a
retrain would pick under the rule, and under the earlier one (the champion's L2 kept). No
serving path, no gate: the heads the retrains would fit, side by side.

    python -m bench.head_l2_after_loop --demo-dir runs/demo --image-size 96
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from visionloop.core.manifest import Preprocessing
from visionloop.core.scenario import class_names
from visionloop.trainer.data import scan_image_folder
from visionloop.trainer.embeddings import EmbeddingCache, backbone_fingerprint, embed_files
from visionloop.trainer.head import L2_GRID, fit_head, logits_of, no_stronger_than
from visionloop.trainer.metrics import classification_report, minority_recall
from visionloop.trainer.models import LITE0_MULTIBLOCK, build_model


def picks_table(rows: list[dict], arms: list[str]) -> list[str]:
    """Per arm, the L2 a retrain picks on val/ from the champion's (train only's best on
    val/) under each rule, with its test/ scores; the random draws' mean under each rule."""
    by = {(r["arm"], r["l2"]): r for r in rows}
    # max() keeps the first of equal keys, as fit_head keeps the first of equal scores
    champion = max(L2_GRID, key=lambda g: by[("train only", g)]["val"][0])
    rules = {"champion's kept": (champion,), "champion's or weaker": no_stronger_than(champion)}
    lines = [f"What a retrain picks from the champion's L2 {champion:g}:", "",
             "| arm | rule | L2 | test macro-F1 | test minority recall |", "|---|---|---|---|---|"]
    for rule, strengths in rules.items():
        picked = {}
        for arm in arms:
            best = max(strengths, key=lambda g: by[(arm, g)]["val"][0])
            picked[arm] = by[(arm, best)]
            lines.append(f"| {arm} | {rule} | {best:g} | {picked[arm]['test'][0]:.4f} | "
                         f"{picked[arm]['test'][1]:.3f} |")
        draws = [picked[a]["test"] for a in arms if a.startswith("random")]
        if draws:
            lines.append(f"| random mean of {len(draws)} | {rule} | - | "
                         f"{np.mean([d[0] for d in draws]):.4f} | "
                         f"{np.mean([d[1] for d in draws]):.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist-lt"))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--embedding-cache", type=Path, default=Path("runs/bench-al/embeddings"))
    args = parser.parse_args()
    classes = class_names(args.data)
    minority = json.loads((args.data / "scenario.json").read_text())["config"]["minority"]
    built = build_model(LITE0_MULTIBLOCK, len(classes), "DEFAULT")
    pre = Preprocessing(args.image_size, args.image_size, built.mean, built.std)
    trees = {split: args.data / split for split in ("train", "val", "test")}
    trees["loop"] = args.demo_dir / "labels" / "images"
    for draw in sorted(args.demo_dir.glob("labels-random*")):
        trees[draw.name.replace("labels-", "")] = draw / "images"
    # subset: a label tree holds only the classes labelled so far
    samples = {name: scan_image_folder(root, classes, subset=True).samples
               for name, root in trees.items()}
    cache = EmbeddingCache(args.embedding_cache, backbone_fingerprint(
        built.model, built.head_prefix, LITE0_MULTIBLOCK, pre))
    try:
        features = {name: embed_files(built.model, built.head_prefix, pre, [p for p, _ in s],
                                      cache, torch.device("cpu"))
                    for name, s in samples.items()}
    finally:
        cache.close()
    labels = {name: np.array([y for _, y in s]) for name, s in samples.items()}
    prior = np.bincount(labels["train"], minlength=len(classes)).astype(float)
    arms = ["train only", "loop"] + [n for n in trees if n.startswith("random")]
    rows = []
    for l2 in L2_GRID:
        for arm in arms:
            extra = [] if arm == "train only" else [arm]
            x = np.concatenate([features["train"]] + [features[a] for a in extra])
            y = np.concatenate([labels["train"]] + [labels[a] for a in extra])
            # as a retrain fits it: standardised by its own train set, the L2 given
            fit = fit_head((x, y), (features["val"], labels["val"]), classes, prior, (l2,))
            row = {"l2": l2, "arm": arm, "labels": len(y) - len(labels["train"])}
            for split in ("val", "test"):
                report = classification_report(logits_of(fit, features[split]),
                                               torch.from_numpy(labels[split]), classes)
                row[split] = (report["macro_f1"], minority_recall(report, minority))
            rows.append(row)
            print(row, flush=True)
    lines = [f"# The head at each L2 after the demo's labels ({args.image_size} px)", "",
             f"`python -m bench.head_l2_after_loop --demo-dir {args.demo_dir} --image-size "
             f"{args.image_size}` on this machine (2 CPU cores): the multi-block head re-fit "
             "offline on train/ plus each arm's labels, the champion's prior kept.", "",
             "| L2 | arm | val macro-F1 | val minority recall | test macro-F1 "
             "| test minority recall |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['l2']:g} | {r['arm']} | {r['val'][0]:.4f} | {r['val'][1]:.3f} | "
                     f"{r['test'][0]:.4f} | {r['test'][1]:.3f} |")
    lines += ["", *picks_table(rows, arms)]
    out = args.out / f"head-l2-after-loop-{args.image_size}px.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
