"""The loop's configurations, `visionloop retrain` and `visionloop demo`: frozen dataclasses
with no heavy imports, so the CLI builds its flags from their fields in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serving.capture import CAPTURE_BELOW, CAPTURES_PER_MINUTE


@dataclass(frozen=True)
class RetrainConfig:
    name: str = "fashion"
    store: Path = Path("model_store")
    data: Path = Path("data/fashion-mnist-lt")  # base ImageFolder: train/, val/, test/
    labels_dir: Path = Path("labels")  # what `visionloop label pull` writes
    capture_dir: Path = Path("captures")
    pull: bool = True  # pull from Label Studio first (off: use labels_dir as it is)
    min_new_labels: int = 20  # fewer new labels since the last attempt: do nothing
    # the challenger: a short warm-start fine-tune replaying part of the base data
    epochs: int = 2
    freeze_epochs: int = 0
    lr: float = 1e-3
    base_per_class: int | None = 300
    seed: int = 0
    # the gate
    max_macro_f1_drop: float = 0.005
    max_minority_recall_drop: float = 0.02
    eval_per_class: int | None = None  # cap test images per class (None: the whole test/)
    # promotion
    backend: str = "torchscript"
    capture_below: float = CAPTURE_BELOW
    capture_per_minute: int = CAPTURES_PER_MINUTE  # per TorchServe worker
    work_dir: Path = Path("runs/retrain")


@dataclass(frozen=True)
class DemoConfig:
    data: Path = Path("data/fashion-mnist-lt")
    out: Path = Path("runs/demo")
    name: str = "fashion"
    rounds: int = 3
    budget: int = 60  # labels per round, for the loop and for the random baseline alike
    stream_per_round: int = 1500  # pool images the application sends per round
    strategy: str = "class_balanced"
    image_size: int = 32
    champion_epochs: int = 4  # 3 left minority recall at 0.05; 8 (the trainer's default) +5 min
    retrain_epochs: int = 1
    base_per_class: int = 150  # base images per class replayed in each fine-tune
    eval_per_class: int = 100  # test images per class for the gate and the report
    champion: Path | None = None  # reuse a trained version dir instead of training one
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """Minutes on a small scenario: for tests."""
        values = dict(rounds=2, budget=12, stream_per_round=40, champion_epochs=1,
                      retrain_epochs=1, base_per_class=20, eval_per_class=20)
        values.update(overrides)
        return cls(**values)
