"""In-memory image datasets (uint8 tensors) with vectorised batch gathering, augmentation and normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BatchDataset


def random_crop(images: Tensor, pad: int, generator: torch.Generator | None) -> Tensor:
    """Zero-pad a N x C x H x W batch by `pad` and cut an H x W window at a random offset per image."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    top, left = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=generator)
    rows = (top + torch.arange(h))[:, None, :, None]
    cols = (left + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def random_hflip(images: Tensor, generator: torch.Generator | None) -> Tensor:
    """Mirror each image of a N x C x H x W batch left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class Normalize:
    """Maps uint8 C x H x W images (or batches of them) to float32 (x / 255 - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __call__(self, images: Tensor) -> Tensor:
        return images.float() * self._scale - self._shift


class TensorImageDataset(BatchDataset):
    """uint8 N x C x H x W images and int64 labels, served normalised to float32 and optionally crop/flip-augmented."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        hflip: bool = False,
    ) -> None:
        self.images = images
        self.labels = labels
        self.normalize = Normalize(mean, std)
        self.crop_padding = crop_padding
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Gather, augment (randomness from `generator`, or torch's global one if None) and normalise a batch."""
        images = self.images[indices]
        if self.crop_padding:
            images = random_crop(images, self.crop_padding, generator)
        if self.hflip:
            images = random_hflip(images, generator)
        return self.normalize(images), self.labels[indices]

    def subset(self, indices: Tensor) -> TensorImageDataset:
        """The items at `indices`, with the same normalisation and augmentation."""
        mean, std = self.normalize.mean, self.normalize.std
        return TensorImageDataset(self.images[indices], self.labels[indices], mean, std, self.crop_padding, self.hflip)
