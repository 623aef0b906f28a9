"""sparse_linear: Numba SpMM / SDDMM kernels for CPU float32, masked dense compute everywhere else.

The kernels keep activations as (features, batch) so that SIMD runs over the batch; the output is
returned as a transposed view, which a following sparse_linear consumes without a copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _kernels_linear as KL
from ._common import bias_array, masked_dense_weight, np_view, rows_cols, transposed, uses_kernels
from .structure import SparseStructure


def linear_any_layout(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) that multiplies a batch-innermost 2-D CPU input (what the sparse
    kernels emit) as W·xᵀ, a plain GEMM whose output is batch-innermost too. PyTorch's own path for
    that layout is about 5x slower, and a copy to contiguous costs more than it saves, twice over:
    once here and once more for the layer before, whose output gradient would arrive batch-major."""
    if x.dim() == 2 and x.device.type == "cpu" and x.shape[0] > 1 and not x.is_contiguous() and x.t().is_contiguous():
        xt = x.t()
        out = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
        return out.t()
    return F.linear(x, weight, bias)


class _SparseLinearFn(torch.autograd.Function):
    """Y = X Wᵀ + b with W given by (values, structure); activations are kept (features, batch)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, structure: SparseStructure) -> Tensor:
        xt = transposed(x)
        # (batch, out) with batch innermost, allocated as such (not a view) so in-place ops on it are allowed
        y = torch.empty_strided((x.shape[0], structure.shape[0]), (1, x.shape[0]), dtype=torch.float32)
        KL.spmm_t(structure.indptr, structure.cols, np_view(values), bias_array(bias, structure.shape[0]), np_view(xt), np_view(y.t()))
        ctx.save_for_backward(xt, values)
        ctx.structure = structure
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xt, values = ctx.saved_tensors
        s: SparseStructure = ctx.structure
        dyt = transposed(dy)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            idx = s.by_input()
            dxt = torch.empty_like(xt)
            zeros = np.zeros(s.shape[1], np.float32)
            KL.spmm_t(idx.ptr, idx.tcols, np_view(values)[idx.perm], zeros, np_view(dyt), np_view(dxt))
            dx = dxt.t()
        if ctx.needs_input_grad[1]:
            dv = torch.empty(s.nnz, dtype=torch.float32)
            KL.sddmm_t(s.indptr, s.cols, np_view(dyt), np_view(xt), np_view(dv))
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
