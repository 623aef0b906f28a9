"""DDP plumbing: join torchrun's process group, do once-only work on rank 0, and prove that ranks agree."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import BidstError, SharedError

T = TypeVar("T")


def world_size() -> int:
    """Processes in the default group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def launch(device: torch.device) -> Iterator[torch.device]:
    """Join the group torchrun describes (WORLD_SIZE > 1) unless one exists, and yield this rank's device.

    The backend is nccl for CUDA and gloo for the CPU; a CUDA rank uses GPU LOCAL_RANK. A group
    created here is destroyed on exit; one the caller created is left alone.
    """
    wanted = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device.type == "cuda" and (wanted or world_size() > 1):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    created = wanted and not dist.is_initialized()
    if created:
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as exc:
            raise BidstError(f"cannot join the process group: {str(exc).strip().splitlines()[0]}") from None
    done = False
    try:
        yield device
        done = True
    finally:
        if created:
            if done:  # no rank tears down its transport while another still uses it (gloo aborted at exit)
                dist.barrier()
            dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel when there are several ranks, else unchanged."""
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def collective_device() -> torch.device:
    """Where small tensors for a collective must live: the current GPU for nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over ranks in place (a no-op in a single process), so decisions made from it agree."""
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_mean_many(tensors: list[torch.Tensor]) -> None:
    """Average each of `tensors` over ranks in place with one all-reduce per dtype (a no-op in a single process).

    Every rank must pass tensors of the same shapes in the same order.
    """
    if world_size() == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        all_reduce_mean(flat)
        for tensor, part in zip(group, flat.split([t.numel() for t in group])):
            tensor.copy_(part.view_as(tensor))


def broadcast_state(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, as DistributedDataParallel does when it wraps a model."""
    if world_size() > 1:
        with torch.no_grad():
            for param in model.parameters():
                dist.broadcast(param, src=0)
        broadcast_buffers(model)


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, as DDP does before each forward."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _local_rank() -> int:
    """This process's index on its node (torchrun's LOCAL_RANK; the global rank when that is unset)."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def _run_and_agree(fn: Callable[[], T], here: bool) -> T | None:
    """Run `fn` on the ranks where `here`; if it failed on any rank, raise on every rank (SharedError elsewhere)."""
    result, message, failure = None, None, None
    if here:
        try:
            result = fn()
        except Exception as exc:
            message, failure = str(exc) or type(exc).__name__, exc
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, message)
    if failure is not None:
        raise failure
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise SharedError(first)
    return result


def each_node_first(fn: Callable[[], T]) -> T:
    """Run `fn` on each node's first process, then on the others (a download happens once per node)."""
    if world_size() == 1:
        return fn()
    first = _local_rank() == 0
    result = _run_and_agree(fn, first)
    return result if first else fn()  # type: ignore[return-value]


def on_rank0(fn: Callable[[], object]) -> None:
    """Run `fn` on rank 0 only (writing run files); the other ranks wait and stop too if it fails."""
    if world_size() == 1:
        fn()
    else:
        _run_and_agree(fn, rank() == 0)


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A position-weighted integer sum of `tensor`'s entries: equal tensors give equal sums on every rank."""
    flat = tensor.detach().reshape(-1).long()
    weights = torch.arange(flat.numel(), device=flat.device) * 2654435761 % 2147483647 + 1
    return (flat * weights).sum()


def differing(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the integer/bool `tensors` that differ between ranks (none in a single process), on every rank.

    One all-reduce of two integers per tensor.
    """
    if world_size() == 1 or not tensors:
        return []
    device = collective_device()
    sums = torch.stack([_checksum(t).to(device) for t in tensors.values()])
    extremes = torch.cat([sums, -sums])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    highest, lowest = extremes[: len(sums)].tolist(), (-extremes[len(sums) :]).tolist()
    return [name for name, hi, lo in zip(tensors, highest, lowest) if hi != lo]


def check_in_sync(tensors: dict[str, torch.Tensor], when: str) -> None:
    """Raise SharedError on every rank if any of the named integer/bool `tensors` differs between ranks.

    One all-reduce of two integers per tensor; cheap enough to run after every topology change.
    """
    drifted = differing(tensors)
    if drifted:
        raise SharedError(
            f"DDP ranks disagree on {', '.join(drifted[:3])} {when}: masks must be identical on every rank "
            "(a mask decision used per-rank data without Sparsifier.all_reduce_mean, or ranks used different seeds)"
        )
