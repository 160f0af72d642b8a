import csv
import os

import pytest
from PIL import Image

from visionloop.trainer import fashion_mnist
from visionloop.trainer.data import (
    DataError,
    dataset_fingerprint,
    load_image_tensor,
    scan_image_folder,
)
from visionloop.trainer.splits import hold_out as _hold_out


def count_files(folder):
    return {d.name: len(list(d.iterdir())) for d in folder.iterdir()}


def test_scenario_is_long_tailed_with_balanced_eval(small_scenario):
    train = count_files(small_scenario / "train")
    assert {train[c] for c in ("coat", "sandal", "bag")} == {10}
    assert {n for c, n in train.items() if c not in ("coat", "sandal", "bag")} == {60}
    assert set(count_files(small_scenario / "val").values()) == {20}
    assert set(count_files(small_scenario / "test").values()) == {30}
    rows = list(csv.DictReader(open(small_scenario / "pool_labels.csv")))
    assert sorted(r["file"] for r in rows) == sorted(os.listdir(small_scenario / "pool"))
    assert sum(r["label"] == "coat" for r in rows) == 2  # 12 / 6
    # Train and pool come from the training file, val/test from the test file: disjoint.
    train_files = {p.name for p in (small_scenario / "train").rglob("*.png")}
    assert not train_files & {r["file"] for r in rows}
    assert all(p.name.startswith("t10k-") for p in (small_scenario / "test").rglob("*.png"))


def test_balanced_twin_shares_val_and_test(small_scenario, tmp_path):
    twin = tmp_path / "balanced"
    fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(
        out=twin, minority=("coat",), imbalance_ratio=1, train_per_class=30, pool_per_class=0,
        val_per_class=20, test_per_class=30, seed=0))
    for split in ("val", "test"):
        names = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))  # noqa: E731
        assert names(twin / split) == names(small_scenario / split)


def test_scenario_refuses_existing_dir_and_bad_minority(small_scenario):
    with pytest.raises(DataError, match="already exists"):
        fashion_mnist.build_scenario(fashion_mnist.ScenarioConfig(out=small_scenario,
                                                                  minority=("coat",)))
    with pytest.raises(DataError, match="unknown class 'hat'"):
        fashion_mnist.parse_minority("coat,hat")
    assert fashion_mnist.parse_minority("4, sandal,4") == ("coat", "sandal")


def make_tree(root, classes=("cat", "dog"), per_class=3, mode="L"):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new(mode, (9, 7), color=i * 40).save(root / name / f"{i}.png")
    return root


def test_scan_reads_classes_in_order_and_fingerprints(tmp_path):
    index = scan_image_folder(make_tree(tmp_path / "t", classes=("b", "a")))
    assert index.classes == ("a", "b") and index.class_counts() == [3, 3]
    before = dataset_fingerprint([index])
    (tmp_path / "t" / "a" / "0.png").unlink()
    assert dataset_fingerprint([scan_image_folder(tmp_path / "t")]) != before


def test_corrupt_image_is_named_and_skip_is_a_choice(tmp_path):
    root = make_tree(tmp_path / "t")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match="2 unreadable") as err:
        scan_image_folder(root)
    assert "truncated.png" in str(err.value) and "text.jpg" in str(err.value)
    index = scan_image_folder(root, on_corrupt="skip")
    assert index.class_counts() == [3, 3] and len(index.skipped) == 2


def test_empty_class_folder_and_class_mismatch_are_errors(tmp_path):
    root = make_tree(tmp_path / "t")
    (root / "emu").mkdir()
    with pytest.raises(DataError, match="emu has no images"):
        scan_image_folder(root)
    with pytest.raises(DataError, match=r"missing: \['owl'\]"):
        scan_image_folder(make_tree(tmp_path / "u"), classes=("cat", "dog", "owl"))


def test_symlink_out_of_the_tree_is_refused(tmp_path):
    root = make_tree(tmp_path / "t")
    outside = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(outside)
    (root / "cat" / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match="points outside"):
        scan_image_folder(root)


def test_any_mode_loads_as_one_or_three_channels(tmp_path):
    for mode, channels in (("L", 1), ("RGB", 3), ("RGBA", 3), ("P", 3), ("I;16", 3)):
        path = tmp_path / f"{mode.replace(';', '')}.png"
        Image.new(mode, (5, 4)).save(path)
        assert load_image_tensor(path).shape == (channels, 4, 5), mode


def test_hold_out_is_stratified_and_keeps_singletons(tmp_path):
    samples = [(tmp_path / f"{i}", 0) for i in range(50)]
    samples += [(tmp_path / "x", 1), (tmp_path / "y", 2), (tmp_path / "z", 2)]
    keep, held = _hold_out(samples, 0.1, seed=0)
    assert sorted(label for _, label in held) == [0, 0, 0, 0, 0, 2]
    assert len(keep) + len(held) == len(samples) and 1 in {label for _, label in keep}
