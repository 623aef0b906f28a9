"""sparse_conv2d: direct sparse convolution kernels (no im2col) for CPU float32, masked dense elsewhere.

The kernels work on batch-innermost activations: (N, C, H, W) tensors stored as (C, H, W, N)
(`bidst.sparse.layout`). Outputs are returned in that layout, so the next sparse layer reads them
without a copy; an input in the usual contiguous layout is transposed once, and its gradient is
returned contiguous. Dilated convolutions take the masked dense path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_weight

from . import _kernels_conv as KC
from ._common import (
    bias_array,
    forget_discarded_samples,
    masked_dense_weight,
    match_torch_threads,
    np_view,
    pair,
    rows_cols,
    transposed,
    uses_kernels,
)
from .layout import batch_innermost, is_batch_innermost
from .structure import SparseStructure


class ConvGeometry(NamedTuple):
    """Stride and zero padding of a Conv2d, as (height, width) pairs."""

    stride: tuple[int, int]
    padding: tuple[int, int]


def _to_chwn(x: Tensor) -> Tensor:
    """x (N, C, H, W) as a contiguous (C, H, W, N) tensor, without a copy if already laid out so."""
    v = x.permute(1, 2, 3, 0)
    if v.is_contiguous():
        return v
    return transposed(x.reshape(x.shape[0], -1)).view(v.shape)


def _to_nchw(x: Tensor) -> Tensor:
    """A batch-innermost (N, C, H, W) tensor copied to the usual contiguous layout."""
    n, c, h, w = x.shape
    return transposed(x.permute(1, 2, 3, 0).reshape(c * h * w, n)).view(n, c, h, w)


def _chunks(n: int) -> int:
    """Task chunks of a kernel call over n tasks (output rows, weight positions): one contiguous chunk per Numba thread."""
    return max(1, min(n, numba.get_num_threads()))


PLANE_FLOATS = 4096  # output planes up to 16 KB (half an L1 data cache) take the per-channel forward kernel


def _forward(
    indptr: np.ndarray, cols: np.ndarray, values: np.ndarray, bias: np.ndarray, xt: np.ndarray, y: np.ndarray,
    geo: tuple[int, ...], order: Callable[[], np.ndarray],
) -> None:
    """y (CHWN) = sparse conv of xt (CHWN) by the CSR weight (geo: stride, padding, kernel size, output and
    input channels per group): per output row, or per output channel where a plane is small enough
    for rows to be too short to share passes over; that kernel asks `order()` for the slots' tap order."""
    o, ho, wo, n = y.shape
    if ho * wo * n <= PLANE_FLOATS:
        KC.conv_forward_planes(indptr, cols, values, bias, xt, y, *geo, _chunks(o), order())
    else:
        KC.conv_forward(indptr, cols, values, bias, xt, y, *geo, _chunks(o * ho))


