"""The model_store layout: model_store/<name>/<version>/ holding artifacts and manifest.json.

A version directory appears all at once: it is built in a hidden staging directory
beside it and renamed into place, so a reader never sees a half-written version.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from visionloop.core.errors import InputError
from visionloop.core.manifest import MANIFEST_FILE, ModelManifest

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION_PATTERN = re.compile(r"^v(\d+)$")


class StoreError(InputError):
    """A model name or version that is invalid or not in the store."""


def validate_name(name: str) -> str:
    if not _NAME_PATTERN.match(name):
        raise StoreError(
            f"model name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def version_number(version: str) -> int:
    match = _VERSION_PATTERN.match(version)
    if not match:
        raise StoreError(f"version {version!r} is invalid: versions look like v1, v2, ...")
    return int(match.group(1))


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    def version_dir(self, name: str, version: str) -> Path:
        version_number(version)
        return self.model_dir(name) / version

    def versions(self, name: str) -> list[str]:
        """Published versions of `name`, oldest first (only those with a manifest)."""
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            return []
        found = [
            p.name
            for p in model_dir.iterdir()
            if _VERSION_PATTERN.match(p.name) and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(found, key=version_number)

    def latest_version(self, name: str) -> str | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def resolve_version(self, name: str, version: str) -> str:
        """'latest' -> the newest published version; anything else is checked and returned."""
        if version != "latest":
            version_number(version)
            return version
        latest = self.latest_version(name)
        if latest is None:
            raise StoreError(f"model {name!r} has no versions in {self.root}",
                             hint=f"train one first: visionloop train --data FOLDER --name "
                                  f"{name} --store {self.root}")
        return latest

    def load_manifest(self, name: str, version: str) -> ModelManifest:
        version_dir = self.version_dir(name, version)
        if not version_dir.is_dir():
            raise StoreError(
                f"model {name!r} has no version {version!r} in {self.root}; "
                f"it has {self.versions(name) or 'none'}"
            )
        return ModelManifest.load(version_dir)

    def new_staging_dir(self, name: str) -> Path:
        model_dir = self.model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))

    def next_version(self, name: str) -> str:
        model_dir = self.model_dir(name)
        taken = [
            version_number(p.name)
            for p in (model_dir.iterdir() if model_dir.is_dir() else [])
            if _VERSION_PATTERN.match(p.name)
        ]
        return f"v{max(taken, default=0) + 1}"

    def publish(self, name: str, staging_dir: Path, version: str) -> Path:
        """Rename a finished staging directory to its version; fails if the version exists."""
        target = self.version_dir(name, version)
        if target.exists():
            raise StoreError(f"{target} already exists; versions are never overwritten")
        staging_dir.rename(target)
        return target

    def discard(self, staging_dir: Path) -> None:
        shutil.rmtree(staging_dir, ignore_errors=True)

    def discard_all_staging(self, name: str) -> int:
        """Remove staging dirs a killed run left behind; only call while holding the retrain
        lock (a staging dir of a live run would go too)."""
        model_dir = self.model_dir(name)
        stale = list(model_dir.glob(".staging-*")) if model_dir.is_dir() else []
        for staging in stale:
            self.discard(staging)
        return len(stale)
