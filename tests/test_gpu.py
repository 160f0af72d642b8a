"""GPU checks: skipped where there is no CUDA device (the only tests allowed to skip)."""

import pytest
import torch

from visionloop.core.manifest import ModelManifest
from visionloop.trainer.config import TrainConfig
from visionloop.trainer.train import run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]


def test_training_on_gpu_with_bf16_autocast_and_channels_last(small_scenario, tmp_path):
    cfg = TrainConfig(data=str(small_scenario), out=str(tmp_path), name="gpu", epochs=4,
                      learner="finetune", image_size=32,
                      batch_size=32, device="cuda", amp=True, channels_last=True, num_workers=2,
                      show_progress=False, work_dir=str(tmp_path / "runs"))
    manifest = ModelManifest.load(run_training(cfg))
    assert manifest.metrics["test"]["accuracy"] > 0.4
    assert set(manifest.artifacts) == {"state_dict", "torchscript", "onnx"}
    assert manifest.training_config["device"] == "cuda"
