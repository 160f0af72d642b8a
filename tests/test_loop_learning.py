"""The learning side of the loop without servers: embedding cache, head learner, bootstrap
intervals, scenario checks and the demo's stream sizes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from visionloop.configs import DemoConfig
from visionloop.core.bootstrap import intervals, paired_difference
from visionloop.core.manifest import Preprocessing
from visionloop.core.scenario import ScenarioError, check_layout, read_pool
from visionloop.demo import stream_sizes
from visionloop.trainer.embeddings import EmbeddingCache, backbone_fingerprint, embed_files
from visionloop.trainer.head import fit_head, fit_linear_head, logits_of, no_stronger_than, set_head

PRE = Preprocessing(image_size=8, resize=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class CountingBackbone(nn.Module):
    """A tiny real network whose last linear layer is the head; counts images embedded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.head(self.features(x))


@pytest.fixture()
def image_files(small_scenario: Path) -> list[Path]:
    """Real images: 40 Fashion-MNIST training files."""
    return sorted((small_scenario / "train").rglob("*.png"))[:40]


def test_embeddings_are_computed_once_by_content_and_resume(image_files, tmp_path):
    model = CountingBackbone()
    fingerprint = backbone_fingerprint(model, "head.", "tiny", PRE)
    cache = EmbeddingCache(tmp_path / "cache", fingerprint)
    half = embed_files(model, "head.", PRE, image_files[:20], cache, torch.device("cpu"), 8)
    assert half.shape == (20, 16) and model.seen == 20
    # a run that stopped after the first half: only the rest is computed
    whole = embed_files(model, "head.", PRE, image_files, cache, torch.device("cpu"), 8)
    assert model.seen == 40 and np.allclose(whole[:20], half)
    # a copy under another name is the same content: nothing computed
    copy = tmp_path / "copy.png"
    shutil.copyfile(image_files[5], copy)
    again = embed_files(model, "head.", PRE, [copy], cache, torch.device("cpu"), 8)
    assert model.seen == 40 and np.array_equal(again[0], whole[5])
    with torch.no_grad():  # the cached vector is the head's input, from eval preprocessing
        direct = model.features(torch.stack([_preprocessed(image_files[5])]))[0].numpy()
    assert np.allclose(whole[5], direct, atol=1e-5)
    assert isinstance(model.head, nn.Linear)  # put back after embedding
    cache.close()
    # another backbone (different weights) gets its own cache
    other = CountingBackbone()
    with torch.no_grad():
        other.features[1].weight.add_(1.0)
    assert backbone_fingerprint(other, "head.", "tiny", PRE) != fingerprint
    changed_head = CountingBackbone()
    with torch.no_grad():
        changed_head.head.weight.add_(1.0)
    assert backbone_fingerprint(changed_head, "head.", "tiny", PRE) == fingerprint


def _preprocessed(path: Path) -> torch.Tensor:
    from visionloop.core.preprocess import preprocess_image
    from visionloop.trainer.data import load_image_tensor

    return preprocess_image(load_image_tensor(path), PRE)


