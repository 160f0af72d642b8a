"""Long-tailed image sets for the benches, built from the real data the project can reach
offline, so that no learner is chosen for one data set only.

- fashion-lt100: the demo's scenario (bench.active_learning's data): Fashion-MNIST,
  coat / sandal / bag at 1/100, 1000 images per majority class, val 100 and test 500 per
  class;
- fashion-easy: trouser / bag / ankle_boot rare (classes unlike the others), ratio 30;
- fashion-lookalike: shirt / pullover / coat rare (the classes the others are confused
  with), ratio 30;
- fashion-5-classes: five classes only (t-shirt_top, trouser, pullover, sneaker, bag),
  pullover and bag rare, ratio 30;
- digits: scikit-learn's 8x8 handwritten digits (1,797 real scans, 16 grey levels),
  upscaled by the trainer's resize; 3, 5 and 8 rare, ratio 10;
- photo-patches: colour. Crops of six real photos that ship with scikit-image (class =
  the photo: astronaut, chelsea, coffee, rocket, immunohistochemistry, hubble), crops of
  random size resized to 48 px; train crops come from the left 60% of each photo, val and
  test from the right 40%, so no test crop overlaps a training one. chelsea and rocket
  rare, ratio 20. (No real colour classification set ships in an offline package here.)

Each is written once per seed under the work dir as an ImageFolder tree (train/, val/,
test/) and reused.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.active_learning import build_data, default_scenario
from visionloop.trainer import fashion_mnist


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[Path, int], None]  # (out, seed) -> writes out/train, val, test
    summary: str


def _fashion(minority: tuple[str, ...], ratio: float, keep: tuple[str, ...] | None = None,
             train: int = 300, val: int = 50, test: int = 200) -> Callable[[Path, int], None]:
    def build(out: Path, seed: int) -> None:
        fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(
            out=out, minority=minority, imbalance_ratio=ratio, train_per_class=train,
            pool_per_class=1, val_per_class=val, test_per_class=test, seed=seed))
        if keep is not None:
            for split in ("train", "val", "test"):
                for folder in (out / split).iterdir():
                    if folder.name not in keep:
                        shutil.rmtree(folder)
    return build


def _write(out: Path, split: str, images: list[np.ndarray], labels: list[str]) -> None:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = out / split / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{split}-{index:05d}.png")


def _long_tailed(rng: np.random.Generator, by_class: dict[str, list[np.ndarray]],
                 minority: tuple[str, ...], ratio: float, train: int, val: int,
                 test: int) -> dict[str, tuple[list, list]]:
    splits: dict[str, tuple[list, list]] = {s: ([], []) for s in ("train", "val", "test")}
    for name, items in by_class.items():
        order = rng.permutation(len(items))
        n_train = max(1, round(train / ratio)) if name in minority else train
        parts = {"val": order[:val], "test": order[val:val + test],
                 "train": order[val + test:val + test + n_train]}
        for split, idx in parts.items():
            splits[split][0].extend(items[i] for i in idx)
            splits[split][1].extend([name] * len(idx))
    return splits


def _digits(out: Path, seed: int) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    by_class = {f"digit_{d}": [images[i] for i in np.flatnonzero(digits.target == d)]
                for d in range(10)}
    splits = _long_tailed(np.random.default_rng(seed), by_class,
                          ("digit_3", "digit_5", "digit_8"), 10, train=100, val=25, test=50)
    for split, (imgs, labels) in splits.items():
        _write(out, split, imgs, labels)


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def _crops(photo: np.ndarray, count: int, columns: tuple[float, float],
           rng: np.random.Generator, size: int = 48) -> list[np.ndarray]:
    height, width = photo.shape[:2]
    left, right = int(columns[0] * width), int(columns[1] * width)
    crops = []
    for _ in range(count):
        side = int(rng.integers(size, min(128, right - left, height) + 1))
        y = int(rng.integers(0, height - side + 1))
        x = int(rng.integers(left, right - side + 1))
        patch = Image.fromarray(photo[y:y + side, x:x + side, :3])
        crops.append(np.asarray(patch.resize((size, size), Image.BILINEAR)))
    return crops


def _photo_patches(out: Path, seed: int) -> None:
    from skimage import data

    rng = np.random.default_rng(seed)
    minority, ratio, train, val, test = ("chelsea", "rocket"), 20, 200, 40, 100
    for name in PHOTOS:
        photo = getattr(data, name)()
        label = name.split("_")[0]
        n_train = max(1, round(train / ratio)) if label in minority else train
        _write(out, "train", _crops(photo, n_train, (0.0, 0.6), rng), [label] * n_train)
        held = _crops(photo, val + test, (0.6, 1.0), rng)
        _write(out, "val", held[:val], [label] * val)
        _write(out, "test", held[val:], [label] * test)


SCENARIOS = {s.name: s for s in (
    Scenario("fashion-lt100", lambda out, seed: None,
             "Fashion-MNIST, coat/sandal/bag 1:100, 7,030 train (the demo's)"),
    Scenario("fashion-easy", _fashion(("trouser", "bag", "ankle_boot"), 30),
             "Fashion-MNIST, trouser/bag/ankle_boot 1:30, 2,130 train"),
    Scenario("fashion-lookalike", _fashion(("shirt", "pullover", "coat"), 30),
             "Fashion-MNIST, shirt/pullover/coat 1:30, 2,130 train"),
    Scenario("fashion-5-classes", _fashion(
        ("pullover", "bag"), 30, keep=("t-shirt_top", "trouser", "pullover", "sneaker", "bag")),
        "Fashion-MNIST, 5 classes, pullover/bag 1:30, 920 train"),
    Scenario("digits", _digits, "scikit-learn digits 8x8, 3/5/8 1:10, 730 train"),
    Scenario("photo-patches", _photo_patches,
             "colour crops of 6 scikit-image photos, chelsea/rocket 1:20, 820 train"),
)}


def scenario_data(work_dir: Path, name: str, seed: int) -> Path:
    """The scenario's folder for this seed, built on first use."""
    if name == "fashion-lt100":
        return build_data(work_dir, default_scenario(), seed)
    out = work_dir / "scenarios" / f"{name}-seed{seed}"
    if not (out / "test").is_dir():
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        SCENARIOS[name].build(staging, seed)
        staging.rename(out)
    return out


if __name__ == "__main__":  # python -m bench.scenarios --work-dir DIR: build them all
    parser = argparse.ArgumentParser(description="build the bench scenarios")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-al"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for scenario in SCENARIOS:
        print(scenario_data(args.work_dir, scenario, args.seed))
