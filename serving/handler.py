"""TorchServe handler: wires serving.inference and serving.capture into handle(data, context).

The archive holds one model artifact (model.torchscript.pt or model.onnx), the version's
manifest.json and serving.json (limits, top-k, capture policy). The capture directory
is a deployment setting: the VISIONLOOP_CAPTURE_DIR environment variable of the server.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionloop.core.manifest import ModelManifest
from visionloop.serving.backends import load_backend
from visionloop.serving.capture import CapturePolicy, Capturer
from visionloop.serving.drift_monitor import DriftMonitor
from visionloop.serving.inference import BadInput, Limits, predict_batch
from visionloop.serving.inflight import INFLIGHT_ENV, clear_dead_markers, marked
from visionloop.serving.metrics import CaptureCounts
from visionloop.serving.metrics import emit as emit_metrics

log = logging.getLogger(__name__)
SERVING_CONFIG = "serving.json"
ARTIFACT_NAMES = ("model.onnx", "model.fp16.onnx", "model.torchscript.pt")


@dataclass(frozen=True)
class ServingConfig:
    top_k: int = 5
    limits: Limits = Limits()
    capture: CapturePolicy = CapturePolicy()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingConfig:
        return cls(top_k=int(data.get("top_k", 5)), limits=Limits(**data.get("limits", {})),
                   capture=CapturePolicy(**data.get("capture", {})))


class VisionloopHandler:
    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.manifest = ModelManifest.load(model_dir)
        config_path = model_dir / SERVING_CONFIG
        self.config = ServingConfig.from_dict(
            json.loads(config_path.read_text()) if config_path.exists() else {})
        artifact = next(model_dir / n for n in ARTIFACT_NAMES if (model_dir / n).exists())
        self.backend = load_backend(artifact, props.get("gpu_id"))
        capture_dir = os.environ.get("VISIONLOOP_CAPTURE_DIR")
        self.capture = Capturer(capture_dir, self.config.capture) if capture_dir else None
        self.drift = DriftMonitor(self.manifest, capture_dir)
        # the name and version TorchServe registered, for the in-flight marker a drain reads
        self.registered = (context.model_name or self.manifest.name,
                           context.manifest.get("model", {}).get("modelVersion")
                           or self.manifest.version)
        clear_dead_markers(os.environ.get(INFLIGHT_ENV))  # e.g. of the worker this replaces
        self.initialized = True

    def handle(self, data: list[dict], context: Any) -> list[str]:
        """One reply per request, in order; bad requests get a 4xx of their own."""
        with marked(os.environ.get(INFLIGHT_ENV), *self.registered):
            return self._handle(data, context)

    def _handle(self, data: list[dict], context: Any) -> list[str]:
        raw = [row.get("data") or row.get("body") for row in data]
        results = predict_batch(self.backend, self.manifest, raw, self.config.limits,
                                self.config.top_k)
        bodies: list[dict[str, Any]] = [{}] * len(data)
        good = []
        for i, result in enumerate(results):
            if isinstance(result, BadInput):
                context.set_response_status(result.status, result.reason, idx=i)
                bodies[i] = {"error": result.reason, "status": result.status}
            else:
                good.append(i)
        if good:
            answered = [results[i] for i in good]
            flags: list[bool | None] = [None] * len(good)
            counts = CaptureCounts()
            if self.capture is not None:
                ids = [context.get_request_id(i) or uuid.uuid4().hex for i in good]
                before = dict(self.capture.counts)
                flags = self.capture.capture_batch(
                    [(bytes(raw[i]), request_id, reply)
                     for i, request_id, reply in zip(good, ids, answered, strict=True)])
                after = {k: v - before[k] for k, v in self.capture.counts.items()}
                counts = CaptureCounts(captured=sum(flags), spooled=after["spooled"],
                                       errors=after["errors"] + after["dropped_spool_full"],
                                       rate_limited=after["dropped_rate_limit"])
            emit_metrics(context.metrics, answered, counts, self.drift.observe(answered))
            for i, reply, flag in zip(good, answered, flags, strict=True):
                bodies[i] = reply.with_serving(flag, self.backend.name).to_dict()
        return [json.dumps(body) for body in bodies]


_service = VisionloopHandler()


def handle(data: list[dict] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point; the model loads on the first call (initialize)."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