def _two_blobs(rng, n_major: int, n_minor: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([rng.normal(0.0, 1.0, (n_major, 2)), rng.normal(1.5, 1.0, (n_minor, 2))])
    return x.astype(np.float32), np.array([0] * n_major + [1] * n_minor)


def test_logit_adjusted_head_recovers_balanced_decisions():
    rng = np.random.default_rng(0)
    x, y = _two_blobs(rng, 2000, 40)
    test_x, test_y = _two_blobs(rng, 1000, 1000)
    recall = {}
    for name, prior in (("uniform", np.ones(2)), ("train", np.array([2000.0, 40.0]))):
        weight, bias = fit_linear_head(x, y, prior, l2=1e-3)
        predicted = (test_x @ weight.T + bias).argmax(axis=1)
        recall[name] = (predicted[test_y == 1] == 1).mean()
    # plain CE on 50:1 data rarely predicts the minority; the adjusted logits do (~0.77)
    assert recall["uniform"] < 0.3 < 0.6 < recall["train"]


def test_head_fit_folds_its_standardisation_into_the_linear_layer():
    rng = np.random.default_rng(1)
    x, y = _two_blobs(rng, 300, 300)
    x = x * 50 + 7  # far from standardised
    fit = fit_head((x, y), (x, y), ("a", "b"), np.array([1.0, 1.0]))
    assert fit.l2 in fit.val_macro_f1 and len(fit.val_macro_f1) == 5
    head = nn.Linear(2, 2)
    set_head(nn.Sequential(head), "0.", fit)
    with torch.no_grad():
        from_layer = head(torch.from_numpy(x))
    assert torch.allclose(from_layer, logits_of(fit, x), atol=1e-3)
    assert (from_layer.argmax(1).numpy() == y).mean() > 0.8


def test_a_retrain_tries_its_parents_strength_first_and_only_weaker_ones():
    assert no_stronger_than(3e-2) == (3e-2, 1e-2, 3e-3, 1e-3)
    assert no_stronger_than(1e-3) == (1e-3,)
    # separable blobs: every strength scores 1.0 on val/, and the tie keeps the parent's
    x, y = _two_blobs(np.random.default_rng(2), 200, 200)
    x[y == 1] += 20
    fit = fit_head((x, y), (x, y), ("a", "b"), np.array([1.0, 1.0]), no_stronger_than(1e-2))
    assert set(fit.val_macro_f1.values()) == {1.0}
    assert fit.l2 == 1e-2 and list(fit.val_macro_f1) == [1e-2, 3e-3, 1e-3]


def test_bootstrap_intervals_cover_the_estimate_and_pair_the_images():
    labels = np.repeat(np.arange(4), 250)
    perfect = intervals(labels, labels, 4, [3])
    assert perfect["macro_f1"].low == perfect["macro_f1"].high == 1.0
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random(1000) < 0.7, labels, (labels + 1) % 4)
    scores = intervals(labels, noisy, 4, [3])
    recall = scores["minority_recall"]
    assert recall.low < recall.estimate < recall.high and recall.high - recall.low < 0.15
    assert recall.estimate == pytest.approx((noisy[labels == 3] == 3).mean())
    fixed = np.where(labels == 3, 3, noisy)  # the same errors except class 3's
    delta = paired_difference(labels, noisy, fixed, 4, [3])
    assert delta["minority_recall"].low > 0.2  # far clearer than two separate intervals
    assert delta["minority_recall"].estimate == pytest.approx(1 - recall.estimate)


def _scenario(root: Path, pool_suffix: str = ".jpg") -> Path:
    for split in ("train", "val", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
    (root / "pool").mkdir()
    for i in range(3):
        Image.new("RGB", (12, 9), (i, 0, 0)).save(root / "pool" / f"p{i}{pool_suffix}")
    (root / "pool_labels.csv").write_text("file,label\n" + "".join(
        f"p{i}{pool_suffix},{'cat' if i else 'dog'}\n" for i in range(3)))
    return root


def test_scenario_of_any_image_format_and_its_clear_errors(tmp_path):
    root = _scenario(tmp_path / "photos")
    check_layout(root)
    assert [(p.name, label) for p, label in read_pool(root)] == [
        ("p0.jpg", "dog"), ("p1.jpg", "cat"), ("p2.jpg", "cat")]
    (root / "pool_labels.csv").write_text("file,label\np0.jpg,dog\np1.jpg,horse\n")
    with pytest.raises(ScenarioError, match="no line in"):
        read_pool(root)
    (root / "pool_labels.csv").write_text("file,label\np0.jpg,dog\np1.jpg,horse\np2.jpg,cat\n")
    with pytest.raises(ScenarioError, match=r"classes train/ does not have: \['horse'\]"):
        read_pool(root)
    shutil.rmtree(root / "val" / "dog")
    with pytest.raises(ScenarioError, match="lacks the classes"):
        check_layout(root)
    with pytest.raises(ScenarioError, match="no train/ folder"):
        check_layout(tmp_path / "nothing")


def test_demo_splits_a_small_pool_over_the_rounds_or_refuses_up_front():
    assert stream_sizes(2145, DemoConfig(rounds=3, budget=60)) == 715
    assert stream_sizes(7030, DemoConfig(rounds=3, budget=60, stream_per_round=1500)) == 1500
    with pytest.raises(ValueError, match="pass --stream-per-round 715 or less"):
        stream_sizes(2145, DemoConfig(rounds=3, budget=60, stream_per_round=1500))
    with pytest.raises(ValueError, match="fewer than the budget"):
        stream_sizes(100, DemoConfig(rounds=3, budget=60))
