"""The retrain gate: promote a challenger only when the evidence says it is not worse.

Both models are scored on the gate split (the scenario's val/: never trained on, and not
the test split the demo reports), image by image. The paired bootstrap gives 95%
intervals of (challenger - champion) for macro-F1 and for the minority classes' mean
recall. The rule, a non-inferiority test:

    promote  iff  low(delta macro-F1)        >= -max_macro_f1_drop
             and  low(delta minority recall) >= -max_minority_recall_drop

so a challenger is kept out as soon as a drop larger than the margin is plausible, and an
equal one (the same predictions) is promoted. The intervals and the rule are written into
the registry with every decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionloop.core.bootstrap import LEVEL, paired_difference


@dataclass(frozen=True)
class GateRule:
    max_macro_f1_drop: float
    max_minority_recall_drop: float

    def describe(self) -> str:
        return (f"promote iff the {LEVEL:.0%} paired-bootstrap interval of challenger - "
                f"champion has low >= -{self.max_macro_f1_drop} (macro-F1) and "
                f">= -{self.max_minority_recall_drop} (minority recall)")


def decide(labels: np.ndarray, champion: np.ndarray, challenger: np.ndarray, n_classes: int,
           minority: list[int], rule: GateRule, seed: int = 0) -> tuple[bool, str, dict]:
    """(promoted, reason, what the registry records) from both models' predicted classes."""
    delta = paired_difference(labels, champion, challenger, n_classes, minority, seed=seed)
    f1, recall = delta["macro_f1"], delta["minority_recall"]
    reasons = []
    if f1.low < -rule.max_macro_f1_drop:
        reasons.append(f"macro-F1 may have fallen: delta {f1}")
    if minority and recall.low < -rule.max_minority_recall_drop:
        reasons.append(f"minority recall may have fallen: delta {recall}")
    promoted = not reasons
    if promoted:
        reasons.append(f"not worse: delta macro-F1 {f1}, "
                       + (f"minority recall {recall}" if minority else "no minority classes"))
    record = {"images": int(len(labels)), "rule": rule.describe(),
              "delta_macro_f1": f1.to_dict(), "delta_minority_recall": recall.to_dict()}
    return promoted, "; ".join(reasons), record
