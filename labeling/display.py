"""What an annotator's browser is shown of a captured image.

Label Studio 1.23.2's image tag fails on very small images: a 28x28 PNG showed "There was
an issue loading URL from $image value" in Chromium 156, served as a local file or as a
data: URI alike, while 64 px and larger rendered (tests/test_browser.py). So an image whose
short side is below MIN_SIDE gets a display copy, enlarged by a whole factor with
nearest-neighbour sampling (the same pixels, bigger), under captures/display/. Training,
pull and the ML backend keep using the original (push puts it in the task as
`capture_image`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image

from visionloop.core.capture_store import image_path

MIN_SIDE = 64


def display_dir(capture_dir: Path) -> Path:
    return Path(capture_dir) / "display"


def display_path(capture_dir: Path, sha: str) -> Path:
    original = image_path(capture_dir, sha)  # validates the sha
    return display_dir(capture_dir) / original.parent.name / f"{sha}.png"


def display_image(capture_dir: Path, sha: str) -> Path:
    """The file to show for a capture: the original, or its enlarged copy (made once)."""
    original = image_path(capture_dir, sha)
    with Image.open(original) as image:
        short = min(image.size)
        if short >= MIN_SIDE:
            return original
        target = display_path(capture_dir, sha)
        if target.exists():
            return target
        factor = math.ceil(MIN_SIDE / max(short, 1))
        enlarged = image.resize((image.width * factor, image.height * factor),
                                Image.Resampling.NEAREST)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    enlarged.save(staged, "PNG")
    os.replace(staged, target)
    return target
