import math
import threading
from collections import Counter

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from visionloop.trainer.calibration import fit_temperature
from visionloop.trainer.data import loader_workers
from visionloop.trainer.imbalance import (
    LogitAdjustedLoss,
    build_loss,
    class_balanced_weights,
    oversampling_weights,
)
from visionloop.trainer.metrics import classification_report, expected_calibration_error
from visionloop.trainer.optim import lr_factor, parameter_groups
from visionloop.trainer.sampling import EpochSampler


def test_class_balanced_weights_favour_rare_classes():
    weights = class_balanced_weights([1000, 100, 10])
    assert weights[0] < weights[1] < weights[2]
    assert weights.mean().item() == pytest.approx(1.0)


def test_logit_adjusted_loss_is_cross_entropy_on_prior_shifted_logits():
    counts = [900, 90, 10]
    logits, targets = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    expected = F.cross_entropy(logits + torch.tensor(counts).float().div(1000).log(), targets)
    assert LogitAdjustedLoss(counts)(logits, targets).item() == pytest.approx(expected.item())
    # The adjustment makes a rare class cheaper to predict wrongly at train time, so its
    # raw logit has to grow: the loss for a rare target is larger than plain CE.
    rare = torch.zeros(1, 3), torch.tensor([2])
    assert LogitAdjustedLoss(counts)(*rare) > F.cross_entropy(*rare)


def test_build_loss_rejects_unknown_method_and_empty_class():
    with pytest.raises(ValueError, match="unknown imbalance method 'focal'"):
        build_loss("focal", [1, 2])
    with pytest.raises(ValueError, match="at least one training image"):
        build_loss("logit_adjust", [5, 0])


def test_oversampling_draws_classes_evenly():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    sampler = EpochSampler(len(labels), seed=0,
                           weights=oversampling_weights(labels, [900, 90, 10]))
    drawn = Counter(labels[i] for i in sampler)
    assert all(250 < drawn[c] < 420 for c in range(3)), drawn


def test_sampler_shards_are_disjoint_and_cover_the_data():
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to equal length
    assert set().union(*shards) == set(range(10))
    everything = shards[0] + shards[1] + shards[2]
    assert len(everything) - len(set(everything)) == 2  # only the padding repeats
    sampler = EpochSampler(10, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(first) == list(range(10))


def test_no_weight_decay_on_norms_and_biases_and_lower_backbone_lr():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = parameter_groups(model, "3.", lr=1.0, backbone_lr_scale=0.1, weight_decay=0.05)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model[0].weight)]["weight_decay"] == 0.05
    assert by_param[id(model[0].weight)]["lr"] == pytest.approx(0.1)
    assert by_param[id(model[1].weight)]["weight_decay"] == 0.0
    assert by_param[id(model[3].bias)]["weight_decay"] == 0.0
    assert by_param[id(model[3].weight)]["lr"] == 1.0
    assert len(by_param) == len(list(model.parameters()))


def test_warmup_then_cosine_and_step():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(10 + 32, 100, 10, "step") == pytest.approx(1.0)  # decays every 100 // 3
    assert lr_factor(10 + 33, 100, 10, "step") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(50, 100, 10, "linear")


def test_report_matches_hand_computed_values():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 1, 0])
    report = classification_report(F.one_hot(preds, 3).float(), labels, ("a", "b", "c"))
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class"]["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert report["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["c"]["f1"] == 0.0
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert report["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 5, generator=generator) * 2
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)
    overconfident = true_logits * 3.0  # a model whose logits are 3x too sharp
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    before = expected_calibration_error(overconfident.softmax(1), labels)
    after = expected_calibration_error((overconfident / temperature).softmax(1), labels)
    assert after < before / 3 and after < 0.02
    assert math.isfinite(temperature)


def test_temperature_on_a_handful_of_val_images_stays_near_one():
    # 5 val images, one confidently wrong: the likelihood alone wants T ~ 30 (near-uniform
    # probabilities: every prediction would be captured); the prior keeps it sane
    logits = torch.tensor([[8.0, 0, 0], [0, 8.0, 0], [0, 0, 8.0], [8.0, 0, 0], [8.0, 0, 0]])
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert 1.0 < fit_temperature(logits, labels) < 3.0


# Held by another thread of the parent while the workers start, as a connection pool's or a
# progress bar's lock can be. A forked worker would inherit it locked, for ever.
_PARENT_LOCK = threading.Lock()


class _NeedsTheLock(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        if not _PARENT_LOCK.acquire(timeout=5):
            raise RuntimeError("a lock held by another thread of the parent is locked here")
        _PARENT_LOCK.release()
        return i


def test_loader_workers_do_not_inherit_a_lock_another_thread_holds():
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _PARENT_LOCK:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        loader = DataLoader(_NeedsTheLock(), batch_size=2, **loader_workers(1))
        assert next(iter(loader)).tolist() == [0, 1]
    finally:
        release.set()
        holder.join()
    assert loader_workers(0) == {"num_workers": 0}
