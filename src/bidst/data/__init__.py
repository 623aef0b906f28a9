"""Dataset registry (`list_datasets`, `dataset_info`, `create_dataset`) with a fixed train/val split, and the loader."""

from __future__ import annotations

import torch

from ..errors import BidstError
from . import cifar, idx, imagenet, synthetic  # noqa: F401  (modules register their datasets on import)
from .base import DATASETS, BatchDataset, DatasetInfo
from .loader import EpochLoader, indexed_batches, make_loader, num_batches

__all__ = [
    "BatchDataset",
    "DatasetInfo",
    "EpochLoader",
    "HOLDOUT_SPLIT_SEED",
    "create_dataset",
    "dataset_info",
    "fixed_split",
    "indexed_batches",
    "list_datasets",
    "make_loader",
    "num_batches",
]

SPLITS = ("train", "val", "test")
VAL_SPLIT_SEED = 20240601  # fixed, independent of any run seed: every run sees the same validation items
HOLDOUT_SPLIT_SEED = 20240602  # the same for the items a run holds out of training (`holdout_size`)


def list_datasets() -> list[str]:
    """Names of all registered datasets, sorted."""
    return DATASETS.names()


def dataset_info(name: str) -> DatasetInfo:
    """Classes, channels and image size of the named dataset; an unknown name raises BidstError."""
    return DATASETS.get(name)().info


def create_dataset(
    name: str, split: str, *, root: str | None = None, val_size: int = 5000, augment: bool = False
) -> BatchDataset:
    """The train, val or test split; val: a fixed `val_size`-item part of the official training set; train: the rest."""
    if split not in SPLITS:
        raise BidstError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    source = DATASETS.get(name)()
    if split == "test":
        return source.load(root, False, augment)
    if split == "val" and val_size == 0:
        raise BidstError(f"{name}: no 'val' split with val_size=0")
    full = source.load(root, True, augment)
    if not 0 <= val_size < len(full):
        raise BidstError(f"{name}: val_size={val_size} must be in 0..{len(full) - 1} (the training set's size - 1)")
    if val_size == 0:
        return full
    chosen, rest = fixed_split(len(full), val_size, VAL_SPLIT_SEED)
    return full.subset(chosen if split == "val" else rest)


def fixed_split(num_items: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(`size` indices, the other ones) of range(num_items), each ascending, from a permutation seeded by `seed`:
    a split that is the same in every run."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return order[:size].sort().values, order[size:].sort().values
