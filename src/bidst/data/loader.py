"""Deterministic, resumable, rank-sharded batches: batch b of an epoch is a pure function of (seed, epoch, rank, b)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import BidstError, SharedError
from .base import BatchDataset

# stream tags, so order, augmentation, held-out and worker-seed draws are unrelated
PERMUTATION, AUGMENTATION, HOLDOUT, WORKERS = 0, 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers, stable across processes, platforms and Python versions."""
    data = b"".join(int(p).to_bytes(16, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def epoch_order(
    num_items: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1, drop_last: bool = False
) -> Tensor:
    """This rank's item indices: every world_size-th of a (seed, epoch) permutation, so that all ranks get the same
    number: cut to a multiple of world_size with `drop_last` (as DistributedSampler(drop_last=True): batch b of
    every rank together is then items b·B..(b+1)·B-1 of the permutation, as in one process), else padded by
    repeating its start (DistributedSampler's default; evaluation trims the repeats)."""
    if shuffle:
        generator = torch.Generator().manual_seed(derive_seed(PERMUTATION, seed, epoch))
        order = torch.randperm(num_items, generator=generator)
    else:
        order = torch.arange(num_items)
    total = num_items // world_size * world_size if drop_last else math.ceil(num_items / world_size) * world_size
    if total > num_items:  # repeat from the start, as DistributedSampler pads
        order = order.repeat(math.ceil(total / num_items))[:total]
    return order[rank:total:world_size]


def num_batches(num_items: int, *, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches per epoch on each rank (with `drop_last`, of the order cut to a multiple of world_size)."""
    if drop_last:
        return num_items // world_size // batch_size
    return math.ceil(math.ceil(num_items / world_size) / batch_size)


class EpochLoader(Dataset[tuple[Tensor, Tensor]]):
    """One epoch's batches of `order` from `start_batch` on; `len()` counts them; `loader[k]` is start_batch + k."""

    def __init__(
        self, dataset: Dataset, order: Tensor, *, batch_size: int, num_batches: int, start_batch: int,
        seed: int, epoch: int, rank: int, num_workers: int,
    ) -> None:  # fmt: skip
        self.dataset, self.order = dataset, order
        self.batch_size, self.num_batches, self.start_batch = batch_size, num_batches, start_batch
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.num_workers = num_workers

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        b = self.start_batch + k
        indices = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        if isinstance(self.dataset, BatchDataset):
            generator = torch.Generator().manual_seed(derive_seed(AUGMENTATION, self.seed, self.epoch, self.rank, b))
            return self.dataset.get_batch(indices, generator)
        # a plain map-style dataset: any randomness in it comes from torch's global generator, so it is not reproducible
        return default_collate([self.dataset[int(i)] for i in indices])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.num_workers == 0:
            return (self[k] for k in range(len(self)))
        # workers fetch whole batches; each batch seeds its own generator, so results do not depend on the worker count
        # (its workers' base seed from a generator of its own: drawn from torch's global one, it moved that generator,
        # which checkpoints save, so a resumed run's differed from an uninterrupted one's)
        seeds = torch.Generator().manual_seed(derive_seed(WORKERS, self.seed, self.epoch, self.rank, self.start_batch))
        loader = DataLoader(ErrorsAsItems(self), batch_size=None, shuffle=False, num_workers=self.num_workers,
                            generator=seeds)  # fmt: skip
        return raise_errors(iter(loader))


class ErrorsAsItems(Dataset[tuple[Tensor, Tensor] | BidstError]):
    """`loader[k]`, or the BidstError it raised: a DataLoader worker's errors would come wrapped in its traceback."""

    def __init__(self, loader: EpochLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor] | BidstError:
        try:
            return self.loader[k]
        except BidstError as e:
            return e


def raise_errors(items: Iterator[tuple[Tensor, Tensor] | BidstError]) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches of `items`, raising the first BidstError among them in this process, as its one line."""
    for item in items:
        if isinstance(item, BidstError):
            raise item
        yield item


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    num_workers: int = 0,
) -> EpochLoader:
    """The batches of one epoch from `start_batch` on, the same as an uninterrupted epoch's (for bit-exact resume)."""
    if batch_size < 1 or not 0 <= rank < world_size or start_batch < 0 or num_workers < 0:
        raise BidstError(
            f"bad loader settings: batch_size={batch_size}, rank={rank} of world_size={world_size}, "
            f"start_batch={start_batch}, num_workers={num_workers}"
        )
    n = len(dataset)  # type: ignore[arg-type]
    order = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last)
    total = num_batches(n, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
    return EpochLoader(
        dataset, order, batch_size=batch_size, num_batches=total, start_batch=min(start_batch, total),
        seed=seed, epoch=epoch, rank=rank, num_workers=num_workers,
    )  # fmt: skip


def indexed_batches(
    dataset: BatchDataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> Callable[[int], tuple[Tensor, Tensor]]:
    """batch(j): this rank's share of the j-th `batch_size` batch of an endless reshuffled stream over `dataset`.

    A pure function of (seed, j, rank), so a resumed run draws what an uninterrupted one would (it
    serves held-out data, e.g. to BiDST's upper level).
    """
    if batch_size % world_size:
        raise SharedError(f"a held-out batch of {batch_size} items does not split evenly over {world_size} processes")
    per = num_batches(len(dataset), batch_size=batch_size // world_size, world_size=world_size, drop_last=True)
    if per == 0:
        raise SharedError(f"a held-out batch of {batch_size} items is larger than the {len(dataset)} held-out items")
    local = batch_size // world_size

    def batch(j: int) -> tuple[Tensor, Tensor]:
        order = epoch_order(len(dataset), shuffle=True, seed=derive_seed(HOLDOUT, seed), epoch=j // per,
                            rank=rank, world_size=world_size, drop_last=True)  # fmt: skip
        b = j % per
        generator = torch.Generator().manual_seed(derive_seed(HOLDOUT, seed, j, rank))  # any augmentation, seeded
        return dataset.get_batch(order[b * local : (b + 1) * local], generator)

    return batch
