"""Which pulled labels a retrain has already used: the retrain job writes it after each
attempt, the metrics read it (labels pulled but not trained yet are labels waiting)."""

from __future__ import annotations

import json
from pathlib import Path

from visionloop.core.fsutil import atomic_write_json
from visionloop.core.model_store import ModelStore


def label_files(labels_dir: Path) -> set[str]:
    """'<class>/<file>' for every pulled, known-class label."""
    tree = Path(labels_dir) / "images"
    return {f"{p.parent.name}/{p.name}" for p in tree.glob("*/*")
            if p.is_file() and not p.name.startswith(".")}  # not pull's temporary files


def _state_path(store: ModelStore, name: str) -> Path:
    return store.model_dir(name) / "retrain_state.json"


def labels_already_used(store: ModelStore, name: str) -> set[str]:
    path = _state_path(store, name)
    return set(json.loads(path.read_text())["labels_trained"]) if path.exists() else set()


def record_labels_used(store: ModelStore, name: str, labels: set[str]) -> None:
    """After an attempt, promoted or not: the next run waits for labels not in `labels`."""
    atomic_write_json(_state_path(store, name), {"labels_trained": sorted(labels)})
