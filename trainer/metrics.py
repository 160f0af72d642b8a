"""Classification metrics and calibration error, computed from logits and labels."""

from __future__ import annotations

import torch

ECE_BINS = 15


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               bins: int = ECE_BINS) -> float:
    """Weighted mean |accuracy - confidence| over equal-width confidence bins."""
    table = reliability_table(probs, labels, bins)
    total = sum(row["count"] for row in table)
    return sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table) / total


def reliability_table(probs: torch.Tensor, labels: torch.Tensor,
                      bins: int = ECE_BINS) -> list[dict]:
    confidence, preds = probs.max(dim=1)
    correct = (preds == labels).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        rows.append({
            "lower": b / bins, "upper": (b + 1) / bins, "count": count,
            "accuracy": float(correct[mask].mean()) if count else 0.0,
            "confidence": float(confidence[mask].double().mean()) if count else 0.0,
        })
    return rows


def classification_report(logits: torch.Tensor, labels: torch.Tensor,
                          classes: tuple[str, ...]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1/support, confusion."""
    num_classes = len(classes)
    cm = confusion_matrix(logits.argmax(dim=1), labels, num_classes).double()
    tp, support, predicted = cm.diag(), cm.sum(dim=1), cm.sum(dim=0)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "confusion_matrix": cm.long().tolist(),
    }


def minority_recall(report: dict, minority: list[str]) -> float | None:
    """Mean recall over the named classes, or None when none are given."""
    if not minority:
        return None
    return sum(report["per_class"][c]["recall"] for c in minority) / len(minority)
