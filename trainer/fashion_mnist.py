"""Build the long-tailed Fashion-MNIST scenario from the Debian package's real files.

train/ has the minority classes cut to 1/R, val/ and test/ are balanced and come from
the official test set, and pool/ is an unlabeled stream (as long-tailed as train unless
asked otherwise) whose true labels are kept aside in pool_labels.csv for simulation.
"""

from __future__ import annotations

import csv
import gzip
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visionloop.core.fsutil import atomic_write_json
from visionloop.trainer.data import DataError

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# Folder-safe names of the ten classes, in label order ("T-shirt/top" has a slash).
CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip


@dataclass(frozen=True)
class ScenarioConfig:
    out: Path
    minority: tuple[str, ...]
    imbalance_ratio: float = 100.0  # majority/minority count ratio in train/
    pool_imbalance_ratio: float | None = None  # None: as long-tailed as train/
    train_per_class: int = 1000  # images of each majority class in train/
    pool_per_class: int = 1000  # images of each majority class in pool/
    val_per_class: int = 100
    test_per_class: int = 500
    seed: int = 0
    source_dir: Path = DEBIAN_DIR


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into a uint8 array."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise DataError(
            f"{path} not found: install the Debian package dataset-fashion-mnist "
            "(make setup does it)"
        ) from exc
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def parse_minority(spec: str) -> tuple[str, ...]:
    """'coat,5' -> ('coat', 'sandal'): names or label indices, comma separated."""
    names = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.isdigit() and int(item) < len(CLASSES):
            names.append(CLASSES[int(item)])
        elif item in CLASSES:
            names.append(item)
        else:
            raise DataError(f"unknown class {item!r}; choose from {', '.join(CLASSES)} or 0-9")
    if not names:
        raise DataError("--minority needs at least one class")
    return tuple(dict.fromkeys(names))


def per_class_counts(per_class: int, minority: tuple[str, ...], ratio: float) -> list[int]:
    if ratio < 1:
        raise DataError(f"imbalance ratio must be >= 1, got {ratio}")
    minority_count = max(1, round(per_class / ratio))
    return [minority_count if c in minority else per_class for c in CLASSES]


def take_per_class(
    labels: np.ndarray, counts: list[int], available: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw counts[c] indices of each class c from the `available` mask, marking them used."""
    chosen = []
    for label, count in enumerate(counts):
        candidates = np.flatnonzero((labels == label) & available)
        if count > len(candidates):
            raise DataError(
                f"class {CLASSES[label]} needs {count} images but only {len(candidates)} are left"
            )
        picked = rng.choice(candidates, size=count, replace=False)
        available[picked] = False
        chosen.append(picked)
    return np.concatenate(chosen)


def write_split(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                source: str) -> None:
    for idx in indices:
        class_dir = root / CLASSES[labels[idx]]
        class_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[idx], mode="L").save(class_dir / f"{source}-{idx:05d}.png")


def write_pool(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
               source: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for idx in indices:
        name = f"{source}-{idx:05d}.png"
        Image.fromarray(images[idx], mode="L").save(root / name)
        rows.append((name, CLASSES[labels[idx]]))
    with open(root.parent / "pool_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(rows)


def build_scenario(config: ScenarioConfig) -> dict:
    """Write train/, val/, test/, pool/, pool_labels.csv and scenario.json under config.out.

    Everything is written to a hidden sibling directory first and renamed at the end, so
    an interrupted build leaves no half-made scenario behind.
    """
    final = Path(config.out)
    if final.exists():
        raise DataError(f"{final} already exists; choose a new --out directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        summary = _write_scenario(config, out)
        out.rename(final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("wrote %s", final)
    return summary


def _write_scenario(config: ScenarioConfig, out: Path) -> dict:
    # One generator per source file: val/test are the same whatever the train/pool settings,
    # so a balanced and a long-tailed scenario with one seed share their evaluation images.
    train_rng = np.random.default_rng([config.seed, 0])
    test_rng = np.random.default_rng([config.seed, 1])
    src = Path(config.source_dir)
    train_x, train_y = read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(
        src / "train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(
        src / "t10k-labels-idx1-ubyte.gz")

    pool_ratio = config.pool_imbalance_ratio or config.imbalance_ratio
    train_counts = per_class_counts(config.train_per_class, config.minority, config.imbalance_ratio)
    pool_counts = per_class_counts(config.pool_per_class, config.minority, pool_ratio)
    free_train = np.ones(len(train_y), dtype=bool)
    free_test = np.ones(len(test_y), dtype=bool)
    splits = {
        "train": take_per_class(train_y, train_counts, free_train, train_rng),
        "pool": take_per_class(train_y, pool_counts, free_train, train_rng),
        "val": take_per_class(test_y, [config.val_per_class] * len(CLASSES), free_test, test_rng),
        "test": take_per_class(test_y, [config.test_per_class] * len(CLASSES), free_test, test_rng),
    }
    write_split(out / "train", train_x, train_y, splits["train"], "train")
    write_split(out / "val", test_x, test_y, splits["val"], "t10k")
    write_split(out / "test", test_x, test_y, splits["test"], "t10k")
    write_pool(out / "pool", train_x, train_y, splits["pool"], "train")

    summary = {
        "dataset": "fashion-mnist",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "classes": list(CLASSES),
        "minority": list(config.minority),
        "counts": {
            "train": dict(zip(CLASSES, train_counts, strict=True)),
            "pool": dict(zip(CLASSES, pool_counts, strict=True)),
            "val": config.val_per_class * len(CLASSES),
            "test": config.test_per_class * len(CLASSES),
        },
    }
    atomic_write_json(out / "scenario.json", summary)
    log.info("%d train, %d pool, %d val, %d test images",
             *(len(splits[s]) for s in ("train", "pool", "val", "test")))
    return summary
