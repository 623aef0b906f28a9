"""sparse_linear: Numba SpMM / SDDMM kernels for CPU float32, masked dense compute everywhere else.

The kernels keep activations as (features, batch) so that SIMD runs over the batch; the output is
returned as a transposed view, which a following sparse_linear consumes without a copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _kernels_linear as KL
from ._common import (
    bias_array,
    forget_discarded_samples,
    masked_dense_weight,
    match_torch_threads,
    np_view,
    rows_cols,
    transposed,
    uses_kernels,
)
from .structure import SparseStructure


def l2_cache_bytes(default: int = 512 * 1024) -> int:
    """The L2 cache of one core, read from Linux's sysfs; `default` where that is not available."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1024, "M": 1024 * 1024}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            break
    return default


# An input larger than a core's L2 cache is swept in column tiles of a quarter of it: a thread
# sweeps its block of output rows once per tile, and the input rows it gathers meanwhile come from
# L2 instead of L3 (about a fifth faster at 90-95% on a 512 KB L2; a 2 MB L2 holds the whole input
# of a 1024-feature layer at batch 256, and there tiling only adds sweeps).
L2_BYTES = l2_cache_bytes()
TILE_BYTES = L2_BYTES // 4
# Tiling pays only while a row's slots within one tile still fill the kernels' passes of up to eight.
TILE_MIN_SLOTS = 12


def column_tiles(n_rows: int, n_cols: int, nnz: int, batch: int) -> int:
    """How many column tiles a (n_rows x n_cols, nnz slots) CSR is swept in, for inputs of `batch` columns."""
    if n_cols * batch * 4 <= L2_BYTES:
        return 1
    by_cache = -(-n_cols * batch * 4 // TILE_BYTES)
    by_slots = nnz // max(n_rows * TILE_MIN_SLOTS, 1)
    return max(1, min(by_cache, by_slots, n_cols))


def tile_ptr(indptr: np.ndarray, cols: np.ndarray, n_cols: int, ntiles: int) -> np.ndarray:
    """Slot offsets of a CSR (columns ascending within a row) per (row, column tile): row i's slots that
    read tile t are tptr[i * ntiles + t] .. tptr[i * ntiles + t + 1]; with one tile, indptr itself."""
    if ntiles == 1:
        return indptr
    n_rows = indptr.shape[0] - 1
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(indptr))
    key = rows * ntiles + cols // -(-n_cols // ntiles)
    return np.concatenate(([0], np.cumsum(np.bincount(key, minlength=n_rows * ntiles)))).astype(np.int64)


