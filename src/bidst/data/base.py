"""What every dataset module shares: the info record, the name registry, and the batched-access protocol the loader uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..registry import Registry


@dataclass(frozen=True)
class DatasetInfo:
    """The shape of a dataset's items, which is what a model needs to be built for it."""

    num_classes: int
    in_channels: int
    image_size: int


@runtime_checkable
class BatchDataset(Protocol):
    """A dataset that hands out whole batches, with all randomness (augmentation) drawn from the given generator."""

    def __len__(self) -> int: ...

    def get_batch(self, indices: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]: ...

    def subset(self, indices: Tensor) -> BatchDataset: ...


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
