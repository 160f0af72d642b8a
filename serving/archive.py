"""Build a TorchServe .mar from a model_store version: one artifact, manifest, serving config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from visionloop.core.errors import InputError
from visionloop.core.manifest import ModelManifest
from visionloop.serving.handler import SERVING_CONFIG, ServingConfig
from visionloop.serving.settings import BACKENDS, ServingSettings

HANDLER = Path(__file__).with_name("handler.py")


def mar_name(name: str, version: str, backend: str) -> str:
    return f"{name}-{version}-{backend}.mar"


def package(version_dir: Path, export_dir: Path, backend: str = "torchscript",
            batch_size: int | None = None, max_batch_delay_ms: int | None = None,
            workers: int | None = None, serving: ServingConfig | None = None) -> Path:
    """Write export_dir/<name>-<version>-<backend>.mar (zip-store: no compression, fast).
    Batching and workers not given come from serving.settings (the environment, else the
    machine's defaults)."""
    settings = ServingSettings.from_env()
    batch_size = settings.batch_size if batch_size is None else batch_size
    max_batch_delay_ms = settings.max_batch_delay_ms if max_batch_delay_ms is None \
        else max_batch_delay_ms
    workers = settings.workers if workers is None else workers
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if batch_size < 1 or max_batch_delay_ms < 0 or workers < 1:
        raise InputError("batch_size and workers must be >= 1 and max_batch_delay_ms >= 0")
    manifest = ModelManifest.load(version_dir)
    artifact = manifest.artifact_path(version_dir, BACKENDS[backend])
    manifest.verify(version_dir, [BACKENDS[backend]])  # never serve a damaged file
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp)
        shutil.copy(version_dir / "manifest.json", extra / "manifest.json")
        serving_config = asdict(serving or ServingConfig())
        (extra / SERVING_CONFIG).write_text(json.dumps(serving_config, indent=2))
        model_config = extra / "model-config.yaml"
        model_config.write_text(yaml.safe_dump({
            "batchSize": batch_size, "maxBatchDelay": max_batch_delay_ms,
            "minWorkers": workers, "maxWorkers": workers, "responseTimeout": 60}))
        # The model is registered as <name> with version <version>; only the file is unique.
        cmd = [str(Path(sys.executable).with_name("torch-model-archiver")),
               "--model-name", manifest.name, "--version", manifest.version,
               "--serialized-file", str(artifact), "--handler", str(HANDLER),
               "--extra-files", f"{extra / 'manifest.json'},{extra / SERVING_CONFIG}",
               "--config-file", str(model_config), "--export-path", tmp,
               "--archive-format", "zip-store", "--force"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed: {result.stderr.strip()[-2000:]}")
        target = export_dir / mar_name(manifest.name, manifest.version, backend)
        # in place by a rename on the target's filesystem: a replica packaging the same
        # version at the same moment, or TorchServe reading it, never sees half a file
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.move(extra / f"{manifest.name}.mar", partial)
        os.replace(partial, target)
    return target
