"""The train / val / test splits of a training job, from the data folder as the user has it.

Two layouts are accepted:
- split already: `train/<class>/...` with optional `val/` and `test/` (a missing val/ is a
  stratified share of train/; a missing test/ falls back to val/, reported as optimistic);
- one folder of class folders, `<class>/...`: split here, per class, by a seeded hash of each
  file's path. The same folder and seed give the same split every time (a retrain's gate
  sees the champion's val/), and adding images never moves an existing one to another split.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from visionloop.trainer.config import TrainConfig
from visionloop.trainer.data import (
    IMG_EXTENSIONS,
    DataError,
    ImageFolderIndex,
    dataset_fingerprint,
    scan_image_folder,
)

Samples = list[tuple[Path, int]]


@dataclass
class Splits:
    classes: tuple[str, ...]
    train: Samples
    val: Samples
    test: Samples
    test_split: str  # which folder the reported metrics come from
    calibration_split: str
    fingerprint: str
    train_counts: list[int] = field(default_factory=list)
    base_train: int = 0  # train[:base_train] is the base data, the rest extra_train's labels
    made: dict | None = None  # how the splits were made from class folders (the manifest's)


def hold_out(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Stratified split: a fraction of every class (at least one, if it has two) goes to val."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    keep, held = [], []
    for items in by_class.values():
        rng.shuffle(items)
        n_val = max(1, round(fraction * len(items))) if len(items) >= 2 else 0
        held += items[:n_val]
        keep += items[n_val:]
    return keep, held


def per_class_subset(samples: Samples, per_class: int | None, seed: int) -> Samples:
    if per_class is None:
        return samples
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    return [s for label in sorted(by_class)
            for s in rng.sample(by_class[label], min(per_class, len(by_class[label])))]


def is_class_folder_tree(root: Path) -> bool:
    """root holds class folders of images itself (not train/, val/, test/ splits)."""
    if any((root / split).is_dir() for split in ("train", "val", "test")):
        return False
    return any(p.is_dir() and not p.name.startswith(".")
               and any(f.suffix.lower() in IMG_EXTENSIONS for f in p.rglob("*"))
               for p in root.iterdir())


def split_by_hash(index: ImageFolderIndex, val_fraction: float, test_fraction: float,
                  seed: int) -> tuple[Samples, Samples, Samples]:
    """Per class: files ordered by sha256(seed, relative path); the first share is test, the
    next val, the rest train. Every class needs three images (one for each split)."""
    by_class: dict[int, Samples] = {}
    for sample in index.samples:
        by_class.setdefault(sample[1], []).append(sample)
    few = {index.classes[label]: len(items) for label, items in by_class.items() if len(items) < 3}
    if few:
        raise DataError(f"{index.root}: splitting into train/val/test needs at least 3 images "
                        f"per class; these have fewer: {few}",
                        hint="add images to them, or lay the folder out as train/ and val/ "
                             "yourself")

    def order(sample: tuple[Path, int]) -> str:
        rel = sample[0].relative_to(index.root).as_posix()
        return hashlib.sha256(f"{seed}:{rel}".encode()).hexdigest()

    train, val, test = [], [], []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=order)
        n_test = max(1, round(test_fraction * len(items)))
        n_val = max(1, round(val_fraction * len(items)))
        test += items[:n_test]
        val += items[n_test:n_test + n_val]
        train += items[n_test + n_val:]
    return train, val, test


def _made_record(cfg: TrainConfig, train: Samples, val: Samples, test: Samples) -> dict:
    val_files = "\n".join(sorted(p.relative_to(cfg.data).as_posix() for p, _ in val))
    return {"from": "class folders", "seed": cfg.split_seed,
            "fractions": {"val": cfg.val_fraction, "test": cfg.test_fraction},
            "counts": {"train": len(train), "val": len(val), "test": len(test)},
            "val_sha256": hashlib.sha256(val_files.encode()).hexdigest()}


def _base_splits(cfg: TrainConfig, root: Path, classes: tuple[str, ...] | None):
    """(train index, train, val, test, how val was made, how test was made, made record)."""
    if is_class_folder_tree(root):
        index = scan_image_folder(root, classes, cfg.on_corrupt)
        train, val, test = split_by_hash(index, cfg.val_fraction, cfg.test_fraction,
                                         cfg.split_seed)
        made = _made_record(cfg, train, val, test)
        share = f"split from the class folders (seed {cfg.split_seed})"
        return (index, [index], per_class_subset(train, cfg.base_per_class, cfg.seed), val,
                test, f"{cfg.val_fraction:.0%} {share}", f"{cfg.test_fraction:.0%} {share}",
                made)
    if not (root / "train").is_dir():
        raise DataError(f"{root} has neither a train/ folder nor class folders of images",
                        hint="give a folder of class folders (<class>/*.jpg), or one with "
                             "train/<class>/... and optional val/ and test/")
    index = scan_image_folder(root / "train", classes, cfg.on_corrupt)
    indexes = [index]
    base = per_class_subset(index.samples, cfg.base_per_class, cfg.seed)
    optional: dict[str, ImageFolderIndex | None] = {}
    for split in ("val", "test"):
        folder = root / split
        optional[split] = (scan_image_folder(folder, index.classes, cfg.on_corrupt)
                           if folder.is_dir() else None)
        indexes += [optional[split]] if optional[split] else []
    if optional["val"] is not None:
        train, val, val_split = base, optional["val"].samples, "val/"
    else:
        train, val = hold_out(base, cfg.val_fraction, cfg.seed)
        val_split = f"{cfg.val_fraction:.0%} of train/ held out"
    if optional["test"] is not None:
        test, test_split = optional["test"].samples, "test/"
    else:
        test, test_split = val, f"{val_split} (no test/ given: optimistic)"
    return index, indexes, train, val, test, val_split, test_split, None


def load_splits(cfg: TrainConfig, classes: tuple[str, ...] | None = None) -> Splits:
    root = Path(cfg.data)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder", hint="pass --data FOLDER of class folders")
    index, indexes, train, val, test, val_split, test_split, made = _base_splits(
        cfg, root, classes)
    classes = index.classes
    extra: Samples = []
    for tree in cfg.extra_train:
        extra_index = scan_image_folder(tree, classes, cfg.on_corrupt, subset=True)
        indexes.append(extra_index)
        extra += extra_index.samples
    base_train = len(train)
    train = train + extra  # new labels train; they never become val
    if cfg.test_per_class is not None:
        test = per_class_subset(test, cfg.test_per_class, cfg.seed)
        test_split += f", {cfg.test_per_class} per class"
    counts = [0] * len(classes)
    for _, label in train:
        counts[label] += 1
    return Splits(classes=classes, train=train, val=val, test=test, test_split=test_split,
                  calibration_split=val_split, fingerprint=dataset_fingerprint(indexes),
                  train_counts=counts, base_train=base_train, made=made)
