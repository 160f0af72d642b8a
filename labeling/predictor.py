"""Pre-annotations for Label Studio's ML-backend protocol, from a model_store version.

Same decode / preprocess / postprocess as the TorchServe handler, run in-process on the
TorchScript artifact: a task's image is fetched from Label Studio (local files need its
token: a legacy one or a personal access token) or decoded from a data: URI.
"""

from __future__ import annotations

import base64
import logging
import urllib.request
from pathlib import Path

from visionloop.core.model_store import ModelStore
from visionloop.core.registry import resolve
from visionloop.labeling.client import AuthHeader
from visionloop.labeling.project import FROM_NAME, IMAGE_KEY, TO_NAME
from visionloop.serving.offline import BadInput, InProcessModel

log = logging.getLogger(__name__)


class Predictor:
    def __init__(self, store: Path, model: str, version: str, labelstudio_url: str,
                 token: str) -> None:
        self.store, self.model, self.requested_version = ModelStore(store), model, version
        self.labelstudio_url = labelstudio_url.rstrip("/")
        self.auth = AuthHeader(self.labelstudio_url, token)
        self.loaded: InProcessModel | None = None
        self.reload()

    def reload(self) -> None:
        """Load the requested version ('champion' or 'latest' follow promotions on /setup)."""
        version = resolve(self.store, self.model, self.requested_version)
        if self.loaded is not None and self.loaded.manifest.version == version:
            return
        self.loaded = InProcessModel(self.store.version_dir(self.model, version))
        log.info("ML backend predicts with %s %s", self.model, version)

    @property
    def model_version(self) -> str:
        return f"{self.loaded.manifest.name}-{self.loaded.manifest.version}"

    def image_bytes(self, reference: str) -> bytes:
        if reference.startswith("data:"):
            return base64.b64decode(reference.split(",", 1)[1])
        url = reference if reference.startswith("http") else self.labelstudio_url + reference
        if not url.startswith(self.labelstudio_url + "/"):
            raise BadInput(400, f"image URL {url!r} is not on the Label Studio server")
        request = urllib.request.Request(url, headers={"Authorization": self.auth()})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def predict(self, tasks: list[dict]) -> list[dict]:
        """One {result, score, model_version} per task; an unreadable image gets no result."""
        images, usable = [], []
        for i, task in enumerate(tasks):
            try:
                # push's tasks name the captured original beside what annotators are shown
                data = task["data"]
                images.append(self.image_bytes(data.get("capture_image") or data[IMAGE_KEY]))
                usable.append(i)
            except (BadInput, KeyError, OSError, ValueError) as exc:
                log.warning("task %s: no image (%s)", task.get("id"), exc)
        results = [{"result": [], "score": 0.0, "model_version": self.model_version}
                   for _ in tasks]
        for i, reply in zip(usable, self.loaded.predict(images), strict=True):
            if isinstance(reply, BadInput):
                log.warning("task %s: no prediction (%s)", tasks[i].get("id"), reply)
                continue
            top = reply.predictions[0]
            results[i] = {"model_version": self.model_version, "score": top.probability,
                          "result": [{"from_name": FROM_NAME, "to_name": TO_NAME,
                                      "type": "choices", "value": {"choices": [top.label]}}]}
        return results
