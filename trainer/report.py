"""The human-readable evaluation report: markdown tables plus PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from visionloop.core.fsutil import atomic_write_text  # noqa: E402


def plot_confusion(matrix: list[list[int]], classes: tuple[str, ...], path: Path) -> None:
    cm = np.asarray(matrix, dtype=float)
    normalised = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(classes), 0.8 + 0.6 * len(classes)))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, int(value), ha="center", va="center", fontsize=7,
                color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_title("Confusion matrix (test), colour = row-normalised")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(before: list[dict], after: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    panels = ((axes[0], before, "uncalibrated"), (axes[1], after, "temperature-scaled"))
    for ax, table, title in panels:
        centres = [(r["lower"] + r["upper"]) / 2 for r in table if r["count"]]
        accuracy = [r["accuracy"] for r in table if r["count"]]
        ax.bar(centres, accuracy, width=1 / len(table), edgecolor="black", alpha=0.7,
               label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set_title(title)
        ax.set_xlabel("confidence")
        ax.legend(loc="upper left")
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_report(title: str, metrics: dict, classes: tuple[str, ...],
                    minority: list[str]) -> str:
    test = metrics["test"]
    lines = [
        f"# {title}", "",
        f"Evaluated on {metrics['test_split']} "
        f"({sum(c['support'] for c in test['per_class'].values())} images).",
        "", "| metric | value |", "|---|---|",
        f"| accuracy | {test['accuracy']:.4f} |",
        f"| balanced accuracy | {test['balanced_accuracy']:.4f} |",
        f"| macro-F1 | {test['macro_f1']:.4f} |",
    ]
    if metrics.get("minority_recall") is not None:
        lines.append(f"| minority-class recall (mean) | {metrics['minority_recall']:.4f} |")
    lines += [
        f"| ECE before temperature scaling | {metrics['ece_uncalibrated']:.4f} |",
        f"| ECE after (T = {metrics['temperature']:.3f}, fit on {metrics['calibration_split']}) "
        f"| {metrics['ece_calibrated']:.4f} |",
        "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
    ]
    for name in classes:
        row = test["per_class"][name]
        mark = " (minority)" if name in minority else ""
        lines.append(f"| {name}{mark} | {row['precision']:.3f} | {row['recall']:.3f} | "
                     f"{row['f1']:.3f} | {row['support']} |")
    lines += ["", "![confusion matrix](confusion_matrix.png)", "",
              "![reliability diagram](reliability.png)", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, title: str, metrics: dict, classes: tuple[str, ...],
                 minority: list[str]) -> Path:
    plot_confusion(metrics["test"]["confusion_matrix"], classes, out_dir / "confusion_matrix.png")
    plot_reliability(metrics["reliability_uncalibrated"], metrics["reliability_calibrated"],
                     out_dir / "reliability.png")
    path = out_dir / "report.md"
    atomic_write_text(path, markdown_report(title, metrics, classes, minority))
    return path
