"""Training-time augmentation presets, applied to uint8 CHW tensors before normalisation."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from visionloop.core.manifest import Preprocessing
from visionloop.core.preprocess import normalize, resize_and_crop, to_rgb
from visionloop.trainer.config import AUGMENT_PRESETS as PRESETS


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


class TrainTransform:
    """uint8 image -> augmented, normalised float tensor of pre.image_size.

    A class, not a closure: spawned DataLoader workers receive it pickled.
    """

    def __init__(self, pre: Preprocessing, preset: str) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; choose from {PRESETS}")
        self.pre = pre
        self.augment = v2.Compose(_augmentations(preset, pre.image_size))
        # Random erasing works on the normalised tensor, as in torchvision's references.
        self.erase = v2.RandomErasing(p=0.25) if preset == "strong" else None

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.augment(resize_and_crop(to_rgb(image), self.pre))
        image = normalize(image, self.pre)
        return self.erase(image) if self.erase else image

