"""Real training runs on small real data (Fashion-MNIST slices), through the public entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from visionloop.cli import main as cli_main
from visionloop.core.fsutil import sha256_file
from visionloop.core.manifest import ModelManifest
from visionloop.core.preprocess import preprocess_image
from visionloop.trainer.config import TrainConfig
from visionloop.trainer.export import PARITY_TOLERANCE
from visionloop.trainer.head import L2_GRID
from visionloop.trainer.train import run_training

MINORITY = ("coat", "sandal", "bag")  # as in conftest.small_scenario

pytestmark = pytest.mark.slow
CHANCE = 0.1  # ten classes


def test_training_learns_and_publishes_a_complete_version(trained_version: Path):
    manifest = ModelManifest.load(trained_version)
    test = manifest.metrics["test"]
    assert test["accuracy"] > 4 * CHANCE, test  # learned, well above chance
    assert manifest.version == "v1" and manifest.parent_version is None
    assert manifest.classes == tuple(sorted(manifest.classes)) and len(manifest.classes) == 10
    assert manifest.metrics["minority"] == list(MINORITY)
    assert set(test["per_class"]) == set(manifest.classes)
    assert manifest.temperature > 0 and 0 <= manifest.metrics["ece_calibrated"] <= 1
    drift = manifest.metrics["drift_reference"]  # for serving's drift measure (core.drift)
    assert len(drift["class_means"]) == len(manifest.classes) == len(drift["mix"])
    assert drift["distance_threshold"] > 0 and 0 < drift["mix_threshold"] < 1
    assert len(manifest.dataset_fingerprint) == 64
    assert manifest.training_config["epochs"] == 4
    for key, artifact in manifest.artifacts.items():
        path = trained_version / artifact.path
        assert sha256_file(path) == artifact.sha256, key
        if key != "state_dict":
            assert artifact.max_abs_diff is not None and artifact.max_abs_diff <= PARITY_TOLERANCE
    for name in ("report.md", "confusion_matrix.png", "reliability.png"):
        assert (trained_version / name).stat().st_size > 0
    assert "| macro-F1 |" in (trained_version / "report.md").read_text()
    assert not list(trained_version.parent.glob(".staging-*")), "staging dir left behind"


def test_exports_reproduce_the_eager_model_on_real_images(trained_version: Path, small_scenario):
    """TorchScript and ONNX, fed the manifest's preprocessing, agree with the saved weights."""
    from visionloop.trainer.data import load_image_tensor
    from visionloop.trainer.models import build_model

    manifest = ModelManifest.load(trained_version)
    files = sorted((small_scenario / "test").rglob("*.png"))[::37][:9]  # any batch size works
    batch = torch.stack([preprocess_image(load_image_tensor(f), manifest.preprocessing)
                         for f in files])
    eager = build_model(manifest.arch, len(manifest.classes), "none").model.eval()
    eager.load_state_dict(torch.load(trained_version / "weights.pt", weights_only=True))
    with torch.no_grad():
        reference = torch.softmax(eager(batch) / manifest.temperature, 1)
        scripted = torch.jit.load(str(trained_version / "model.torchscript.pt"))(batch)
    session = ort.InferenceSession(str(trained_version / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"input": batch.numpy()})[0]
    for logits in (scripted, torch.from_numpy(np.asarray(onnx_logits))):
        probs = torch.softmax(logits / manifest.temperature, 1)
        assert (probs - reference).abs().max().item() <= PARITY_TOLERANCE


def test_warm_start_from_parent_and_class_mismatch(trained_version: Path, small_scenario,
                                                   tmp_path):
    store = trained_version.parent.parent
    cfg = TrainConfig(data=str(small_scenario), out=str(store), name="fm", parent="latest",
                      learner="finetune", epochs=1, freeze_epochs=0, num_workers=0,
                      show_progress=False, work_dir=str(tmp_path / "runs"))
    child = ModelManifest.load(run_training(cfg))
    assert child.version == "v2" and child.parent_version == "v1"
    assert child.metrics["test"]["accuracy"] > 4 * CHANCE  # started from a trained model

    fewer = tmp_path / "nine-classes"
    shutil.copytree(small_scenario, fewer, ignore=shutil.ignore_patterns("bag"))
    code = cli_main(["train", "--data", str(fewer), "--out", str(store), "--name", "fm",
                     "--parent", "v1", "--epochs", "1", "--no-show-progress"])
    assert code == 2


