"""Labels checked before they train: which pulled labels go back to Label Studio for review.

A label is sent back, once, when
- the model that served the image contradicts it: its calibrated probability for the label
  is below `review_below` (the model is at least 1 - review_below sure the label is wrong), or
- two or more annotators answered the task and did not all agree.
A label an annotator marked as ground truth is never sent back. A label sent back does not
train until the review is answered; the reviewer is shown the disagreement and decides.
Everything else trains at once.

The probabilities are the ones the model served with, calibrated, as the capture store
keeps them; so the check costs no inference. The decision is a pure function, shared by
`label pull` and bench/label_check.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REVIEW_BELOW = 0.05  # a wrong label the model is 95% sure of; see docs/benchmarks.md


@dataclass(frozen=True)
class Review:
    reason: str  # "model disagrees" or "annotators disagree"
    note: str  # what the reviewer is shown


def needs_review(label: str, answers: list[str], ground_truth: bool,
                 probabilities: np.ndarray | None, classes: tuple[str, ...],
                 review_below: float = REVIEW_BELOW) -> Review | None:
    """The review a label needs, or None if it can train. `answers`: each annotator's
    answer; `probabilities`: the serving model's calibrated probabilities in `classes`'
    order (None when unknown)."""
    if ground_truth:
        return None
    if len(answers) > 1 and len(set(answers)) > 1:
        counted = ", ".join(f"{name} x{answers.count(name)}" for name in sorted(set(answers)))
        return Review("annotators disagree", f"Annotators disagreed: {counted}.")
    if probabilities is None or label not in classes or len(probabilities) != len(classes):
        return None
    p_label = float(probabilities[classes.index(label)])
    if p_label >= review_below:
        return None
    top = int(np.argmax(probabilities))
    return Review("model disagrees",
                  f"Labelled {label!r}; the model says {classes[top]!r} "
                  f"({probabilities[top]:.0%} sure), {label!r} only {p_label:.1%}.")


def flagged(labels: np.ndarray, probabilities: np.ndarray,
            review_below: float = REVIEW_BELOW) -> np.ndarray:
    """needs_review's model rule for arrays (one annotator each): True where the label's
    probability is below review_below."""
    return probabilities[np.arange(len(labels)), labels] < review_below
