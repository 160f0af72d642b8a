"""The demo's report: per round and branch, labels spent, macro-F1 and minority recall with
bootstrap 95% intervals, ECE, per-class recall (minority classes marked), the paired
comparison of the final models, as markdown, a PNG and report.json (every figure)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import matplotlib

from visionloop.core.bootstrap import Interval
from visionloop.core.fsutil import atomic_write_text

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _plot(results, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for branch, style in (("loop", "o-"), ("random", "s--")):
        rows = [r for r in results if r.branch == branch]
        x = [r.labels for r in rows]
        label = "loop (Label Studio, gated)" if branch == "loop" else "random labels"
        for ax, key in zip(axes[:2], ("macro_f1", "minority_recall"), strict=True):
            values = [getattr(r, key) for r in rows]
            ax.errorbar(x, [v.estimate for v in values],
                        yerr=[[v.estimate - v.low for v in values],
                              [v.high - v.estimate for v in values]],
                        fmt=style, capsize=3, label=label)
        axes[2].plot(x, [r.minority_labels for r in rows], style, label=label)
    for ax, title in zip(axes, ("test macro-F1 (95% CI)", "minority-class recall (95% CI)",
                                "minority images labelled"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("labels spent")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _delta(delta: dict) -> str:
    return f"{delta['estimate']:+.4f} [{delta['low']:+.4f}, {delta['high']:+.4f}]"


def _interval(value: dict) -> str:
    return str(Interval(**value))  # report.json's form of a bootstrap.Interval


def _draws_section(draws: list[dict], comparison: dict, loop) -> list[str]:
    """The random baseline as several draws: each draw's figures, their mean with an
    interval over images and draws, and whether the loop's interval clears it."""
    mean = comparison["random_mean"]
    recall = mean["minority_recall"]
    apart = loop.minority_recall.low > recall["high"]
    lines = ["", f"Random labelling is a draw: {len(draws)} draws of the same budget from the "
             "same stream (draw 1 is the random rows above; the others are drawn at the end "
             "and retrained once). Their mean is the baseline of the comparison below; its "
             "interval resamples the test images and the draws.", "",
             "| random draw | minority labels | macro-F1 [95% CI] | minority recall [95% CI] |",
             "|---|---|---|---|"]
    lines += [f"| {d['draw']} | {d['minority_labels']} | {_interval(d['macro_f1'])} | "
              f"{_interval(d['minority_recall'])} |" for d in draws]
    lines += [f"| mean of {len(draws)} | "
              f"{sum(d['minority_labels'] for d in draws) / len(draws):.1f} | "
              f"{_interval(mean['macro_f1'])} | {_interval(recall)} |", "",
              f"The loop's final minority recall {loop.minority_recall} "
              + ("is above" if apart else "overlaps")
              + f" the random draws' mean {_interval(recall)}"
              + (" (non-overlapping 95% intervals)." if apart else ".")]
    return lines


def _champion_section(selection: dict | None) -> list[str]:
    if not selection:
        return []
    from visionloop.trainer.train import format_selection

    return ["", f"The champion's learner, chosen by `--learner auto` on val/ "
                f"({selection['seconds']:.0f} s for all candidates):", "", "```",
            format_selection(selection), "```"]


def write_report(cfg, results, minority: list[str], comparison: dict, wall_s: float,
                 registry: Path, draws: list[dict], selection: dict | None = None) -> Path:
    out = Path(cfg.out)
    _plot(results, out / "report.png")
    classes = list(results[0].per_class_recall)
    header = " | ".join(f"**{c}**" if c in minority else c for c in classes)
    test_images = cfg.report_per_class or "all"
    lines = [
        "# visionloop demo report", "",
        f"Scenario {cfg.scenario}, minority classes (bold): {', '.join(minority)}. "
        f"{cfg.rounds} rounds, {cfg.budget} labels per round, pool images streamed through "
        f"TorchServe each round, strategy {cfg.strategy}, learner {cfg.learner}; the random "
        f"baseline spends the same labels on random images of the same stream. Scored on "
        f"test/ ({test_images} images per class) through the served path; intervals are "
        f"bootstrap 95%. Wall time {wall_s / 60:.1f} min.", *_champion_section(selection), "",
        "![curves](report.png)", "",
        "| round | branch | labels | minority labels | version | macro-F1 [95% CI] "
        "| minority recall [95% CI] | ECE | promoted |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        promoted = "-" if r.promoted is None else ("yes" if r.promoted else "no")
        lines.append(f"| {r.round} | {r.branch} | {r.labels} | {r.minority_labels} | "
                     f"{r.version} | {r.macro_f1} | {r.minority_recall} | {r.ece:.4f} "
                     f"| {promoted} |")
    loop_final = [r for r in results if r.branch == "loop"][-1]
    lines += _draws_section(draws, comparison, loop_final)
    lines += ["", "Final models, paired bootstrap over the same test images (difference "
                  "[95% CI]; against the draws' mean the draws are resampled too):", "",
              "| comparison | macro-F1 | minority recall |", "|---|---|---|"]
    for name, delta in comparison.items():
        if name == "random_mean":
            continue
        lines.append(f"| {name.replace('_', ' ')} | {_delta(delta['macro_f1'])} | "
                     f"{_delta(delta['minority_recall'])} |")
    lines += ["", "Per-class recall:", "", f"| round | branch | {header} |",
              "|---|---|" + "---|" * len(classes)]
    for r in results:
        lines.append(f"| {r.round} | {r.branch} | "
                     + " | ".join(f"{r.per_class_recall[c]:.2f}" for c in classes) + " |")
    if registry.exists():
        lines += ["", "## Retraining decisions (registry)", "",
                  *registry.read_text().splitlines()[2:]]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    summary = {"config": {k: str(v) if isinstance(v, Path) else v
                          for k, v in asdict(cfg).items()},
               "minority": minority, "wall_s": round(wall_s, 1), "comparison": comparison,
               "random_draws": draws,
               "rounds": [{**asdict(r), "macro_f1": r.macro_f1.to_dict(),
                           "minority_recall": r.minority_recall.to_dict()} for r in results]}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2) + "\n")
    return path
