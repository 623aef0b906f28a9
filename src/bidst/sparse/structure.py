"""The active positions of one weight tensor in CSR form (row = output channel), updated incrementally."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from numba import njit
from torch import Tensor

T = TypeVar("T")


@njit(cache=True)
def _group_by_channel(chan: np.ndarray, n_chan: int) -> tuple[np.ndarray, np.ndarray]:
    """Counting sort of slots by input channel: slots of channel c are perm[ptr[c]:ptr[c + 1]]."""
    ptr = np.zeros(n_chan + 1, np.int64)
    for p in range(chan.shape[0]):
        ptr[chan[p] + 1] += 1
    for c in range(n_chan):
        ptr[c + 1] += ptr[c]
    fill = ptr[:-1].copy()
    perm = np.empty(chan.shape[0], np.int64)
    for p in range(chan.shape[0]):
        c = chan[p]
        perm[fill[c]] = p
        fill[c] += 1
    return ptr, perm


_MERGE_ERRORS = {
    1: "a dropped position is not active or is repeated",
    2: "a grown position is active (before the drop) or is repeated",
}


@njit(cache=True)
def _sort_bounded(keys: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, argsort) of non-negative int64 keys below `bound`: LSD radix sort, 11 bits a pass."""
    n = keys.size
    order = np.arange(n)
    tmp = np.empty(n, np.int64)
    shift = 0
    while shift == 0 or (bound - 1) >> shift:
        counts = np.zeros(2049, np.int64)
        for i in range(n):
            counts[((keys[order[i]] >> shift) & 2047) + 1] += 1
        for d in range(2048):
            counts[d + 1] += counts[d]
        for i in range(n):
            d = (keys[order[i]] >> shift) & 2047
            tmp[counts[d]] = order[i]
            counts[d] += 1
        order, tmp = tmp, order
        shift += 11
    return keys[order], order


