"""Export to TorchScript and ONNX, each verified against the eager model on a real batch."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from visionloop.core.failpoints import failpoint

log = logging.getLogger(__name__)

# Max abs difference allowed on calibrated probabilities. Well-trained models export within
# ~1e-5; a model fine-tuned hard (large activations, BatchNorm channels with ~0 variance) was
# measured at 1.3e-4 for ONNX Runtime vs eager. A broken export differs by 1e-1 and more.
PARITY_TOLERANCE = 1e-3
FP16_PARITY_TOLERANCE = 1e-2  # fp16 keeps ~3 significant digits; 1e-4 is out of its reach
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """An export that failed or does not reproduce the eager model."""


def _probabilities(logits: torch.Tensor | np.ndarray, temperature: float) -> torch.Tensor:
    return torch.softmax(torch.as_tensor(logits).float() / temperature, dim=1)


def check_parity(name: str, reference: torch.Tensor, candidate: torch.Tensor | np.ndarray,
                 temperature: float, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max abs difference of probabilities; raises ExportError above the tolerance."""
    diff = float((_probabilities(reference, temperature)
                  - _probabilities(candidate, temperature)).abs().max())
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(f"{name} export differs from the eager model by {diff:.3g} on "
                          f"probabilities (allowed {tolerance:g}); refusing to publish it")
    log.info("%s parity: max abs diff %.2e on probabilities", name, diff)
    return diff


def export_torchscript(model: nn.Module, batch: torch.Tensor, path: Path) -> torch.Tensor:
    """Trace + freeze; returns the exported module's logits on `batch`."""
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit is deprecated, but TorchServe 0.12 loads TorchScript.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.freeze(torch.jit.trace(model, batch))
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        return loaded(batch)


def _ort_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def export_onnx(model: nn.Module, batch: torch.Tensor, path: Path) -> np.ndarray:
    """One self-contained .onnx file with a dynamic batch axis; returns ORT's logits on batch."""
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        torch.onnx.export(
            model, (batch,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=_ort_providers())
    # Run a batch of a different size too, proving the batch axis really is dynamic.
    session.run(None, {"input": batch[:1].numpy()})
    return session.run(None, {"input": batch.numpy()})[0]


def export_all(model: nn.Module, batch: torch.Tensor, out_dir: Path, temperature: float,
               fp16: bool = False) -> dict[str, tuple[str, float]]:
    """Write model.torchscript.pt, model.onnx (and model.fp16.onnx when asked);
    returns {format: (file name, max_abs_diff)}."""
    model = model.cpu().float().eval()
    batch = batch.cpu().float().contiguous()
    with torch.no_grad():
        reference = model(batch)
    results = {}
    ts_logits = export_torchscript(model, batch, out_dir / "model.torchscript.pt")
    results["torchscript"] = ("model.torchscript.pt",
                              check_parity("TorchScript", reference, ts_logits, temperature))
    failpoint("trainer.export")  # half exported: TorchScript written, ONNX not yet
    onnx_logits = export_onnx(model, batch, out_dir / "model.onnx")
    results["onnx"] = ("model.onnx", check_parity("ONNX", reference, onnx_logits, temperature))
    if fp16:
        # For GPU hosts: half the bytes and tensor-core kernels; inputs are fp16 too.
        half_logits = export_onnx(copy.deepcopy(model).half(), batch.half(),
                                  out_dir / "model.fp16.onnx")
        results["onnx_fp16"] = ("model.fp16.onnx", check_parity(
            "ONNX fp16", reference, half_logits.astype(np.float32), temperature,
            FP16_PARITY_TOLERANCE))
    return results
