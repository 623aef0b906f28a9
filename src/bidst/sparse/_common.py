"""Helpers shared by the sparse autograd functions: path choice, numpy views, the masked dense fallback."""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor

from . import _kernels_linear as KL
from .structure import SparseStructure


def pair(v: int | tuple[int, int]) -> tuple[int, int]:
    """(v, v) for an int, the pair itself otherwise."""
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


# Above this density the masked dense path is faster than the sparse kernels on CPU (measured
# crossover about 0.25-0.35), e.g. early in dense-to-sparse (gradual pruning) training.
DENSE_ABOVE = 0.3


def set_threads(threads: int) -> int:
    """Run torch and the sparse kernels on `threads` threads; returns Numba's count (at most the NUMBA_NUM_THREADS
    it allows).

    Numba first: starting its OpenMP pool resets the process's OpenMP thread count, torch's included.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    return numba.get_num_threads()


def match_torch_threads() -> None:
    """Run the kernels on torch's thread count (`torch.set_num_threads` governs both), and keep that count: the
    first kernel call starts Numba's OpenMP pool, which resets the process's OpenMP thread count, torch's included,
    to every core whatever the user set. Called before the kernels of each sparse autograd function."""
    threads = torch.get_num_threads()
    kernels = numba.get_num_threads()  # starts Numba's pool on the first call
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if kernels != min(threads, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def uses_kernels(*tensors: Tensor | None, structure: SparseStructure | None = None) -> bool:
    """Whether the Numba path applies: every tensor is CPU float32, the weight is at most DENSE_ABOVE dense, CPU
    autocast is off (its layers compute in its dtype, as the masked ops do), and no torch.export is tracing (an
    exported program computes the same function with dense ops)."""
    if (structure is not None and structure.density > DENSE_ABOVE) or torch.compiler.is_exporting():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return all(t.is_cpu and t.dtype == torch.float32 for t in tensors if t is not None)


def np_view(t: Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor, outside autograd."""
    return t.detach().numpy()


def transposed(x: Tensor) -> Tensor:
    """x.t() of a 2-D CPU float32 tensor as a contiguous tensor: a view when it already is one, else a tiled copy."""
    xt = x.t()
    if xt.is_contiguous():
        return xt
    out = torch.empty(xt.shape, dtype=torch.float32)
    KL.transpose(np_view(x.contiguous()), np_view(out))
    return out


def bias_array(bias: Tensor | None, n: int) -> np.ndarray:
    """The bias as float32 numpy, zeros when there is none."""
    return np.zeros(n, np.float32) if bias is None else np_view(bias.contiguous())


def _record_dense_sample(structure: SparseStructure, dense_grad: Tensor) -> None:
    """Adds the requested entries of a dense weight gradient to the structure's sampled gradient."""
    flat = dense_grad.reshape(-1)
    if structure.samples_all:
        structure.add_sampled_grad(flat.clone())
    elif structure.sampled_positions is not None:
        structure.add_sampled_grad(flat[torch.from_numpy(structure.sampled_positions).to(flat.device)])


def grad_cleared(tensor: Tensor) -> bool:
    """Whether `tensor.grad` was zeroed since its last backward: None (`zero_grad()`) or all zeros
    (`zero_grad(set_to_none=False)`; a backward leaving every entry exactly 0 reads the same)."""
    return tensor.grad is None or not bool(tensor.grad.any())


def forget_discarded_samples(values: Tensor, structure: SparseStructure) -> None:
    """Start the sampled gradient afresh when a forward finds the values' gradient zeroed, as `.grad` itself
    does: a backward whose gradient was then discarded (a skipped batch, SAM's first pass, an input-only
    autograd.grad as in adversarial training) is not counted."""
    if structure.sampled_grad is None or not (values.is_leaf and values.requires_grad and torch.is_grad_enabled()):
        return
    if grad_cleared(values):
        structure.sampled_grad = None


def masked_dense_weight(values: Tensor, structure: SparseStructure) -> Tensor:
    """The dense weight for the fallback path, hooked to record any sampled-gradient request."""
    w = structure.to_dense(values)
    if w.requires_grad and (structure.samples_all or structure.sampled_positions is not None):
        w.register_hook(lambda g: _record_dense_sample(structure, g))
    return w


def rows_cols(structure: SparseStructure, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and in-row position (int32) of flat positions of `structure`'s weight."""
    rows = positions // structure.row_size
    return rows.astype(np.int32), (positions - rows * structure.row_size).astype(np.int32)