def rows_per_thread(n_rows: int) -> int:
    """Rows in each kernel task's block: one contiguous block per Numba thread."""
    return max(1, -(-n_rows // numba.get_num_threads()))


def _tiled(s: SparseStructure, transposed_csr: bool, batch: int) -> tuple[np.ndarray, int, int]:
    """(tile pointer, tile count, rows per thread) for the kernels over the structure's CSR or its by-input
    CSR; the tile pointers are kept on the structure."""
    n_rows, n_cols = (s.shape[1], s.shape[0]) if transposed_csr else s.shape
    nt = column_tiles(n_rows, n_cols, s.nnz, batch)
    per = rows_per_thread(n_rows)
    if transposed_csr:
        idx = s.by_input()
        return s.derived(("input_tiles", nt), lambda: tile_ptr(idx.ptr, idx.tcols, n_cols, nt)), nt, per
    return s.derived(("row_tiles", nt), lambda: tile_ptr(s.indptr, s.cols, n_cols, nt)), nt, per


def _weight_times(xt: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """W·Xᵀ + b (b broadcast over the columns)."""
    return torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)


class _TransposedLinearFn(torch.autograd.Function):
    """Yᵀ = W·Xᵀ + b from Xᵀ; the weight gradient as dYᵀ·X with dYᵀ made contiguous first (a few KB for a
    classifier): MKL's kernel for that pair of layouts is faster than for the strided pair autograd would
    pass it. The backward is plain differentiable ops, so double backward works."""

    @staticmethod
    def forward(ctx: Any, xt: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(xt, weight)
        ctx.has_bias = bias is not None
        return _weight_times(xt, weight, bias)

    @staticmethod
    def backward(ctx: Any, dyt: Tensor) -> tuple[Tensor | None, ...]:
        xt, weight = ctx.saved_tensors
        dyt = dyt.contiguous()
        dx = torch.mm(weight.t(), dyt) if ctx.needs_input_grad[0] else None
        dw = torch.mm(dyt, xt.t()) if ctx.needs_input_grad[1] else None
        db = dyt.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear_any_layout(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) that multiplies a batch-innermost 2-D CPU input (what the sparse
    kernels emit) as W·xᵀ, a plain GEMM whose output is batch-innermost too. PyTorch's own path for
    that layout is about 5x slower, and a copy to contiguous costs more than it saves, twice over:
    once here and once more for the layer before, whose output gradient would arrive batch-major."""
    if x.dim() == 2 and x.device.type == "cpu" and x.shape[0] > 1 and not x.is_contiguous() and x.t().is_contiguous():
        if torch.is_autocast_enabled("cpu"):  # autocast's casts and their gradients need PyTorch's own autograd
            return _weight_times(x.t(), weight, bias).t()
        # the transpose outside the Function: in-place ops on its output then work as on any view
        return _TransposedLinearFn.apply(x.t(), weight, bias).t()
    return F.linear(x, weight, bias)


class _SparseLinearFn(torch.autograd.Function):
    """Y = X Wᵀ + b with W given by (values, structure); activations are kept (features, batch)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, structure: SparseStructure) -> Tensor:
        match_torch_threads()
        xt = transposed(x)
        # (batch, out) with batch innermost, allocated as such (not a view) so in-place ops on it are allowed
        y = torch.empty_strided((x.shape[0], structure.shape[0]), (1, x.shape[0]), dtype=torch.float32)
        tiles = _tiled(structure, False, x.shape[0])
        KL.spmm_t(*tiles, structure.cols, np_view(values), bias_array(bias, structure.shape[0]), np_view(xt),
                  np_view(y.t()))  # fmt: skip
        ctx.save_for_backward(xt, values.detach())  # an alias: a live graph must not pin the Parameter (resizes swap it)
        ctx.structure, ctx.tiles = structure, tiles  # the weight gradient sweeps the same tiles
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        match_torch_threads()
        xt, values = ctx.saved_tensors
        s: SparseStructure = ctx.structure
        dyt = transposed(dy)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            idx = s.by_input()
            dxt = torch.empty_like(xt)
            if ctx.needs_input_grad[1]:  # both gradients in one sweep (the usual case)
                dv = torch.empty(s.nnz, dtype=torch.float32)
                KL.spmm_sddmm_t(idx.ptr, rows_per_thread(s.shape[1]), idx.tcols, idx.perm, np_view(values),
                                np_view(dyt), np_view(xt), np_view(dxt), np_view(dv))  # fmt: skip
            else:
                zeros = np.zeros(s.shape[1], np.float32)
                KL.spmm_t(*_tiled(s, True, xt.shape[1]), idx.tcols, np_view(values)[idx.perm], zeros, np_view(dyt),
                          np_view(dxt))  # fmt: skip
            dx = dxt.t()
        if ctx.needs_input_grad[1] and dv is None:
            dv = torch.empty(s.nnz, dtype=torch.float32)
            KL.sddmm_t(*ctx.tiles, s.cols, np_view(dyt), np_view(xt), np_view(dv))
        if ctx.needs_input_grad[2]:
            db = dyt.sum(1)
        if s.samples_all:
            s.add_sampled_grad((dyt @ xt.t()).reshape(-1))
        elif s.sampled_positions is not None:
            rows, cols = rows_cols(s, s.sampled_positions)
            g = torch.empty(rows.size, dtype=torch.float32)
            KL.sampled_dot_t(rows, cols, np_view(dyt), np_view(xt), np_view(g))
            s.add_sampled_grad(g)
        return dx, dv, db, None


def sparse_linear(x: Tensor, values: Tensor, structure: SparseStructure, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, W, bias) for the sparse weight W = (values at structure's active positions).

    The output of the CPU kernels has the batch innermost in memory (transposed strides); a
    following sparse_linear consumes it without a copy.
    """
    # TorchDynamo cannot trace the Numba kernels: torch.compile runs this call eagerly (torch.export, which has
    # no eager part, takes the dense path: see uses_kernels)
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _eager_sparse_linear(x, values, structure, bias)
    forget_discarded_samples(values, structure)
    if len(structure.shape) != 2:
        raise ValueError(f"sparse_linear needs a 2-D weight structure, got shape {structure.shape}")
    out_f, in_f = structure.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {in_f}")
    if not uses_kernels(x, values, bias, structure=structure):
        return linear_any_layout(x, masked_dense_weight(values, structure), bias)
    lead = x.shape[:-1]
    y = _SparseLinearFn.apply(x.reshape(-1, in_f), values.contiguous(), bias, structure)
    return y if x.dim() == 2 else y.reshape(*lead, out_f)


_eager_sparse_linear = torch.compiler.disable(sparse_linear)
