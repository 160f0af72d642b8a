"""The model manifest: the contract between trainer, serving and labeling.

One `manifest.json` per model version says what the model expects (preprocessing),
what it answers (class names, calibration temperature), how good it is (metrics),
and which exported files hold it (artifacts with their hashes and measured parity).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visionloop.core.errors import InputError
from visionloop.core.fsutil import atomic_write_json, sha256_file

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"


class ManifestError(InputError):
    """A manifest that is missing, unreadable or inconsistent."""


def _is_plain_file_name(name: str) -> bool:
    """One path component that stays where it is joined: no separators, not . or .."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


@dataclass(frozen=True)
class Preprocessing:
    image_size: int  # side of the square tensor the network sees
    resize: int  # shorter side is resized to this, then centre-cropped to image_size
    mean: tuple[float, float, float]  # per-channel normalisation, from the backbone's weights
    std: tuple[float, float, float]
    channels: int = 3  # network input channels; grayscale images are replicated to 3
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.resize < self.image_size:
            raise ManifestError(
                f"preprocessing needs 0 < image_size <= resize, got image_size={self.image_size} "
                f"resize={self.resize}"
            )
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ManifestError(f"mean/std must have {self.channels} values")


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the version directory
    format: str  # one of ARTIFACT_FORMATS
    sha256: str
    max_abs_diff: float | None = None  # on probabilities against the eager model, real batch


ARTIFACT_FORMATS = ("state_dict", "torchscript", "onnx", "onnx_fp16")


@dataclass(frozen=True)
class ModelManifest:
    name: str  # the model's name in model_store/ and in TorchServe
    version: str  # "v1", "v2", ... unique per name
    arch: str  # architecture name understood by trainer.models.build_model
    classes: tuple[str, ...]  # index -> class name, the order of the model's outputs
    preprocessing: Preprocessing
    temperature: float  # calibrated probabilities = softmax(logits / temperature)
    artifacts: dict[str, Artifact]
    metrics: dict[str, Any] = field(default_factory=dict)  # test-set report, per class included
    parent_version: str | None = None  # the version this one was fine-tuned from
    dataset_fingerprint: str = ""  # sha256 over the training file list and labels
    training_config: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""  # ISO 8601, UTC
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.classes:
            raise ManifestError("a manifest needs at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise ManifestError(f"duplicate class names in {list(self.classes)}")
        unsafe = [c for c in self.classes if not _is_plain_file_name(c)]
        if unsafe:  # class names become folder names (ImageFolder, pulled labels)
            raise ManifestError(f"class names must be plain folder names, got {unsafe}")
        if not self.temperature > 0:
            raise ManifestError(f"temperature must be > 0, got {self.temperature}")
        for key, artifact in self.artifacts.items():
            if not _is_plain_file_name(artifact.path):
                raise ManifestError(f"artifact {key!r} path {artifact.path!r} must be a file "
                                    "name inside the version directory")
            if artifact.format not in ARTIFACT_FORMATS:
                raise ManifestError(
                    f"artifact {key!r} has format {artifact.format!r}; "
                    f"allowed: {', '.join(ARTIFACT_FORMATS)}"
                )

    @property
    def minority_classes(self) -> tuple[str, ...]:
        """The loop's one definition of the minority classes, used by capture, push and the
        gate: those the trainer recorded (named by the user, or detected from the training
        counts by core.classes.minority_classes); a challenger inherits its champion's."""
        return tuple(self.metrics.get("minority", ()))

    @property
    def train_counts(self) -> dict[str, int]:
        """Training images per class ({} in manifests written before they were recorded)."""
        return dict(self.metrics.get("train_counts", {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelManifest:
        try:
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ManifestError(
                    f"manifest schema_version {data.get('schema_version')!r} is not "
                    f"{SCHEMA_VERSION}"
                )
            fields = dict(data)
            pre = dict(fields.pop("preprocessing"))
            pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
            artifacts = {k: Artifact(**v) for k, v in fields.pop("artifacts").items()}
            return cls(
                preprocessing=Preprocessing(**pre),
                artifacts=artifacts,
                classes=tuple(fields.pop("classes")),
                **fields,
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is missing or has a bad field: {exc}") from exc

    def save(self, version_dir: str | Path) -> Path:
        path = Path(version_dir) / MANIFEST_FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, version_dir: str | Path) -> ModelManifest:
        path = Path(version_dir) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ManifestError(f"no manifest at {path}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def verify(self, version_dir: str | Path, keys: list[str] | None = None) -> None:
        """Each artifact (or those named) is there with the bytes the manifest recorded."""
        for key in keys if keys is not None else sorted(self.artifacts):
            path = self.artifact_path(version_dir, key)
            if not path.is_file():
                raise ManifestError(f"{path} is missing; the manifest lists it as {key!r}")
            if sha256_file(path) != self.artifacts[key].sha256:
                raise ManifestError(f"{path} does not match the sha256 in its manifest: "
                                    "the file is damaged or was replaced")

    def artifact_path(self, version_dir: str | Path, key: str) -> Path:
        if key not in self.artifacts:
            raise ManifestError(
                f"version {self.version} has no {key!r} artifact; it has {sorted(self.artifacts)}"
            )
        return Path(version_dir) / self.artifacts[key].path
