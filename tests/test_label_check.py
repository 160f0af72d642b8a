"""labeling.label_check's rule, on its own: which labels go back for review."""

from __future__ import annotations

import numpy as np

from visionloop.labeling.label_check import flagged, needs_review

CLASSES = ("cat", "coffee", "rocket")
SURE_ROCKET = np.array([0.01, 0.02, 0.97])


def test_a_label_the_model_is_sure_is_wrong_goes_back_with_both_sides_shown():
    review = needs_review("cat", ["cat"], False, SURE_ROCKET, CLASSES)
    assert review is not None and review.reason == "model disagrees"
    assert "'rocket' (97% sure)" in review.note and "'cat' only 1.0%" in review.note
    assert needs_review("rocket", ["rocket"], False, SURE_ROCKET, CLASSES) is None
    assert needs_review("coffee", ["coffee"], False, SURE_ROCKET, CLASSES, 0.01) is None


def test_disagreements_go_back_whatever_the_model_says_and_ground_truth_never_does():
    review = needs_review("cat", ["cat", "coffee"], False, None, CLASSES, 0.0)
    assert review is not None and review.reason == "annotators disagree"
    assert "cat x1, coffee x1" in review.note
    assert needs_review("cat", ["cat", "coffee"], True, SURE_ROCKET, CLASSES) is None
    assert needs_review("cat", ["cat"], False, SURE_ROCKET, CLASSES, 0.0) is None  # check off
    assert needs_review("cat", ["cat"], False, np.array([0.5, 0.5]), CLASSES) is None  # other model


def test_the_array_rule_matches_the_single_one():
    probs = np.array([SURE_ROCKET, [0.6, 0.3, 0.1]])
    labels = np.array([0, 0])
    assert flagged(labels, probs).tolist() == [
        needs_review(CLASSES[y], [CLASSES[y]], False, p, CLASSES) is not None
        for y, p in zip(labels, probs, strict=True)]
