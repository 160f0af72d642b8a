"""How `--learner auto` picks among the candidates it trained, and what each may cost.

The pick is made on val/ only (test/ is reported, never used to choose), image by image,
with the same paired bootstrap the retrain gate uses (core.bootstrap):

    best      = the candidate with the highest val macro-F1
    contender = a candidate whose paired 95% interval of (its macro-F1 - best's) reaches 0:
                not worse than the best beyond the noise of val/
    pick      = the contender with the highest val minority recall (the earlier, cheaper
                one on a tie)

so a candidate that is as good on macro-F1 but finds the rare classes better wins, and a
point-estimate lead inside the noise does not decide alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from visionloop.core.bootstrap import intervals, paired_difference


@dataclass(frozen=True)
class CandidateScore:
    name: str
    val_predictions: np.ndarray  # predicted class per val/ image
    seconds: float


def choose(labels: np.ndarray, scores: list[CandidateScore], n_classes: int,
           minority: list[int], seed: int = 0) -> tuple[str, dict[str, dict]]:
    """(the picked name, per candidate: val macro-F1 and minority recall with intervals,
    the interval of its macro-F1 difference to the best, and whether it contended)."""
    labels = np.asarray(labels)
    found = {s.name: intervals(labels, s.val_predictions, n_classes, minority, seed=seed)
             for s in scores}
    best = max(scores, key=lambda s: found[s.name]["macro_f1"].estimate)
    table: dict[str, dict] = {}
    for s in scores:
        delta = paired_difference(labels, best.val_predictions, s.val_predictions, n_classes,
                                  minority, seed=seed)["macro_f1"]
        table[s.name] = {"val_macro_f1": found[s.name]["macro_f1"].to_dict(),
                         "val_minority_recall": found[s.name]["minority_recall"].to_dict(),
                         "val_macro_f1_minus_best": delta.to_dict(),
                         "contender": bool(delta.high >= 0), "seconds": round(s.seconds, 1)}
    contenders = [s for s in scores if table[s.name]["contender"]]
    recall = {s.name: found[s.name]["minority_recall"].estimate for s in contenders}
    if minority:
        picked = max(contenders, key=lambda s: (recall[s.name], -scores.index(s)))
    else:
        picked = best
    return picked.name, table


def seconds_per_image(model: nn.Module, image_size: int, train: bool,
                      batch_size: int = 32) -> float:
    """A probe of the model's cost on this machine: seconds per image of one forward (and
    backward, when train) pass over a random batch, after one warm-up pass. Data loading
    and augmentation are not in it; the estimate it feeds is a lower bound."""
    images = torch.randn(batch_size, 3, image_size, image_size)
    was_training = model.training
    model.train(train)
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        if train:
            output = model(images)
            output.float().sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(images)
        timings.append(time.perf_counter() - started)
    model.train(was_training)
    return timings[-1] / batch_size


def estimated_seconds(per_image_train: float, per_image_forward: float, train_images: int,
                      eval_images: int, epochs: int, learner: str) -> float:
    """What a candidate should take: a head learner embeds every image once; a fine-tune
    trains `epochs` passes over train/ and scores val/ after each, then val/ and test/."""
    if learner == "head":
        return per_image_forward * (train_images + eval_images)
    return per_image_train * train_images * epochs + per_image_forward * eval_images * 2
