"""Turn a decoded image into the network's input, exactly as the manifest says.

Trainer evaluation and serving both call `preprocess_image`, so the tensor a served
model sees is built by the same operations, in the same order, as in evaluation.
Images are handled as uint8 CHW tensors (what torchvision.io decodes to).
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from visionloop.core.manifest import Preprocessing


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """uint8 CHW with 1, 2 (gray+alpha), 3 or 4 (RGBA) channels -> 3-channel uint8 CHW."""
    if image.ndim != 3:
        raise ValueError(f"expected a CHW image tensor, got shape {tuple(image.shape)}")
    channels = image.shape[0]
    if channels in (1, 2):
        return image[:1].expand(3, -1, -1)
    if channels in (3, 4):
        return image[:3]
    raise ValueError(f"images with {channels} channels are not supported; use 1, 2, 3 or 4")


def resize_and_crop(image: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    interpolation = InterpolationMode(pre.interpolation)
    image = F.resize(image, [pre.resize], interpolation=interpolation, antialias=True)
    return F.center_crop(image, [pre.image_size, pre.image_size])


def normalize(image: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 CHW -> float32 CHW scaled to [0, 1] then normalised with the backbone's mean/std."""
    image = F.to_dtype(image, torch.float32, scale=True)
    return F.normalize(image, mean=list(pre.mean), std=list(pre.std))


def preprocess_image(image: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """The evaluation/serving transform: RGB, resize, centre crop, normalise."""
    return normalize(resize_and_crop(to_rgb(image), pre), pre)
