"""Refuse a model archive before TorchServe unpacks it: TorchServe extracts every .mar
member under its own temp directory, so a member named `../x` or `/x`, or a symbolic link,
would write outside it ("zip slip"), and a zip bomb would fill the disk."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

from visionloop.core.errors import InputError

MAX_UNPACKED_BYTES = 8 << 30  # a big ViT in fp32 is ~1.2 GB; 8 GB is far past any model


class ArchiveError(InputError):
    """An archive that must not be served."""


def check_archive(path: Path, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArchiveError(f"{path} is not a readable model archive: {exc}") from exc
    total = 0
    for member in members:
        name = member.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise ArchiveError(f"{path}: member {member.filename!r} would be unpacked outside "
                               "the model's directory")
        if stat.S_ISLNK(member.external_attr >> 16):
            raise ArchiveError(f"{path}: member {member.filename!r} is a symbolic link")
        total += member.file_size
    if total > max_unpacked_bytes:
        raise ArchiveError(f"{path} unpacks to {total} bytes; the limit is {max_unpacked_bytes}")
