"""The gate at its default margins, on real models: a challenger re-fit on more right labels
is promoted, one re-fit on wrong labels is kept out.

The other retrain tests widen the margins or switch them off (their val/ sets are too small
for the defaults to tell a 2-epoch fine-tune from its champion); here val/ has 600 images
and the champion learnt from 30 images a class (3 of each rare class), so what 400 labels
are worth shows beyond the noise. Real Fashion-MNIST, the pretrained Lite0 backbone frozen,
its linear head re-fit as the loop's retrain does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_retrain import write_labels
from visionloop.configs import RetrainConfig
from visionloop.core.model_store import ModelStore
from visionloop.core.registry import Registry
from visionloop.retrain import retrain_once
from visionloop.trainer import fashion_mnist
from visionloop.trainer.config import TrainConfig
from visionloop.trainer.train import run_training

pytestmark = pytest.mark.quality
MINORITY = ("coat", "sandal", "bag")


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(scenario, model store with the champion v1, embedding cache) shared read-only: each
    test retrains in its own copy of the store."""
    root = tmp_path_factory.mktemp("gate-defaults")
    data = root / "data"
    fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(
        out=data, minority=MINORITY, imbalance_ratio=10, train_per_class=30,
        pool_per_class=40, pool_imbalance_ratio=1, val_per_class=60, test_per_class=10,
        seed=0))
    cache = root / "embeddings"
    run_training(TrainConfig(data=str(data), out=str(root / "store"), name="fm",
                             learner="head", image_size=32,  # 4x fewer pixels to embed
                             minority=MINORITY, embedding_cache=str(cache),
                             work_dir=str(root / "work"), show_progress=False))
    return data, root / "store", cache


def retrain_on(champion_store: tuple[Path, Path, Path], tmp_path: Path, wrong: bool):
    data, shared_store, cache = champion_store
    store = tmp_path / "store"
    shutil.copytree(shared_store, store)
    labels = tmp_path / "labels"
    count = write_labels(labels, data, wrong=wrong)
    # the champion's head re-fit on train/ + the labels ("head": with 20x the champion's
    # images, the default learner would re-select among every candidate, minutes longer);
    # the gate's margins are RetrainConfig's defaults
    cfg = RetrainConfig(name="fm", store=store, data=data, labels_dir=labels, pull=False,
                        learner="head", embedding_cache=cache, work_dir=tmp_path / "work")
    assert (cfg.max_macro_f1_drop, cfg.max_minority_recall_drop) == (0.01, 0.03)
    decision = retrain_once(cfg)
    assert decision is not None and decision.new_labels == count
    gate = decision.gate
    print(f"\n{'wrong' if wrong else 'right'} labels: {decision.reason}; macro-F1 "
          f"{gate['delta_macro_f1']}, minority recall {gate['delta_minority_recall']}")
    return decision, Registry(ModelStore(store), "fm").champion()


def test_a_challenger_on_more_right_labels_is_promoted(champion_store, tmp_path):
    decision, champion = retrain_on(champion_store, tmp_path, wrong=False)
    assert decision.promoted, decision.reason
    assert champion == decision.challenger != decision.champion
    # promoted because it is better, not merely within the margins
    assert decision.gate["delta_macro_f1"]["low"] > 0
    assert decision.gate["delta_minority_recall"]["low"] > 0


def test_a_challenger_on_wrong_labels_is_kept_out(champion_store, tmp_path):
    decision, champion = retrain_on(champion_store, tmp_path, wrong=True)
    assert not decision.promoted, decision.reason
    assert champion == decision.champion
    assert decision.gate["delta_macro_f1"]["high"] < 0  # worse beyond the noise, not a coin flip
