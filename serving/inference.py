"""The request path as pure functions: decode -> preprocess -> (backend) -> postprocess."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from visionloop.core.manifest import ModelManifest
from visionloop.core.preprocess import preprocess_image
from visionloop.core.reply import ClassScore, Prediction, Uncertainty

DEFAULT_MAX_PIXELS = 40_000_000  # about 6300 x 6300; far above any photo a classifier needs
DEFAULT_MAX_BYTES = 6_000_000  # under TorchServe's own max_request_size (6,553,500)
# Resizing the short side to the model's size scales the long side with it: a 3955-byte
# 4,000,000x1 PNG would become a 128,000,000x32 tensor (12 GB). Panoramas stay under 32:1.
DEFAULT_MAX_ASPECT_RATIO = 32


class BadInput(ValueError):
    """A request the client must fix; `status` is the HTTP code to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Limits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO


def decode(data: bytes | bytearray | None, limits: Limits = Limits()) -> torch.Tensor:
    """Image bytes -> uint8 CHW tensor (1 to 4 channels), or BadInput with the reason.

    JPEG goes through torchvision.io (libjpeg-turbo); every other format through Pillow,
    because torchvision's PNG decoder crashes the process on some corrupt files (found by
    tests/test_fuzz.py: a flipped bit in the deflate stream, "invalid distance too far
    back", is a segfault rather than an exception)."""
    if not data:
        raise BadInput(400, "empty request body: send the image bytes (JPEG, PNG, GIF, WebP)")
    if len(data) > limits.max_bytes:
        raise BadInput(413, f"request body is {len(data)} bytes; the limit is {limits.max_bytes}")
    # Read only the header first: a decompression bomb is refused before any pixel is decoded.
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height, fmt = *header.size, header.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInput(400, f"body is not a readable image ({type(exc).__name__}: {exc})") from exc
    except Image.DecompressionBombError as exc:
        raise BadInput(413, f"image too large: {exc}") from exc
    if width * height > limits.max_pixels:
        raise BadInput(413, f"image is {width}x{height} = {width * height} pixels; "
                            f"the limit is {limits.max_pixels}")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise BadInput(400, f"image is {width}x{height}; the aspect ratio limit is "
                            f"{limits.max_aspect_ratio:g}:1")
    if fmt == "JPEG":
        return _decode_jpeg(data)
    return _decode_with_pillow(data)


def _decode_jpeg(data: bytes | bytearray) -> torch.Tensor:
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        # a phone photo is stored sideways with an EXIF orientation: decode it upright
        return decode_jpeg(buffer, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)
    except RuntimeError as exc:  # truncated or corrupt pixel data
        raise BadInput(400, f"image could not be decoded: {str(exc).splitlines()[0]}") from exc


_PILLOW_LAYOUTS = {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA", "1": "L", "P": "RGBA",
                   "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def _decode_with_pillow(data: bytes | bytearray) -> torch.Tensor:
    """The first frame, as uint8 with 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) channels. 16-bit
    and 32-bit gray keep their top 8 bits of a 16-bit range, as PNG stores them."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # upright, as the JPEG path
            if image.mode in _PILLOW_LAYOUTS:
                array = np.asarray(image.convert(_PILLOW_LAYOUTS[image.mode]))
            else:  # I;16*, I, F: one high-bit-depth gray channel
                array = (np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise BadInput(400, f"image could not be decoded ({type(exc).__name__}: {exc})") from exc
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))  # a writable copy


def preprocess_batch(images: list[torch.Tensor], manifest: ModelManifest) -> torch.Tensor:
    return torch.stack([preprocess_image(image, manifest.preprocessing) for image in images])


def uncertainty(probabilities: torch.Tensor) -> Uncertainty:
    """max_prob (confidence), margin (top1 - top2), entropy normalised to [0, 1] by log(C)."""
    top2 = probabilities.topk(min(2, len(probabilities))).values
    margin = float(top2[0] - top2[1]) if len(top2) > 1 else 1.0
    entropy = float(-(probabilities * probabilities.clamp_min(1e-12).log()).sum())
    return Uncertainty(max_prob=float(top2[0]), margin=margin,
                       entropy=entropy / math.log(len(probabilities)))


def postprocess(logits: torch.Tensor, manifest: ModelManifest,
                top_k: int = 5) -> list[Prediction]:
    """Logits [N, C] -> per image: calibrated top-k, all probabilities, uncertainty scores."""
    probabilities = torch.softmax(logits.float() / manifest.temperature, dim=1)
    k = min(top_k, probabilities.shape[1])
    replies = []
    for row in probabilities:
        values, indices = row.topk(k)
        scores = uncertainty(row)
        replies.append(Prediction(
            model=manifest.name, version=manifest.version,
            predictions=tuple(ClassScore(manifest.classes[i], round(float(p), 6))
                              for p, i in zip(values, indices.tolist(), strict=True)),
            uncertainty=Uncertainty(round(scores.max_prob, 6), round(scores.margin, 6),
                                    round(scores.entropy, 6)),
            probabilities=tuple(round(float(p), 6) for p in row)))
    return replies


def predict_batch(backend: Callable[[torch.Tensor], torch.Tensor], manifest: ModelManifest,
                  bodies: list, limits: Limits = Limits(),
                  top_k: int = 5) -> list[Prediction | BadInput]:
    """Decode every body (its BadInput where that fails), run the good ones as one batch:
    one reply or BadInput per body, in order. The handler and serving.offline both use it."""
    results: list[Prediction | BadInput | None] = [None] * len(bodies)
    images, good = [], []
    for i, body in enumerate(bodies):
        try:
            images.append(decode(body, limits))
            good.append(i)
        except BadInput as exc:
            results[i] = exc
    if images:
        logits = backend(preprocess_batch(images, manifest))
        for i, reply in zip(good, postprocess(logits, manifest, top_k), strict=True):
            results[i] = reply
    return results
