"""In-memory image datasets (uint8 tensors) with vectorised batch gathering, augmentation and normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import BatchDataset


def random_crop_flip(images: Tensor, pad: int, hflip: bool, generator: torch.Generator | None) -> Tensor:
    """Per image of a N x C x H x W batch: an H x W window of the image zero-padded by `pad` at a random offset,
    mirrored left-right with probability 1/2 if `hflip`; done as one gather, as per-item Python would be too slow."""
    n, c, h, w = images.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    padded = images.new_zeros(n, c, hp, wp)
    padded[:, :, pad : pad + h, pad : pad + w] = images
    top, left = torch.randint(0, 2 * pad + 1, (2, n, 1, 1, 1), generator=generator)
    cols = torch.arange(w).expand(n, 1, 1, w)
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flip.view(n, 1, 1, 1), w - 1 - cols, cols)
    rows = top + torch.arange(h).view(1, 1, h, 1)
    index = (torch.arange(c).view(1, c, 1, 1) * hp + rows) * wp + left + cols
    return padded.view(n, -1).gather(1, index.view(n, -1)).view(n, c, h, w)


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
        if self.crop_padding or self.hflip:
            images = random_crop_flip(images, self.crop_padding, self.hflip, generator)
        return self.normalize(images), self.labels[indices]

    def subset(self, indices: Tensor) -> TensorImageDataset:
        """The items at `indices`, with the same normalisation and augmentation."""
        mean, std = self.normalize.mean, self.normalize.std
        return TensorImageDataset(self.images[indices], self.labels[indices], mean, std, self.crop_padding, self.hflip)
