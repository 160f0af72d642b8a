"""Run a batch through the archived artifact: TorchScript, or ONNX Runtime (CUDA EP, else CPU)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class TorchScriptBackend:
    def __init__(self, path: Path, gpu_id: int | None) -> None:
        use_cuda = gpu_id is not None and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
            self.module = torch.jit.load(str(path), map_location=self.device).eval()
        self.name = f"torchscript:{self.device}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(batch.to(self.device)).float().cpu()


class OnnxBackend:
    def __init__(self, path: Path, gpu_id: int | None, allow_spinning: bool = False) -> None:
        import onnxruntime as ort  # here: a worker serving TorchScript never loads it

        providers: list = ["CPUExecutionProvider"]
        if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_id}))
        options = ort.SessionOptions()
        # ORT's CPU threads spin after each run by default, waiting for more work; next to
        # TorchServe's frontend and other workers on a few cores, that spinning takes the CPU
        # the next request needs (`python -m bench.serving --spinning-ab`: README, Measured).
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if allow_spinning else "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        # What actually runs: ORT silently falls back to CPU when CUDA cannot be used.
        self.name = f"onnxruntime:{self.session.get_providers()[0]}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = {self.input_name: batch.numpy().astype(self.dtype, copy=False)}
        return torch.from_numpy(np.asarray(self.session.run(None, inputs)[0], dtype=np.float32))


def load_backend(artifact: Path, gpu_id: int | None) -> TorchScriptBackend | OnnxBackend:
    """The backend is chosen by the archived file: *.onnx -> ONNX Runtime, else TorchScript."""
    backend = (OnnxBackend if artifact.suffix == ".onnx" else TorchScriptBackend)(artifact, gpu_id)
    log.info("serving %s with %s", artifact.name, backend.name)
    return backend
