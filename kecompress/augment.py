"""Augmentation that suits the images: training and validation transforms on uint8 image tensors.

Three presets (``kecompress evolve --augment``):

- ``resized-crop``: ImageNet's random-resized crop (a random ``crop_scale`` share of the image's
  area at a random aspect ratio, resized to the input size) and a horizontal flip;
- ``pad-crop``: the image at the input size, padded by an eighth of it on every side (reflected)
  and cropped back at a random place, and a horizontal flip: CIFAR's augmentation, for small
  images, where a resized crop of 8% of 32x32 pixels leaves little of the object;
- ``none``: the image at the input size.

By default ``pad-crop`` up to 64 px and ``resized-crop`` above. Validation images are resized so
that their shorter side is the input size and centre-cropped to a square: what training sees,
not ImageNet's 224-of-256 crop that cuts away the borders.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from .errors import KecompressError

AUGMENTATIONS = ("resized-crop", "pad-crop", "none")
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default
SMALL_IMAGES = 64  # up to this input size, pad-crop by default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_augmentation(image_size: int) -> str:
    """``pad-crop`` for small inputs, ``resized-crop`` for larger ones.

    Example:
        >>> default_augmentation(32), default_augmentation(224)
        ('pad-crop', 'resized-crop')
    """
    return "pad-crop" if image_size <= SMALL_IMAGES else "resized-crop"


def check_augmentation(augment: str, crop_scale=CROP_SCALE) -> None:
    """One line for an unknown preset or a crop scale outside (0, 1].

    Example:
        >>> check_augmentation("pad-crop")
    """
    if augment not in AUGMENTATIONS:
        raise KecompressError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise KecompressError(f"the crop scale must be two fractions 0 < min <= max <= 1, got {low} {high}: "
                              "e.g. --crop-scale 0.35 1")


def stored_size(augment: str, image_size: int) -> int:
    """The shorter side an image is kept at in memory: the input size, or for resized crops a little
    more (ImageNet's 256 for 224), so that a crop of part of the image keeps its detail.

    Example:
        >>> stored_size("pad-crop", 32), stored_size("resized-crop", 224)
        (32, 256)
    """
    return math.ceil(image_size * 256 / 224) if augment == "resized-crop" else image_size


def train_transform(augment: str, image_size: int, crop_scale=CROP_SCALE) -> v2.Compose:
    """The training transform of a preset, from a uint8 CHW tensor to a normalised float one.

    Example:
        >>> image = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
        >>> train_transform("pad-crop", 32)(image).shape
        torch.Size([3, 32, 32])
    """
    check_augmentation(augment, crop_scale)
    if augment == "resized-crop":
        geometry = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True), v2.RandomHorizontalFlip()]
    elif augment == "pad-crop":
        geometry = [*_at_size(image_size), v2.RandomCrop(image_size, padding=max(image_size // 8, 1),
                                                         padding_mode="reflect"), v2.RandomHorizontalFlip()]
    else:
        geometry = _at_size(image_size)
    return v2.Compose([*geometry, *_normalised()])


def val_transform(image_size: int) -> v2.Compose:
    """The validation transform: the shorter side at the input size, the centre square.

    Example:
        >>> val_transform(32)(torch.zeros(3, 40, 64, dtype=torch.uint8)).shape
        torch.Size([3, 32, 32])
    """
    return v2.Compose([*_at_size(image_size), *_normalised()])


def _at_size(image_size: int) -> list:
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]


def _normalised() -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
