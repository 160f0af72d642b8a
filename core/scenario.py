"""A simulation scenario: labelled data laid out to rehearse the loop before deploying it.

    <root>/train/<class>/*   the labelled training set (an ImageFolder tree)
    <root>/val/<class>/*     held out: calibration and the retrain gate
    <root>/test/<class>/*    held out: the report
    <root>/pool/*            the "unlabeled" stream an application would send
    <root>/pool_labels.csv   file,label: the pool's true labels, kept aside for the
                             stand-in annotator

`visionloop data fashion-mnist` writes one; any image set laid out this way (any image
format, size, colour mode or class names) runs through `visionloop demo --scenario DIR`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from visionloop.core.errors import InputError

POOL_LABELS = "pool_labels.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ScenarioError(InputError):
    """A scenario folder that is not laid out as the module docstring says."""


def class_names(root: Path) -> tuple[str, ...]:
    train = Path(root) / "train"
    if not train.is_dir():
        raise ScenarioError(f"{root} has no train/ folder: a scenario needs train/, val/, "
                            f"test/, pool/ and {POOL_LABELS}")
    return tuple(sorted(p.name for p in train.iterdir()
                        if p.is_dir() and not p.name.startswith(".")))


def read_pool(root: Path) -> list[tuple[Path, str]]:
    """(image file, true label) for every image of root/pool/, sorted by file name."""
    root = Path(root)
    labels_file = root / POOL_LABELS
    if not labels_file.is_file():
        raise ScenarioError(f"{labels_file} is missing: it holds the pool's true labels "
                            "(a header line 'file,label', then one line per pool image)")
    with open(labels_file, newline="") as f:
        truth = {row["file"]: row["label"] for row in csv.DictReader(f)}
    files = sorted(p for p in (root / "pool").rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    unlabelled = [p.name for p in files if p.name not in truth]
    if unlabelled:
        raise ScenarioError(f"{len(unlabelled)} pool images have no line in {labels_file}, "
                            f"e.g. {unlabelled[:3]}")
    known = set(class_names(root))
    unknown = sorted({truth[p.name] for p in files} - known)
    if unknown:
        raise ScenarioError(f"{labels_file} names classes train/ does not have: {unknown}")
    return [(path, truth[path.name]) for path in files]


def check_layout(root: Path) -> None:
    """Every folder of a scenario is there, with the same classes as train/."""
    root = Path(root)
    classes = class_names(root)
    for split in ("val", "test"):
        folder = root / split
        if not folder.is_dir():
            raise ScenarioError(f"{root} has no {split}/ folder (the loop's gate uses val/, "
                                "its report test/)")
        missing = [c for c in classes if not (folder / c).is_dir()]
        if missing:
            raise ScenarioError(f"{folder} lacks the classes {missing} that train/ has")
    if not (root / "pool").is_dir():
        raise ScenarioError(f"{root} has no pool/ folder: the stream the demo sends")
