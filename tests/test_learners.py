"""The learners `--learner auto` chooses from, and how it chooses: the pick on val/ with
the paired bootstrap, what each fine-tune mode trains, and auto end to end on real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionloop.configs import RetrainConfig
from visionloop.core.manifest import ModelManifest
from visionloop.retrain import challenger_learner
from visionloop.trainer.config import CANDIDATES, TrainConfig
from visionloop.trainer.engine import train_one_epoch
from visionloop.trainer.models import (
    LITE0_MULTIBLOCK,
    backbone_blocks,
    build_model,
    set_backbone_trainable,
)
from visionloop.trainer.optim import build_scheduler
from visionloop.trainer.selection import CandidateScore, choose
from visionloop.trainer.train import run_training

PARITY_TOLERANCE = 1e-4


def _predictions(labels: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """labels with the images at `wrong` predicted as the next class."""
    predicted = labels.copy()
    predicted[wrong] = (labels[wrong] + 1) % 3
    return predicted


def test_a_candidate_as_good_within_the_noise_that_finds_the_rare_class_is_picked():
    labels = np.repeat([0, 1, 2], 200)  # class 2 is the minority one
    rng = np.random.default_rng(0)
    common = rng.choice(400, 80, replace=False)  # both miss these majority images
    first = _predictions(labels, np.concatenate([common, np.arange(400, 460)]))  # 60 rare missed
    second = _predictions(labels, np.concatenate([common, np.arange(400, 430), [0, 1, 2, 3]]))
    worse = _predictions(labels, np.arange(0, 600, 2))  # half of everything wrong
    scores = [CandidateScore("first", first, 1.0), CandidateScore("second", second, 2.0),
              CandidateScore("worse", worse, 0.5)]
    picked, table = choose(labels, scores, 3, [2])
    assert picked == "second"
    assert table["second"]["contender"] and not table["worse"]["contender"]
    assert table["worse"]["val_macro_f1_minus_best"]["high"] < 0
    assert table["second"]["val_minority_recall"]["estimate"] > \
        table["first"]["val_minority_recall"]["estimate"]


def test_among_candidates_val_cannot_tell_apart_the_preferred_one_is_picked():
    labels = np.repeat([0, 1, 2], 200)  # class 2 is the minority one
    ahead = _predictions(labels, np.arange(0, 600, 30))  # 20 wrong, 7 of them rare
    # 24 others wrong: a lead of val/'s noise, not beyond it
    preferred = _predictions(labels, np.arange(15, 600, 25))
    scores = [CandidateScore("ahead", ahead, 1.0), CandidateScore("preferred", preferred, 1.0)]
    picked, table = choose(labels, scores, 3, [2], preference=("preferred", "ahead"))
    assert picked == "preferred" and table["preferred"]["contender"]
    assert table["ahead"]["val_macro_f1"]["estimate"] > \
        table["preferred"]["val_macro_f1"]["estimate"]
    assert choose(labels, scores, 3, [2])[0] == "ahead"  # no preference: training order


def test_a_preferred_candidate_worse_beyond_the_noise_is_not_picked():
    labels = np.repeat([0, 1, 2], 200)  # class 2 is the minority one
    good = _predictions(labels, np.arange(0, 400, 8))  # 50 majority images wrong
    worse_overall = _predictions(labels, np.arange(0, 600, 4))  # 150 wrong
    # better macro-F1 (no majority image wrong) but 40 of the 200 rare ones missed
    misses_the_rare = _predictions(labels, np.arange(400, 440))
    scores = [CandidateScore("good", good, 1.0), CandidateScore("worse", worse_overall, 1.0),
              CandidateScore("misses", misses_the_rare, 1.0)]
    picked, table = choose(labels, scores, 3, [2], preference=("worse", "misses", "good"))
    assert picked == "good"
    assert table["worse"]["val_macro_f1_minus_best"]["high"] < 0
    assert table["misses"]["val_macro_f1"]["estimate"] > table["good"]["val_macro_f1"]["estimate"]
    assert table["misses"]["val_minority_recall_minus_best"]["high"] < 0
    assert not table["worse"]["contender"] and not table["misses"]["contender"]


def test_without_minority_classes_the_best_macro_f1_is_picked():
    labels = np.repeat([0, 1, 2], 100)
    scores = [CandidateScore("a", _predictions(labels, np.arange(0, 300, 3)), 1.0),
              CandidateScore("b", _predictions(labels, np.arange(0, 300, 10)), 1.0)]
    assert choose(labels, scores, 3, [])[0] == "b"


def test_fine_tune_modes_train_what_they_say():
    built = build_model(LITE0_MULTIBLOCK, 4, "none")
    model, head = built.model, built.head_prefix
    blocks = backbone_blocks(model, head)
    assert blocks[-4:] == ["backbone.blocks.5", "backbone.blocks.6", "backbone.conv_head",
                           "backbone.bn2"] and blocks[0] == "backbone.conv_stem"
    set_backbone_trainable(model, head, True, "last_blocks", 4)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.blocks.6.") for n in trained) and "head.weight" in trained
    assert not any(n.startswith(("backbone.blocks.4.", "backbone.conv_stem")) for n in trained)
    set_backbone_trainable(model, head, True, "norms_biases")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.bn1.weight" in trained and "head.weight" in trained
    assert not any(n.endswith("conv_pw.weight") for n in trained)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < \
        0.05 * sum(p.numel() for p in model.parameters())
    set_backbone_trainable(model, head, False, "all")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight",
                                                                             "head.bias"}


def test_a_partial_tune_keeps_every_norm_statistic_and_moves_only_its_blocks():
    torch.manual_seed(0)
    built = build_model(LITE0_MULTIBLOCK, 3, "none")
    model = built.model
    set_backbone_trainable(model, built.head_prefix, True, "last_blocks", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))]
    train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(), optimizer,
                    build_scheduler(optimizer, 1, 0, "cosine"), torch.device("cpu"),
                    show_progress=False, freeze_all_norm_statistics=True)
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert any(k.startswith("backbone.conv_head.") for k in moved)
    assert "head.weight" in moved
    assert not any("running_" in k for k in moved)  # no batch norm saw the batch's statistics
    assert not any(k.startswith("backbone.blocks.0.") for k in moved)


@pytest.mark.slow
def test_auto_trains_the_candidates_picks_on_val_and_records_every_one(small_scenario, tmp_path,
                                                                       capsys):
    """Three candidates on real Fashion-MNIST: each scored on val/ and test/, timed, the
    pick published with its own architecture and exports; a retrain keeps its backbone
    until the data grows; a budget too small for the rest trains only the first."""
    from visionloop.cli import main as cli_main

    args = ["train", "--data", str(small_scenario), "--out", str(tmp_path / "store"),
            "--name", "auto", "--candidates", "head,multiblock_head,partial_finetune",
            "--num-workers", "0", "--no-show-progress", "--work-dir", str(tmp_path / "runs"),
            "--embedding-cache", str(tmp_path / "embeddings")]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    manifest = ModelManifest.load(tmp_path / "store" / "auto" / "v1")
    selection = manifest.metrics["selection"]
    rows = selection["candidates"]
    assert list(rows) == ["head", "multiblock_head", "partial_finetune"]
    picked = selection["picked"]
    for name, row in rows.items():
        # each learned the task: chance is 0.1 on ten classes; 0.77 to 0.83 here
        assert row["seconds"] > 0 and row["test_macro_f1"] > 0.5, (name, row)
        assert row["val_macro_f1"]["low"] <= row["val_macro_f1"]["estimate"]
        assert name in printed
    assert rows[picked]["contender"] and "picked" in printed
    assert manifest.metrics["learner"] == picked
    assert manifest.arch == CANDIDATES[picked]["arch"]
    assert manifest.training_config["learner"] == CANDIDATES[picked]["learner"]
    assert manifest.metrics["test"]["macro_f1"] == pytest.approx(rows[picked]["test_macro_f1"])
    assert manifest.artifacts["onnx"].max_abs_diff < PARITY_TOLERANCE
    assert manifest.artifacts["torchscript"].max_abs_diff < PARITY_TOLERANCE

    keep, why = challenger_learner(RetrainConfig(), manifest, new_labels=30)
    assert keep == "head" and picked in why
    images = selection["train_images"]
    assert challenger_learner(RetrainConfig(), manifest, new_labels=images)[0] == "auto"
    assert challenger_learner(RetrainConfig(learner="finetune"), manifest, 30)[0] == "finetune"

    hurried = ModelManifest.load(run_training(TrainConfig(
        data=str(small_scenario), out=str(tmp_path / "store"), name="hurried", budget_s=0.01,
        candidates=("head", "partial_finetune", "small_cnn"), num_workers=0,
        show_progress=False, work_dir=str(tmp_path / "runs2"),
        embedding_cache=str(tmp_path / "embeddings"))))
    rows = hurried.metrics["selection"]["candidates"]
    assert hurried.metrics["selection"]["picked"] == "head"
    assert "skipped" not in rows["head"]
    assert all("estimated" in rows[n]["skipped"] for n in ("partial_finetune", "small_cnn"))
