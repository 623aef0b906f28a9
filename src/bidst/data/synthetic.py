"""Deterministic, learnable class-conditional images (a fixed smooth pattern per class plus noise), for fast tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DatasetInfo, register
from .tensor import TensorImageDataset

SIZES = {True: 10000, False: 2000}  # items in the official train / test sets
PATTERN_SEED, SPLIT_SEEDS = 0, {True: 1, False: 2}  # one set of class patterns shared by both splits
SIGNAL, NOISE = 40.0, 48.0  # grey-level amplitude of the class pattern and of the per-item Gaussian noise
MEAN, STD = 0.51, 0.215  # measured pixel statistics of the generated images


def synthetic_images(n: int, info: DatasetInfo, seed: int) -> tuple[Tensor, Tensor]:
    """`n` uint8 images (class pattern + noise around grey 128), balanced int64 labels: a pure function of `seed`."""
    c, s = info.in_channels, info.image_size
    coarse = torch.randn(info.num_classes, c, 7, 7, generator=torch.Generator().manual_seed(PATTERN_SEED))
    patterns = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % info.num_classes)[torch.randperm(n, generator=g)]
    images = 128 + SIGNAL * patterns[labels] + NOISE * torch.randn(n, c, s, s, generator=g)
    return images.round().clamp(0, 255).to(torch.uint8), labels


def register_synthetic(name: str, info: DatasetInfo, crop_padding: int, hflip: bool) -> None:
    """Register a synthetic dataset of shape `info`, augmented (if asked) by random crops and flips."""

    @register(name, info)
    def load(root: str | None, train: bool, augment: bool) -> TensorImageDataset:
        images, labels = synthetic_images(SIZES[train], info, SPLIT_SEEDS[train])
        return TensorImageDataset(
            images, labels, [MEAN] * info.in_channels, [STD] * info.in_channels,
            crop_padding=crop_padding if augment else 0, hflip=hflip and augment,
        )  # fmt: skip


register_synthetic("synthetic", DatasetInfo(10, 1, 28), crop_padding=2, hflip=False)
register_synthetic("synthetic-rgb", DatasetInfo(10, 3, 32), crop_padding=4, hflip=True)
