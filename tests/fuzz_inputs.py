"""Hypothesis strategies for request bodies: real image bytes, mutated real image bytes,
generated images in every mode and format Pillow writes, and plain random bytes.

Mutation fuzzing starts from real files (a Fashion-MNIST PNG and scikit-image photos in
each format), because random bytes almost never get past an image header: the decoders'
interesting paths are behind a valid signature.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data as skdata

# `make test` tries a few hundred inputs per test, deterministically (CI must not flake on a
# new random seed); `make soak` sets VISIONLOOP_FUZZ_EXAMPLES high and random.
EXAMPLES = int(os.environ.get("VISIONLOOP_FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         derandomize="VISIONLOOP_FUZZ_EXAMPLES" not in os.environ,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def seed_images(fashion_png: Path) -> dict[str, bytes]:
    """Real images, one per format and colour layout the decoders distinguish."""
    photo = Image.fromarray(skdata.astronaut()).resize((96, 96))
    coffee = Image.fromarray(skdata.coffee()).resize((80, 60))
    return {
        "fashion-mnist png (gray)": fashion_png.read_bytes(),
        "jpeg baseline": _encode(photo, "JPEG", quality=85),
        "jpeg progressive": _encode(coffee, "JPEG", progressive=True),
        "jpeg cmyk": _encode(photo.convert("CMYK"), "JPEG"),
        "png rgba": _encode(photo.convert("RGBA"), "PNG"),
        "png palette": _encode(photo.convert("P"), "PNG"),
        "png 16-bit gray": _encode(Image.fromarray(
            np.asarray(photo.convert("L"), dtype=np.uint16) * 257), "PNG"),
        "gif": _encode(photo.convert("P"), "GIF"),
        "webp": _encode(photo, "WEBP"),
        "bmp": _encode(photo, "BMP"),
        "tiff": _encode(photo, "TIFF"),
    }


@st.composite
def mutated(draw: st.DrawFn, seeds: dict[str, bytes]) -> bytes:
    """A real image with 1-8 byte-level mutations: flips, overwrites, cuts, insertions,
    duplicated ranges, and splices with another real image."""
    data = bytearray(draw(st.sampled_from(sorted(seeds.values()))))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "repeat",
                                     "splice"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":  # extreme values land in length and dimension fields
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 256))]
        else:
            other = draw(st.sampled_from(sorted(seeds.values())))
            data[at:] = other[draw(st.integers(0, len(other) - 1)):]
    return bytes(data)


@st.composite
def generated(draw: st.DrawFn) -> bytes:
    """A valid image of any mode, any size from 1x1 to thin strips, in any format."""
    mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]))
    width = draw(st.one_of(st.integers(1, 64), st.sampled_from([1, 2, 3, 4000])))
    height = draw(st.one_of(st.integers(1, 64), st.sampled_from([1, 2, 3, 4000])))
    image = Image.new(mode, (width, height), draw(st.integers(0, 255)))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]))
    try:
        return _encode(image, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode
        return _encode(image.convert("RGB"), fmt)


class Body(bytes):
    """Request bytes whose repr stays one line: a failing example can be megabytes."""

    def __repr__(self) -> str:
        return (f"Body({len(self)} bytes, sha256 {hashlib.sha256(self).hexdigest()[:16]}, "
                f"starts {bytes(self[:24])!r})")


def request_bodies(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(seeds), generated(), st.sampled_from(sorted(seeds.values())),
                     st.binary(max_size=2048)).map(Body)
