"""The trainer's configuration: one frozen dataclass; file defaults, CLI flags override."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

# The option vocabularies live here, with the config, so that reading or validating a
# config (and building the CLI's parser) needs no torch; the modules that implement them
# import these names.
AUGMENT_PRESETS = ("none", "light", "standard", "strong")
IMBALANCE_METHODS = ("none", "oversample", "class_balanced", "logit_adjust")
LEARNERS = ("finetune", "head")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")


@dataclass(frozen=True)
class TrainConfig:
    data: str  # ImageFolder root holding train/ and optionally val/ and test/
    # more labelled ImageFolder trees (e.g. pulled labels) added to train/; any subset of
    # train/'s classes
    extra_train: tuple[str, ...] = ()
    # at most this many train/ images per class (a seeded random subset): fast warm-start
    # fine-tunes that replay part of the base data next to new labels; None = all
    base_per_class: int | None = None
    test_per_class: int | None = None  # cap test/ images per class (faster reports); None = all
    out: str = "model_store"  # model_store root; the new version lands in out/<name>/vN
    name: str = "classifier"
    arch: str = "efficientnet_lite0"  # or any torchvision classification model name
    # finetune: train backbone and head (epochs, lr, augment...); head: keep the backbone
    # frozen and re-fit only the linear head on cached embeddings (trainer/head.py: seconds
    # on a CPU; a warm start keeps its parent's logit-adjustment prior)
    learner: str = "head"  # bench/learners.py: head 0.795 / 0.717 against finetune 0.764 / 0.584
    head_l2: float | None = None  # head: L2; None = the parent's, else chosen on val/ (L2_GRID)
    embedding_cache: str = "runs/embeddings"  # head: embeddings by image sha256 + backbone
    weights: str = "DEFAULT"  # DEFAULT | none | path to a state_dict file
    parent: str | None = None  # warm start from out/<name>/<parent> (e.g. "v3") or "latest"
    image_size: int = 64  # frozen Lite0 at 64 px: macro-F1 0.79 vs 0.75 at 32; 224 for photos
    crop_pct: float = 1.0  # resize = image_size / crop_pct before the centre crop
    augment: str = "light"
    epochs: int = 8  # bench/imbalance.py: 8 clearly beats 4 at 32 px
    freeze_epochs: int = 1  # train only the head for this many epochs first
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 2e-3  # the head's learning rate
    backbone_lr_scale: float = 0.25  # backbone lr = lr * this once unfrozen
    weight_decay: float = 0.05  # not applied to norm weights and biases
    schedule: str = "cosine"
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.0
    imbalance: str = "logit_adjust"  # best minority recall at equal macro-F1 in bench/imbalance.py
    minority: tuple[str, ...] = ()  # classes reported as minority; () = detected from counts
    early_stop_patience: int = 3  # epochs without a better val macro-F1
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = False
    onnx_fp16: bool = False  # also export model.fp16.onnx (for GPU hosts)
    device: str = "auto"
    num_workers: int = 1
    seed: int = 0
    on_corrupt: str = "fail"  # fail | skip unreadable images
    val_fraction: float = 0.1  # of train/, held out when there is no val/
    work_dir: str | None = None  # checkpoints; default runs/<name>
    resume: bool = False  # continue from work_dir/last.pt
    show_progress: bool = True

    def __post_init__(self) -> None:
        choices = {"augment": AUGMENT_PRESETS, "imbalance": IMBALANCE_METHODS,
                   "optimizer": OPTIMIZERS, "learner": LEARNERS,
                   "schedule": SCHEDULES, "on_corrupt": ("fail", "skip"),
                   "device": ("auto", "cuda", "cpu")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, key)!r}")
        positive = ("image_size", "epochs", "batch_size", "lr")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if not 0 <= self.freeze_epochs <= self.epochs:
            raise ValueError(f"freeze_epochs must be in [0, epochs], got {self.freeze_epochs}")

    @property
    def resize(self) -> int:
        return round(self.image_size / self.crop_pct)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.work_dir or Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Dataclass defaults < YAML/JSON file < overrides (CLI flags that were given)."""
    values: dict[str, Any] = {}
    if file:
        loaded = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {file} must hold a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    required = [f.name for f in fields(TrainConfig)
                if f.default is MISSING and f.name not in values]
    if required:
        raise ValueError(f"missing required option(s): {required}")
    for f in fields(TrainConfig):  # lists: comma-separated on the command line
        items = values.get(f.name)
        if str(f.type).startswith("tuple") and isinstance(items, (list, str)):
            values[f.name] = tuple(items.split(",") if isinstance(items, str) else items)
    return TrainConfig(**values)