def chwn_forward(s: SparseStructure, geom: ConvGeometry, values: np.ndarray, bias: np.ndarray, xt: np.ndarray, y: np.ndarray) -> None:
    """y = the sparse conv of xt plus bias, on (C, H, W, N) arrays: the forward kernel of a sparse Conv2d."""
    o, cin_g, kh, kw = s.shape
    (sh, sw), (ph, pw) = geom
    order = lambda: s.derived("tap_order", lambda: KC.tap_order(s.indptr, s.cols, kh * kw))
    _forward(s.indptr, s.cols, values, bias, xt, y, (sh, sw, ph, pw, kh, kw, o // s.groups, cin_g), order)


def chwn_input_grad(s: SparseStructure, geom: ConvGeometry, values: np.ndarray, dyt: np.ndarray, dxt: np.ndarray) -> None:
    """dxt = the input gradient of a sparse conv for the output gradient dyt, on (C, H, W, N) arrays; for
    stride 1 a forward conv with the transposed, flipped weight."""
    o, cin_g, kh, kw = s.shape
    (sh, sw), (ph, pw) = geom
    idx = s.by_input()
    vin = values[idx.perm]
    if (sh, sw) == (1, 1):
        zeros = np.zeros(dxt.shape[0], np.float32)
        order = lambda: s.derived("tap_order_by_input", lambda: KC.tap_order(idx.ptr, idx.tcols, kh * kw))
        _forward(idx.ptr, idx.tcols, vin, zeros, dyt, dxt, (1, 1, kh - 1 - ph, kw - 1 - pw, kh, kw, cin_g, o // s.groups), order)
    else:
        KC.conv_input_grad(idx.ptr, idx.rows, idx.cols, vin, dyt, dxt, sh, sw, ph, pw, kh, kw)


def chwn_weight_grad(
    s: SparseStructure, geom: ConvGeometry, dyt: np.ndarray, xt: np.ndarray, out: np.ndarray,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """out[k] = dL/dW at weight position k, from dyt and xt, (C, H, W, N) arrays: the structure's active
    positions (their grouping kept on the structure), or `positions` = (rows, cols)."""
    o, cin_g, kh, kw = s.shape
    (sh, sw), (ph, pw) = geom
    one = (sh, sw) == (1, 1)
    if positions is None:
        rows, cols = s.rows, s.cols
        groups = s.derived(("position_groups", one), lambda: KC.position_groups(rows, cols, kh * kw, one))
    else:
        rows, cols = positions
        groups = KC.position_groups(rows, cols, kh * kw, one)
    KC.conv_sampled_grad(rows, cols, dyt, xt, out, sh, sw, ph, pw, kh, kw, o // s.groups, cin_g, _chunks(rows.size), groups)


class _ChwnConvFn(torch.autograd.Function):
    """Sparse Conv2d on the batch-innermost CHWN kernels (any stride; see _kernels_conv)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, structure: SparseStructure, geom: ConvGeometry
    ) -> Tensor:
        match_torch_threads()
        n, _, h, w = x.shape
        o, _, kh, kw = structure.shape
        (sh, sw), (ph, pw) = geom
        y = batch_innermost((n, o, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1))
        xt = _to_chwn(x)
        chwn_forward(structure, geom, np_view(values), bias_array(bias, o), np_view(xt), np_view(y.permute(1, 2, 3, 0)))
        ctx.save_for_backward(xt, values.detach())  # an alias: a live graph must not pin the Parameter (resizes swap it)
        ctx.structure, ctx.geom = structure, geom
        ctx.contiguous_input = x.is_contiguous()  # then the input gradient is returned contiguous too
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        match_torch_threads()
        xt, values = ctx.saved_tensors
        s: SparseStructure = ctx.structure
        geom: ConvGeometry = ctx.geom
        dyt = _to_chwn(dy)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            c, h, w, n = xt.shape
            dx = batch_innermost((n, c, h, w))
            chwn_input_grad(s, geom, np_view(values), np_view(dyt), np_view(dx.permute(1, 2, 3, 0)))
            if ctx.contiguous_input:  # a layer before that is not batch-innermost gets its usual layout
                dx = _to_nchw(dx)
        if ctx.needs_input_grad[1]:
            dv = torch.empty(s.nnz, dtype=torch.float32)
            chwn_weight_grad(s, geom, np_view(dyt), np_view(xt), np_view(dv))
        if ctx.needs_input_grad[2]:
            db = dyt.sum((1, 2, 3))
        if s.samples_all:
            g = conv2d_weight(xt.permute(3, 0, 1, 2), s.shape, dy, geom.stride, geom.padding, groups=s.groups)
            s.add_sampled_grad(g.reshape(-1))
        elif s.sampled_positions is not None:
            rows, cols = rows_cols(s, s.sampled_positions)
            g = torch.empty(rows.size, dtype=torch.float32)
            chwn_weight_grad(s, geom, np_view(dyt), np_view(xt), np_view(g), (rows, cols))
            s.add_sampled_grad(g)
        return dx, dv, db, None, None


def sparse_conv2d(
    x: Tensor,
    values: Tensor,
    structure: SparseStructure,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """F.conv2d(x, W, bias, stride, padding, dilation, structure.groups) for the sparse weight W.

    Input and output are (N, C, H, W); on the kernels the output is stored batch-innermost (see the
    module docstring), as is the dense path's for a batch-innermost input. Dilated convolutions take
    the masked dense path.
    """
    # TorchDynamo cannot trace the Numba kernels: torch.compile runs this call eagerly (torch.export, which has
    # no eager part, takes the dense path: see uses_kernels)
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _eager_sparse_conv2d(x, values, structure, bias, stride, padding, dilation)
    forget_discarded_samples(values, structure)
    if len(structure.shape) != 4:
        raise ValueError(f"sparse_conv2d needs a 4-D weight structure, got shape {structure.shape}")
    if x.dim() != 4 or x.shape[1] != structure.in_channels:
        raise ValueError(f"input must be (N, {structure.in_channels}, H, W), got {tuple(x.shape)}")
    if isinstance(padding, str):
        raise ValueError(f"sparse_conv2d takes padding as an int or a pair, got {padding!r} (SparseConv2d.from_dense "
                         "resolves 'same' and 'valid')")
    geom = ConvGeometry(pair(stride), pair(padding))
    if min(geom.stride) < 1 or min(geom.padding) < 0:
        raise ValueError(f"stride must be at least 1 and padding at least 0, got {geom.stride} and {geom.padding}")
    kh, kw = structure.kernel_size
    if x.shape[2] + 2 * geom.padding[0] < kh or x.shape[3] + 2 * geom.padding[1] < kw:
        raise ValueError(f"input {tuple(x.shape[2:])} with padding {geom.padding} is smaller than the kernel")
    if pair(dilation) != (1, 1) or not uses_kernels(x, values, bias, structure=structure):
        w = masked_dense_weight(values, structure)
        y = F.conv2d(x, w, bias, geom.stride, geom.padding, pair(dilation), structure.groups)
        # keep a batch-innermost chain so (the layers after expect it; mixed layouts slow their backward)
        return batch_innermost(tuple(y.shape), y).copy_(y) if is_batch_innermost(x) else y
    return _ChwnConvFn.apply(x, values.contiguous(), bias, structure, geom)


_eager_sparse_conv2d = torch.compiler.disable(sparse_conv2d)
