"""How `--learner auto` picks among the candidates it trained, and what each may cost.

The pick is made on val/ only (test/ is reported, never used to choose), image by image,
with the same paired bootstrap the retrain gate uses (core.bootstrap):

    best       = the candidate with the highest val macro-F1
    contender  = a candidate whose paired 95% interval of (its macro-F1 - best's) reaches
                 0, and (with minority classes) whose interval of minority recall minus
                 that of the contender finding the rare classes best reaches 0 too: not
                 worse beyond the noise of val/ on either
    pick       = the first contender in `preference` (then in training order)

Why a prior order and not the best point estimate among contenders: a val/ of a few
hundred images cannot separate candidates a few points apart (its minority classes hold
a handful of images each), and picking by point estimate there followed the noise: in
bench/learners.py the highest val minority recall among contenders picked a candidate
that another beat on test/ beyond the noise on one seed in three of every scenario.
The preference is the candidates' record on that benchmark (config.PREFERENCE), so a
candidate val/ says is better beyond the noise (say a CNN from scratch on data unlike
photos) still wins.
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
           minority: list[int], seed: int = 0,
           preference: tuple[str, ...] = ()) -> tuple[str, dict[str, dict]]:
    """(the picked name, per candidate: val macro-F1 and minority recall with intervals,
    their intervals of difference to the best, and whether it contended)."""
    labels = np.asarray(labels)
    found = {s.name: intervals(labels, s.val_predictions, n_classes, minority, seed=seed)
             for s in scores}

    def difference(reference: CandidateScore, other: CandidateScore) -> dict:
        return paired_difference(labels, reference.val_predictions, other.val_predictions,
                                 n_classes, minority, seed=seed)

    best = max(scores, key=lambda s: found[s.name]["macro_f1"].estimate)
    f1_delta = {s.name: difference(best, s)["macro_f1"] for s in scores}
    contenders = [s for s in scores if f1_delta[s.name].high >= 0]
    recall_delta = {}
    if minority:
        finder = max(contenders, key=lambda s: found[s.name]["minority_recall"].estimate)
        recall_delta = {s.name: difference(finder, s)["minority_recall"] for s in scores}
        contenders = [s for s in contenders if recall_delta[s.name].high >= 0]
    contending = {s.name for s in contenders}  # by name: a score's == compares arrays
    table: dict[str, dict] = {}
    for s in scores:
        table[s.name] = {"val_macro_f1": found[s.name]["macro_f1"].to_dict(),
                         "val_minority_recall": found[s.name]["minority_recall"].to_dict(),
                         "val_macro_f1_minus_best": f1_delta[s.name].to_dict(),
                         "contender": s.name in contending, "seconds": round(s.seconds, 1)}
        if s.name in recall_delta:
            table[s.name]["val_minority_recall_minus_best"] = recall_delta[s.name].to_dict()
    order = {name: rank for rank, name in enumerate(preference)}
    picked = min(contenders, key=lambda s: (order.get(s.name, len(order)), scores.index(s)))
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
