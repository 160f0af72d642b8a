import numpy as np
import onnxruntime as ort
import pytest
import torch

from visionloop.trainer.export import (
    FP16_PARITY_TOLERANCE,
    PARITY_TOLERANCE,
    ExportError,
    check_parity,
    export_all,
)
from visionloop.trainer.models import build_model


def test_parity_check_fails_loudly_beyond_tolerance_or_on_nan():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    assert check_parity("x", logits, logits + 1e-7, temperature=1.0) < PARITY_TOLERANCE
    with pytest.raises(ExportError, match="differs from the eager model"):
        check_parity("x", logits, logits + torch.tensor([[0.1, 0.0, 0.0]]), temperature=1.0)
    with pytest.raises(ExportError):
        check_parity("x", logits, torch.full_like(logits, float("nan")), temperature=1.0)


def test_export_all_writes_verified_files_with_a_dynamic_batch_axis(tmp_path):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 5, "DEFAULT").model.eval()
    batch = torch.randn(6, 3, 32, 32)
    results = export_all(model, batch, tmp_path, temperature=1.7, fp16=True)
    assert set(results) == {"torchscript", "onnx", "onnx_fp16"}
    assert results["onnx"][1] <= PARITY_TOLERANCE
    assert results["torchscript"][1] <= PARITY_TOLERANCE
    assert results["onnx_fp16"][1] <= FP16_PARITY_TOLERANCE
    session = ort.InferenceSession(str(tmp_path / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for size in (1, 3, 11):
        out = session.run(None, {"input": np.zeros((size, 3, 32, 32), np.float32)})[0]
        assert out.shape == (size, 5)
    half = ort.InferenceSession(str(tmp_path / "model.fp16.onnx"),
                                providers=["CPUExecutionProvider"])
    assert half.get_inputs()[0].type == "tensor(float16)"