@njit(cache=True)
def _merge(
    flat: np.ndarray, drop: np.ndarray, grow: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One pass over sorted active, dropped and grown positions: (new flat, kept old slots, their new slots,
    grown slots, error)."""
    n_new = max(flat.size - drop.size + grow.size, 0)
    n_kept = max(flat.size - drop.size, 0)
    new_flat = np.empty(n_new, np.int64)
    kept_old = np.empty(n_kept, np.int64)
    kept_new = np.empty(n_kept, np.int64)
    grown_slots = np.empty(grow.size, np.int64)
    i = j = g = out = 0
    while i < flat.size or g < grow.size:
        if g < grow.size and (i == flat.size or grow[g] < flat[i]):
            if (g > 0 and grow[g] == grow[g - 1]) or out == n_new:
                return new_flat, kept_old, kept_new, grown_slots, 2
            new_flat[out] = grow[g]
            grown_slots[g] = out
            out += 1
            g += 1
            continue
        if g < grow.size and grow[g] == flat[i]:
            return new_flat, kept_old, kept_new, grown_slots, 2
        if j < drop.size and drop[j] == flat[i]:
            j += 1
        else:
            if (j < drop.size and drop[j] < flat[i]) or out == n_new or i - j == n_kept:
                return new_flat, kept_old, kept_new, grown_slots, 1
            new_flat[out] = flat[i]
            kept_old[i - j] = i
            kept_new[i - j] = out
            out += 1
        i += 1
    return new_flat, kept_old, kept_new, grown_slots, 0 if j == drop.size else 1


def _as_positions(positions: Tensor | np.ndarray, numel: int, what: str) -> np.ndarray:
    """Flat positions as a 1-D int64 numpy array, checked to lie inside the weight."""
    if isinstance(positions, Tensor):
        positions = positions.detach().cpu().numpy()
    pos = np.ascontiguousarray(np.asarray(positions).reshape(-1), dtype=np.int64)
    if pos.size and (pos.min() < 0 or pos.max() >= numel):
        raise ValueError(f"{what} positions must lie in [0, {numel})")
    return pos


class InputIndex(NamedTuple):
    """Slots grouped by input channel: channel c reads slots perm[ptr[c]:ptr[c + 1]].

    Read as CSR, (ptr, tcols, values[perm]) is the transposed weight (Linear) or the transposed,
    spatially flipped weight (Conv2d) whose forward computes the input gradient.
    """

    ptr: np.ndarray  # (in_channels + 1,) int64
    perm: np.ndarray  # (nnz,) int64 slot numbers
    rows: np.ndarray  # (nnz,) int32 output channel of each listed slot
    cols: np.ndarray  # (nnz,) int32 in-row position of each listed slot
    tcols: np.ndarray  # (nnz,) int32 position in the transposed (flipped) weight's row


@dataclass(frozen=True, eq=False)
class TopologyDelta:
    """How the compact value slots of a structure map onto those of its updated successor."""

    kept_old: np.ndarray  # (kept,) int64: old slots that stay active...
    kept_new: np.ndarray  # (kept,) int64: ...and their new slots
    grown_slots: np.ndarray  # (n grown,) int64: new slot of each grown position, in the caller's order
    old_nnz: int
    new_nnz: int

    def remap(self, old: Tensor, grown: Tensor | float = 0.0) -> Tensor:
        """A new (new_nnz, ...) tensor: kept slots carry `old`'s entries, grown slots get `grown`."""
        if old.shape[0] != self.old_nnz:
            raise ValueError(f"expected {self.old_nnz} entries, got {old.shape[0]}")
        dev = old.device
        new = old.new_zeros((self.new_nnz, *old.shape[1:]))
        kept = old.index_select(0, torch.from_numpy(self.kept_old).to(dev))
        new.index_copy_(0, torch.from_numpy(self.kept_new).to(dev), kept)
        new[torch.from_numpy(self.grown_slots).to(dev)] = torch.as_tensor(grown, dtype=old.dtype, device=dev)
        return new


class SparseStructure:
    """Active positions of a (out, in) or (out, in/groups, kh, kw) weight, immutable once built.

    Slots are ordered by flat position, so row i (output channel i) owns slots indptr[i]:indptr[i+1]
    and `cols` gives each slot's position inside its row. A per-input-channel index for input
    gradients is built on first use. The only mutable part is the sampled-gradient request.
    """

    def __init__(self, shape: tuple[int, ...], flat: np.ndarray, groups: int = 1) -> None:
        if len(shape) not in (2, 4):
            raise ValueError(f"weight shape must be (out, in) or (out, in/groups, kh, kw), got {shape}")
        if len(shape) == 2 and groups != 1:
            raise ValueError("groups apply to convolution weights only")
        if groups < 1 or shape[0] % groups:
            raise ValueError(f"out channels {shape[0]} are not divisible by groups={groups}")
        self.shape = tuple(int(s) for s in shape)
        self.groups = int(groups)
        self.flat = np.ascontiguousarray(flat, dtype=np.int64)
        if self.flat.ndim != 1 or (self.flat.size and (self.flat[0] < 0 or self.flat[-1] >= self.numel)):
            raise ValueError("flat positions must be a 1-D array inside the weight")
        if np.any(self.flat[1:] <= self.flat[:-1]):
            raise ValueError("flat positions must be strictly increasing")
        rs = self.row_size
        self.indptr = np.searchsorted(self.flat, np.arange(self.shape[0] + 1, dtype=np.int64) * rs)
        self.rows = (self.flat // rs).astype(np.int32)
        self.cols = (self.flat - self.rows.astype(np.int64) * rs).astype(np.int32)
        self._by_input: InputIndex | None = None
        self._derived: dict[Hashable, Any] = {}
        self._flat_on: dict[torch.device, Tensor] = {}
        self._sample_at: np.ndarray | None = None
        self._sample_all = False
        self.sampled_grad: Tensor | None = None
        self.build_seconds = 0.0  # wall time building the input-channel index and kernels' orderings, on first use

    @classmethod
    def from_mask(cls, mask: Tensor, groups: int = 1) -> SparseStructure:
        """The structure whose active positions are the True entries of a bool mask shaped like the weight."""
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be torch.bool, got {mask.dtype}")
        flat = mask.detach().reshape(-1).nonzero().reshape(-1).cpu().numpy()
        return cls(tuple(mask.shape), flat, groups)

    @property
    def numel(self) -> int:
        """Number of entries of the dense weight."""
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Number of active positions (the length of the compact values)."""
        return int(self.flat.size)

    @property
    def density(self) -> float:
        """Fraction of active positions."""
        return self.nnz / self.numel

    @property
    def row_size(self) -> int:
        """Entries per output channel: in (Linear) or in/groups * kh * kw (Conv2d)."""
        return self.numel // self.shape[0]

    @property
    def in_channels(self) -> int:
        """Input features (Linear) or input channels over all groups (Conv2d)."""
        return self.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, int]:
        """(kh, kw) for Conv2d weights, (1, 1) for Linear ones."""
        return (self.shape[2], self.shape[3]) if len(self.shape) == 4 else (1, 1)

    def by_input(self) -> InputIndex:
        """The slots grouped by the input channel they read (CSC-like), built on first use."""
        if self._by_input is None:
            started = time.perf_counter()
            if len(self.shape) == 2:
                chan = self.cols
            else:
                kk = self.shape[2] * self.shape[3]
                cout_g = self.shape[0] // self.groups
                chan = ((self.rows // cout_g) * self.shape[1] + self.cols // kk).astype(np.int32)
            ptr, perm = _group_by_channel(chan, self.in_channels)
            rows, cols = self.rows[perm], self.cols[perm]
            if len(self.shape) == 2:
                tcols = rows
            else:
                kh, kw = self.kernel_size
                r = cols % kk
                flipped = (kh - 1 - r // kw) * kw + (kw - 1 - r % kw)
                tcols = ((rows % cout_g) * kk + flipped).astype(np.int32)
            self._by_input = InputIndex(ptr, perm, rows, cols, tcols)
            self.build_seconds += time.perf_counter() - started
        return self._by_input

    def derived(self, key: Hashable, build: Callable[[], T]) -> T:
        """A value computed from these positions alone (a kernel's ordering of them), built on first use and
        kept: a structure never changes, a topology change makes a new one."""
        if key not in self._derived:
            started = time.perf_counter()
            self._derived[key] = build()
            self.build_seconds += time.perf_counter() - started
        return self._derived[key]

    def arrays(self) -> dict[str, np.ndarray]:
        """The index arrays held now, by name: positions, CSR and, where built, the input-channel index and the
        kernels' derived orderings (an array shared by two names is listed once)."""
        named: dict[str, Any] = {"flat": self.flat, "indptr": self.indptr, "rows": self.rows, "cols": self.cols}
        if self._by_input is not None:
            named.update({f"by_input.{f}": a for f, a in zip(InputIndex._fields, self._by_input, strict=True)})
        for key, value in self._derived.items():
            kind = key if isinstance(key, str) else key[0]
            parts = value if isinstance(value, tuple) else (value,)
            named.update({f"{kind}.{i}": a for i, a in enumerate(parts)})
        seen: set[int] = set()
        return {n: a for n, a in named.items() if isinstance(a, np.ndarray) and not (id(a) in seen or seen.add(id(a)))}

    def nbytes(self) -> int:
        """Bytes of the index arrays held now (`arrays`)."""
        return sum(a.nbytes for a in self.arrays().values())

    def flat_indices(self, device: torch.device | str = "cpu") -> Tensor:
        """Active flat positions as an int64 tensor on `device` (cached per device).

        Made outside inference mode even when first asked for inside it: autograd refuses inference
        tensors, and the cached one serves later training steps too.
        """
        dev = torch.device(device)
        if dev not in self._flat_on:
            with torch.inference_mode(False):
                self._flat_on[dev] = torch.from_numpy(self.flat).to(dev)
        return self._flat_on[dev]

    def gather(self, weight: Tensor) -> Tensor:
        """The compact values of a dense weight at the active positions (a copy, detached)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match {self.shape}")
        return weight.detach().reshape(-1)[self.flat_indices(weight.device)].clone()

    def to_dense(self, values: Tensor) -> Tensor:
        """The dense weight with `values` at the active positions and zeros elsewhere (differentiable)."""
        if values.shape != (self.nnz,):
            raise ValueError(f"values must have shape ({self.nnz},), got {tuple(values.shape)}")
        dense = values.new_zeros(self.numel)
        return dense.index_put((self.flat_indices(values.device),), values).reshape(self.shape)

    def mask(self, device: torch.device | str = "cpu") -> Tensor:
        """The bool mask of active positions, shaped like the weight."""
        m = torch.zeros(self.numel, dtype=torch.bool, device=device)
        m[self.flat_indices(device)] = True
        return m.reshape(self.shape)

    def updated(self, dropped: Tensor | np.ndarray, grown: Tensor | np.ndarray) -> tuple[SparseStructure, TopologyDelta]:
        """The structure after dropping active and growing inactive flat positions: one O(nnz) merge, no dense pass.

        Raises ValueError if a dropped position is not active, a grown one is active after the drop,
        or either list repeats a position.
        """
        drop, _ = _sort_bounded(_as_positions(dropped, self.numel, "dropped"), self.numel)
        grow, order = _sort_bounded(_as_positions(grown, self.numel, "grown"), self.numel)
        new_flat, kept_old, kept_new, slots_sorted, error = _merge(self.flat, drop, grow)
        if error:
            raise ValueError(_MERGE_ERRORS[error])
        grown_slots = np.empty(grow.size, dtype=np.int64)
        grown_slots[order] = slots_sorted
        new = SparseStructure(self.shape, new_flat, self.groups)
        return new, TopologyDelta(kept_old, kept_new, grown_slots, self.nnz, new.nnz)

    def request_sampled_grad(self, positions: Tensor | np.ndarray | None = None) -> None:
        """Make every following backward add dL/dW at these flat positions (None: all) to `sampled_grad`.

        The result is 1-D, one entry per requested position (None: the flattened dense gradient, computed
        with PyTorch's dense kernel). It accumulates over backward passes until `take_sampled_grad()`.
        """
        self._sample_all = positions is None
        self._sample_at = None if positions is None else _as_positions(positions, self.numel, "sampled")
        self.sampled_grad = None

    def copy_request(self, other: SparseStructure) -> None:
        """Stand `other`'s sampled-gradient request (and what it has gathered) on this structure."""
        self._sample_all, self._sample_at, self.sampled_grad = other._sample_all, other._sample_at, other.sampled_grad

    def take_sampled_grad(self) -> Tensor | None:
        """The accumulated sampled gradient (None if no backward ran); ends the request."""
        grad = self.sampled_grad
        self._sample_at, self._sample_all, self.sampled_grad = None, False, None
        return grad

    @property
    def sampled_positions(self) -> np.ndarray | None:
        """The flat positions of a standing sampled-gradient request (None when none, or when all)."""
        return self._sample_at

    @property
    def samples_all(self) -> bool:
        """Whether a standing request asks for the gradient at every position."""
        return self._sample_all

    def add_sampled_grad(self, grad: Tensor) -> None:
        """Accumulates one backward's sampled gradient into `sampled_grad`."""
        self.sampled_grad = grad if self.sampled_grad is None else self.sampled_grad + grad

    def __repr__(self) -> str:
        return f"SparseStructure(shape={self.shape}, groups={self.groups}, nnz={self.nnz}, density={self.density:.4f})"
