"""The demo's report: per round and branch, labels spent, macro-F1, minority recall, ECE,
per-class recall (minority classes marked), as markdown and a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _plot(results, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for branch, style in (("loop", "o-"), ("random", "s--")):
        rows = [r for r in results if r.branch == branch]
        x = [r.labels for r in rows]
        label = "loop (class-balanced uncertainty)" if branch == "loop" else "random baseline"
        axes[0].plot(x, [r.macro_f1 for r in rows], style, label=label)
        axes[1].plot(x, [r.minority_recall for r in rows], style, label=label)
        axes[2].plot(x, [r.minority_labels for r in rows], style, label=label)
    for ax, title in zip(axes, ("test macro-F1", "minority-class recall",
                                "minority images labelled"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("labels spent")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(cfg, results, minority: list[str], wall_s: float, registry: Path) -> Path:
    out = Path(cfg.out)
    _plot(results, out / "report.png")
    classes = list(results[0].per_class_recall)
    header = " | ".join(f"**{c}**" if c in minority else c for c in classes)
    lines = [
        "# visionloop demo report", "",
        f"Long-tailed Fashion-MNIST ({cfg.data}), minority classes (bold): "
        f"{', '.join(minority)}. {cfg.rounds} rounds, {cfg.budget} labels per round, "
        f"{cfg.stream_per_round} pool images streamed through TorchServe per round, strategy "
        f"{cfg.strategy}; the random baseline spends the same labels on random images of the "
        f"same stream. Test: {cfg.eval_per_class} images per class. Wall time "
        f"{wall_s / 60:.1f} min.", "",
        "![curves](report.png)", "",
        "| round | branch | labels | minority labels | version | macro-F1 | minority recall "
        "| ECE | promoted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        promoted = "-" if r.promoted is None else ("yes" if r.promoted else "no")
        lines.append(f"| {r.round} | {r.branch} | {r.labels} | {r.minority_labels} | "
                     f"{r.version} | {r.macro_f1:.4f} | {r.minority_recall:.4f} | {r.ece:.4f} "
                     f"| {promoted} |")
    lines += ["", "Per-class recall:", "", f"| round | branch | {header} |",
              "|---|---|" + "---|" * len(classes)]
    for r in results:
        lines.append(f"| {r.round} | {r.branch} | "
                     + " | ".join(f"{r.per_class_recall[c]:.2f}" for c in classes) + " |")
    if registry.exists():
        lines += ["", "## Retraining decisions (registry)", "",
                  *registry.read_text().splitlines()[2:]]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
