"""The serving path in-process: decode -> preprocess -> model -> postprocess, without TorchServe.

For the ML backend's pre-annotations, benchmarks and tests: the same functions and
artifacts the TorchServe handler uses, so its answers are the served answers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from visionloop.core.manifest import ModelManifest
from visionloop.core.reply import Prediction
from visionloop.serving.backends import load_backend
from visionloop.serving.inference import BadInput, predict_batch

__all__ = ["BadInput", "InProcessModel"]  # the served path as labeling's ML backend uses it


class InProcessModel:
    def __init__(self, version_dir: Path, artifact: str = "torchscript",
                 gpu_id: int | None = None) -> None:
        self.manifest = ModelManifest.load(version_dir)
        self.backend = load_backend(self.manifest.artifact_path(version_dir, artifact), gpu_id)

    def predict(self, images: list[bytes], batch_size: int = 64) -> list[Prediction | BadInput]:
        """One reply per image (as the endpoint answers), or the BadInput it would raise."""
        replies: list[Prediction | BadInput] = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                replies += predict_batch(self.backend, self.manifest,
                                         images[start:start + batch_size])
        return replies
