"""What every dataset module shares: the info record, the name registry and the batched-access base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    """The shape of a dataset's items, which is what a model needs to be built for it."""

    num_classes: int
    in_channels: int
    image_size: int


class BatchDataset(Dataset[tuple[Tensor, Tensor]], ABC):
    """A dataset that hands out whole batches (no per-item Python in memory), randomness from a given generator."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def get_batch(self, indices: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Normalised float32 B x C x H x W images and int64 labels at `indices` (generator None: torch's)."""

    @abstractmethod
    def subset(self, indices: Tensor) -> BatchDataset:
        """The items at `indices`, with the same transforms."""

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.get_batch(torch.tensor([index]), None)
        return x[0], y[0]


# load(root, train, augment): the official training (train=True) or test set
Loader = Callable[[str | None, bool, bool], BatchDataset]


@dataclass(frozen=True)
class DatasetSource:
    """A registered dataset: its info and the function that loads its official train or test set."""

    info: DatasetInfo
    load: Loader


DATASETS: Registry[DatasetSource] = Registry("dataset")


def register(name: str, info: DatasetInfo) -> Callable[[Loader], Loader]:
    """Decorator registering `load(root, train, augment)` as dataset `name` with the given info."""

    def wrap(load: Loader) -> Loader:
        DATASETS.register(name)(lambda: DatasetSource(info, load))
        return load

    return wrap
