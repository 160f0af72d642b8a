"""Training-time augmentation presets, applied to uint8 CHW tensors before normalisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from core.manifest import Preprocessing
from core.preprocess import normalize, resize_and_crop, to_rgb
from trainer.config import AUGMENT_PRESETS as PRESETS


def _augmentations(preset: str, size: int) -> list[torch.nn.Module]:
    crop = v2.RandomResizedCrop(size, scale=(0.7, 1.0), antialias=True)
    flip = v2.RandomHorizontalFlip()
    if preset == "light":
        return [crop, flip]
    if preset == "standard":
        return [crop, flip, v2.RandomRotation(10),
                v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2)]
    if preset == "strong":
        return [crop, flip, v2.TrivialAugmentWide()]
    return []


def train_transform(pre: Preprocessing, preset: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 image -> augmented, normalised float tensor of pre.image_size."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {PRESETS}")
    augment = v2.Compose(_augmentations(preset, pre.image_size))
    # Random erasing works on the normalised tensor, as in torchvision's references.
    erase = v2.RandomErasing(p=0.25) if preset == "strong" else None

    def transform(image: torch.Tensor) -> torch.Tensor:
        image = augment(resize_and_crop(to_rgb(image), pre))
        image = normalize(image, pre)
        return erase(image) if erase else image

    return transform
