"""Read an ImageFolder tree (train/, optional val/ and test/) into checked sample lists.

Every image is decoded once up front, so a corrupt or unreadable file is reported by
path before training starts; the caller chooses to skip such files or fail.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as F

from visionloop.core.errors import InputError

log = logging.getLogger(__name__)


class DataError(InputError):
    """Input data that cannot be used, naming the path and the reason."""


@dataclass(frozen=True)
class ImageFolderIndex:
    root: Path
    classes: tuple[str, ...]
    samples: list[tuple[Path, int]]  # (image path, class index)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)

    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for label in self.labels():
            counts[label] += 1
        return counts


def find_classes(root: Path, minimum: int = 2) -> tuple[str, ...]:
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < minimum:
        raise DataError(f"{root} needs at least {minimum} class folders, found {classes}")
    return tuple(classes)


def check_image(path: Path) -> str | None:
    """None if the file decodes completely, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.load()  # verify() misses truncated pixel data; a full decode does not
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _resolve_inside(path: Path, root: Path) -> Path:
    """Refuse files that resolve outside the tree (symlinks named like class folders)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DataError(f"{path} points outside {root} (to {resolved}); refusing to read it")
    return path


def scan_image_folder(root: str | Path, classes: tuple[str, ...] | None = None,
                      on_corrupt: str = "fail", subset: bool = False) -> ImageFolderIndex:
    """List and decode-check every image under root/<class>/; classes fixes the label order.

    subset: the tree may hold only some of the classes (labels pulled so far).
    """
    if on_corrupt not in ("fail", "skip"):
        raise InputError(f"on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
    root = Path(root)
    found = find_classes(root, minimum=0 if subset else 2)
    classes = classes or found
    missing, extra = set(classes) - set(found), set(found) - set(classes)
    if extra or (missing and not subset):
        raise DataError(f"{root} has classes {sorted(found)} but {sorted(classes)} were expected "
                        f"(missing: {sorted(missing)}, extra: {sorted(extra)})")
    samples, skipped = [], []
    for label, name in enumerate(classes):
        if name in missing:
            continue
        files = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {root / name} has no images "
                            f"(extensions: {', '.join(IMG_EXTENSIONS)})")
        for path in files:
            reason = check_image(_resolve_inside(path, root))
            if reason is None:
                samples.append((path, label))
            else:
                skipped.append((path, reason))
    if skipped and on_corrupt == "fail":
        listing = "\n".join(f"  {p}: {r}" for p, r in skipped[:20])
        raise DataError(f"{len(skipped)} unreadable image(s) under {root} (use --on-corrupt "
                        f"skip to leave them out):\n{listing}")
    for path, reason in skipped:
        log.warning("skipping unreadable image %s: %s", path, reason)
    return ImageFolderIndex(root, classes, samples, skipped)


def dataset_fingerprint(indexes: list[ImageFolderIndex]) -> str:
    """sha256 over relative paths, labels and file sizes: changes when the data does."""
    digest = hashlib.sha256()
    for index in indexes:
        for path, label in index.samples:
            rel = path.relative_to(index.root).as_posix()
            digest.update(f"{index.root.name}/{rel}\t{label}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def load_image_tensor(path: Path) -> torch.Tensor:
    """Decode to a uint8 CHW tensor with 1 or 3 channels (palette/alpha/CMYK -> RGB), upright
    (EXIF orientation applied, as the serving path does)."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        return F.pil_to_tensor(image)


class ImageListDataset(Dataset):
    """(uint8 image tensor -> transform, label) for each sample of an ImageFolderIndex."""

    def __init__(self, samples: list[tuple[Path, int]],
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_image_tensor(path)), label


def loader_workers(num_workers: int) -> dict:
    """DataLoader arguments for `num_workers` worker processes, started by spawn, not fork.

    A fork copies the parent mid-flight: a lock held at that instant by another of its
    threads (a connection pool's, a progress bar's monitor, the OpenMP pool of torch's
    earlier computations) stays locked in the child for ever, and training hangs waiting for
    a worker that never answers; a test run saw exactly that. Spawned workers start clean
    (~2.5 s per loader on 2 cores). Not the fork server either: its workers' parent is the
    server, which outlives a main process killed with kill -9, so they would never notice
    the death and would linger, holding memory and the job's stdout.
    """
    if num_workers <= 0:
        return {"num_workers": 0}
    return {"num_workers": num_workers, "multiprocessing_context": "spawn"}
