"""The prediction reply: what the inference endpoint answers for one image.

Built once by serving.inference.postprocess, completed by the handler (captured, backend)
and serialised once by `to_dict`; the capture store, the metrics, the ML backend and the
loop's evaluation read its fields. The wire format (JSON keys) is the one documented in
the README's Serving section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ClassScore:
    label: str
    probability: float  # calibrated: softmax(logits / temperature)


@dataclass(frozen=True)
class Uncertainty:
    max_prob: float  # calibrated confidence of the top class
    margin: float  # top1 - top2
    entropy: float  # normalised to [0, 1] by log(number of classes)


@dataclass(frozen=True)
class Prediction:
    model: str
    version: str
    predictions: tuple[ClassScore, ...]  # top-k, most probable first
    uncertainty: Uncertainty
    probabilities: tuple[float, ...]  # every class, in the manifest's class order
    captured: bool | None = None  # set by the handler when a capture store is configured
    backend: str | None = None  # set by the handler: which runtime answered

    @property
    def label(self) -> str:
        return self.predictions[0].label

    def with_serving(self, captured: bool | None, backend: str) -> Prediction:
        return replace(self, captured=captured, backend=backend)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of the reply; the fields the handler did not set are left out."""
        body = asdict(self)
        for key in ("captured", "backend"):
            if body[key] is None:
                del body[key]
        return body
