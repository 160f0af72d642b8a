"""Atomic training checkpoints: tensors in a .pt file (loaded weights_only), metadata as JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from visionloop.core.errors import InputError
from visionloop.core.fsutil import atomic_write_bytes, atomic_write_json


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupt or from another run."""


def save_checkpoint(path: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write path (tensors) then path.json (metadata), each atomically. Both carry the epoch:
    a run stopped between the two writes (killed, disk full) leaves a pair that disagrees,
    which load_checkpoint refuses instead of resuming from mismatched halves."""
    buffer = io.BytesIO()
    torch.save({**state, "epoch": meta["epoch"]}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
        atomic_write_json(path.with_suffix(".json"), meta)
    except OSError as exc:
        raise CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc}") \
            from exc


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"no complete checkpoint at {path}: {exc}") from exc
    except (json.JSONDecodeError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if epoch is None or epoch != meta.get("epoch"):
        raise CheckpointError(f"checkpoint {path} (epoch {epoch}) and its "
                              f"metadata (epoch {meta.get('epoch')}) do not belong together: "
                              "a run stopped between writing them; remove both to start over")
    return state, meta