def test_resume_continues_after_the_last_completed_epoch(small_scenario, tmp_path):
    common = dict(data=str(small_scenario), out=str(tmp_path / "store"), name="fm",
                  learner="finetune", image_size=32, freeze_epochs=1, num_workers=0,
                  show_progress=False, work_dir=str(tmp_path / "runs"), batch_size=64)
    run_training(TrainConfig(epochs=1, **common))
    meta = json.loads((tmp_path / "runs" / "last.json").read_text())
    assert meta["epoch"] == 0 and len(meta["history"]) == 1
    version = run_training(TrainConfig(epochs=2, resume=True, **common))
    history = ModelManifest.load(version).metrics["history"]
    assert [h["epoch"] for h in history] == [0, 1]  # epoch 0 was not trained again
    assert history[0] == meta["history"][0]


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent"], "/nonexistent: no such folder"),
    (["--weights", "/nonexistent/w.pth"], "does not exist"),
    (["--arch", "resnet7", "--learner", "finetune"], "unknown architecture"),
    (["--arch", "resnet18"], "needs --learner head or finetune"),
    (["--imbalance", "magic"], "invalid choice: 'magic'"),  # argparse's choices: exit 2 too
])
def test_cli_reports_bad_input_with_exit_code_2(small_scenario, tmp_path, capsys, args, message):
    base = ["train", "--data", str(small_scenario), "--out", str(tmp_path), "--epochs", "1",
            "--no-show-progress"]
    try:
        code = cli_main(base + args)
    except SystemExit as exited:
        code = exited.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.rglob("manifest.json"))


def test_cli_names_a_corrupt_image(small_scenario, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_scenario, data)
    victim = next((data / "train" / "coat").iterdir())
    victim.write_bytes(victim.read_bytes()[:40])
    args = ["train", "--data", str(data), "--out", str(tmp_path / "s"), "--no-show-progress"]
    assert cli_main(args) == 2
    assert victim.name in capsys.readouterr().err


def test_two_process_ddp_run_on_cpu(small_scenario, tmp_path):
    """torchrun, 2 processes, gloo: both ranks train their shard, rank 0 alone publishes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "visionloop.cli", "train", "--data", str(small_scenario),
           "--out", str(tmp_path / "store"), "--name", "ddp", "--learner", "finetune",
           "--image-size", "32", "--epochs", "3", "--batch-size", "16",
           "--num-workers", "0", "--device", "cpu", "--no-show-progress",
           "--work-dir", str(tmp_path / "runs")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stderr
    assert sorted(p.name for p in (tmp_path / "store" / "ddp").iterdir()) == ["v1"]
    manifest = ModelManifest.load(tmp_path / "store" / "ddp" / "v1")
    assert manifest.metrics["test"]["accuracy"] > 3 * CHANCE
    # Each rank saw half of an epoch: the sampler sharded the data between them.
    assert "per rank 225 images/epoch" in result.stderr


def test_head_learner_fits_on_cached_embeddings_and_keeps_the_prior(small_scenario, tmp_path):
    """The head learner: the frozen backbone's embeddings are cached, the head is fit,
    exported like any version; a warm start with more labels keeps its parent's prior and
    L2 strength."""
    common = dict(data=str(small_scenario), out=str(tmp_path / "store"), name="head",
                  learner="head", num_workers=0, show_progress=False,
                  work_dir=str(tmp_path / "runs"),
                  embedding_cache=str(tmp_path / "embeddings"))
    parent = ModelManifest.load(run_training(TrainConfig(**common)))
    assert parent.training_config["learner"] == "head" and parent.preprocessing.image_size == 64
    assert parent.metrics["head"]["l2"] in L2_GRID
    assert parent.metrics["test"]["accuracy"] > 4 * CHANCE
    assert parent.artifacts["onnx"].max_abs_diff < PARITY_TOLERANCE
    assert len(list((tmp_path / "embeddings").glob("*.sqlite3"))) == 1
    child = ModelManifest.load(run_training(TrainConfig(
        parent="latest", extra_train=(str(small_scenario / "val"),), **common)))
    assert child.parent_version == parent.version
    assert child.train_counts != parent.train_counts  # the val images were added
    assert child.metrics["prior_counts"] == parent.metrics["prior_counts"]
    # and its L2 strength: the parent's or a weaker one (the manifest sorts keys, so the
    # order they were tried in is tests/test_loop_learning.py's to check)
    parent_l2 = parent.metrics["head"]["l2"]
    tried = sorted(float(k) for k in child.metrics["head"]["val_macro_f1_per_l2"])
    assert tried == [g for g in L2_GRID if g <= parent_l2]
    assert child.metrics["head"]["l2"] <= parent_l2
