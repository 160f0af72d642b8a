"""The trainer's configuration: one frozen dataclass; file defaults, CLI flags override."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from visionloop.core.errors import InputError

# The option vocabularies live here, with the config, so that reading or validating a
# config (and building the CLI's parser) needs no torch; the modules that implement them
# import these names.
AUGMENT_PRESETS = ("none", "light", "standard", "strong")
IMBALANCE_METHODS = ("none", "oversample", "class_balanced", "logit_adjust")
LEARNERS = ("auto", "finetune", "head")
TUNE_MODES = ("all", "last_blocks", "norms_biases")
# What `--learner auto` tries, cheapest first (seconds on long-tailed Fashion-MNIST: 7, 45,
# 82, 112, 119, 118), each as the options it sets on top of the user's (trainer/selection.py
# picks one on val/). `init_from`: start from that candidate's trained model (linear probe,
# then fine-tune: LP-FT, Kumar et al., ICLR 2022) instead of a fresh head. Costs and scores:
# bench/learners.py.
CANDIDATES: dict[str, dict] = {
    # the pretrained Lite0 frozen, a logit-adjusted linear head on its last block
    "head": {"learner": "head", "arch": "efficientnet_lite0"},
    # the same, on the pooled features of every stage from stride 8 on
    "multiblock_head": {"learner": "head", "arch": "efficientnet_lite0_multiblock"},
    # the same at 96 px: the pretrained features carry more at a size nearer ImageNet's
    # (long-tailed Fashion-MNIST, 3 seeds: test macro-F1 +0.010 to +0.015 over 64 px, minority
    # recall +0.008 to +0.029), for ~2.3x the embedding time
    "multiblock_head_96": {"learner": "head", "arch": "efficientnet_lite0_multiblock",
                           "image_size": 96},
    # a 66k-parameter CNN from scratch at 32 px, logit-adjusted loss, light augmentation
    "small_cnn": {"learner": "finetune", "arch": "small_cnn", "weights": "none",
                  "image_size": 32, "epochs": 10, "freeze_epochs": 0, "lr": 3e-3,
                  "tune": "all"},
    # parameter-efficient: only norms' scales and shifts and the biases of the whole
    # backbone, and the head (BitFit-like; LIFT, ICML 2024: light tuning keeps the tail)
    "norms_biases": {"learner": "finetune", "arch": "efficientnet_lite0_multiblock",
                     "tune": "norms_biases", "epochs": 3, "freeze_epochs": 0, "lr": 3e-4,
                     "backbone_lr_scale": 3.0, "init_from": "multiblock_head"},
    # multiblock_head's model with its last four blocks fine-tuned (augmented, warm-up +
    # cosine, logit-adjusted loss, a small lr: the probe's head is already fit); every
    # norm keeps its statistics (tune != all)
    "partial_finetune": {"learner": "finetune", "arch": "efficientnet_lite0_multiblock",
                         "tune": "last_blocks", "epochs": 3, "freeze_epochs": 0, "lr": 3e-4,
                         "backbone_lr_scale": 1.0, "init_from": "multiblock_head"},
}
# Which candidate auto takes when val/ cannot tell them apart (trainer/selection.py): their
# mean rank of test macro-F1 over bench/learners.py's 6 scenarios x 3 seeds (at 0495188:
# 1.3, 2.6, 3.1, 3.1, 5.0, 5.9); a tie goes to the cheaper.
PREFERENCE = ("multiblock_head_96", "partial_finetune", "multiblock_head", "norms_biases",
              "head", "small_cnn")
DEFAULT_ARCH = "efficientnet_lite0"
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step")
CHOICES = {"augment": AUGMENT_PRESETS, "imbalance": IMBALANCE_METHODS, "optimizer": OPTIMIZERS,
           "learner": LEARNERS, "tune": TUNE_MODES, "schedule": SCHEDULES,
           "on_corrupt": ("fail", "skip"), "device": ("auto", "cuda", "cpu")}


@dataclass(frozen=True)
class TrainConfig:
    # a folder of class folders (<class>/*.jpg: split into train/val/test here, by
    # split_seed), or one already split: train/<class>/... and optionally val/ and test/
    data: str
    # more labelled ImageFolder trees (e.g. pulled labels) added to train/; any subset of
    # train/'s classes
    extra_train: tuple[str, ...] = ()
    # at most this many train/ images per class (a seeded random subset): fast warm-start
    # fine-tunes that replay part of the base data next to new labels; None = all
    base_per_class: int | None = None
    test_per_class: int | None = None  # cap test/ images per class (faster reports); None = all
    out: str = "model_store"  # model_store root; the new version lands in out/<name>/vN
    name: str = "classifier"  # the model's name: its folder in the store, its URL in TorchServe
    arch: str = DEFAULT_ARCH  # or any torchvision classification model name (head, finetune)
    # auto: train each of `candidates` within `budget_s` and keep the best on val/
    # (trainer/selection.py); finetune: train backbone (what `tune` says) and head (epochs,
    # lr, augment...); head: keep the backbone frozen and re-fit only the linear head on
    # cached embeddings (trainer/head.py: seconds on a CPU; a warm start keeps its parent's
    # logit-adjustment prior)
    learner: str = "auto"
    candidates: tuple[str, ...] = tuple(CANDIDATES)  # auto: what it tries, in this order
    # auto: a candidate whose estimated cost does not fit in what is left is skipped (the
    # first always runs). 15 min: every candidate on ~7k 28 px images on 2 CPU cores
    budget_s: float = 900.0
    tune: str = "all"  # finetune: all | last_blocks | norms_biases of the backbone
    last_blocks: int = 4  # tune=last_blocks: this many of the backbone's last blocks
    # head: L2; None = chosen on val/ (L2_GRID; a warm start: its parent's or a weaker one)
    head_l2: float | None = None
    embedding_cache: str = "runs/embeddings"  # head: embeddings by image sha256 + backbone
    weights: str = "DEFAULT"  # DEFAULT | none | path to a state_dict file
    parent: str | None = None  # warm start from out/<name>/<parent> (e.g. "v3") or "latest"
    image_size: int = 64  # frozen Lite0 at 64 px: macro-F1 0.79 vs 0.75 at 32; 224 for photos
    crop_pct: float = 1.0  # resize = image_size / crop_pct before the centre crop
    augment: str = "light"  # finetune: the training images' random crops, flips, colour jitter
    epochs: int = 8  # bench/imbalance.py: 8 clearly beats 4 at 32 px
    freeze_epochs: int = 1  # train only the head for this many epochs first
    batch_size: int = 64  # images per training step
    optimizer: str = "adamw"  # finetune: the optimiser
    lr: float = 2e-3  # the head's learning rate
    backbone_lr_scale: float = 0.25  # backbone lr = lr * this once unfrozen
    weight_decay: float = 0.05  # not applied to norm weights and biases
    schedule: str = "cosine"  # finetune: the learning rate's decay after the warm-up
    warmup_epochs: float = 0.3  # finetune: epochs of linear learning-rate warm-up
    label_smoothing: float = 0.0  # finetune: the loss's label smoothing
    imbalance: str = "logit_adjust"  # best minority recall at equal macro-F1 in bench/imbalance.py
    minority: tuple[str, ...] = ()  # classes reported as minority; () = detected from counts
    early_stop_patience: int = 3  # epochs without a better val macro-F1
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    channels_last: bool = False  # NHWC memory layout (faster convolutions on some GPUs)
    onnx_fp16: bool = False  # also export model.fp16.onnx (for GPU hosts)
    device: str = "auto"  # auto: CUDA where there is a GPU, else the CPU
    num_workers: int = 1  # data-loading processes (0: in the training process)
    seed: int = 0  # seeds the weights' init, sampling and augmentation
    on_corrupt: str = "fail"  # fail | skip unreadable images
    # the share of each class held out as val/: from train/ when there is no val/, or from
    # a folder of class folders
    val_fraction: float = 0.15
    test_fraction: float = 0.15  # the share of each class held out as test/ (class folders)
    # orders the split of a folder of class folders: a retrain keeps its champion's, so the
    # gate scores on the same val/
    split_seed: int = 0
    work_dir: str | None = None  # checkpoints; default runs/<name>
    resume: bool = False  # continue from work_dir/last.pt
    show_progress: bool = True  # a progress bar per epoch

    def __post_init__(self) -> None:
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise InputError(f"{key} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, key)!r}")
        positive = ("image_size", "epochs", "batch_size", "lr")
        for key in positive:
            if not getattr(self, key) > 0:
                raise InputError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise InputError(f"val_fraction and test_fraction must be in (0, 1) with a sum "
                             f"below 1, got {self.val_fraction} and {self.test_fraction}")
        if not 0 < self.crop_pct <= 1:
            raise InputError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.learner == "auto" and self.arch != DEFAULT_ARCH:
            raise InputError(f"--arch {self.arch} needs --learner head or finetune: the "
                             "candidates of --learner auto set their own architectures")
        unknown = sorted(set(self.candidates) - set(CANDIDATES))
        if unknown or not self.candidates:
            raise InputError(f"candidates must be some of {', '.join(CANDIDATES)}, "
                             f"got {list(self.candidates)}")
        if not 0 <= self.freeze_epochs <= self.epochs:
            raise InputError(f"freeze_epochs must be in [0, epochs], got {self.freeze_epochs}")

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
            raise InputError(f"config file {file} must hold a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
    required = [f.name for f in fields(TrainConfig)
                if f.default is MISSING and f.name not in values]
    if required:
        raise InputError(f"missing required option(s): {required}")
    for f in fields(TrainConfig):  # lists: comma-separated on the command line
        items = values.get(f.name)
        if str(f.type).startswith("tuple") and isinstance(items, (list, str)):
            values[f.name] = tuple(items.split(",") if isinstance(items, str) else items)
    return TrainConfig(**values)
