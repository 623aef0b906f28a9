"""sparse_linear / sparse_conv2d: Numba kernels for CPU float32, masked dense compute everywhere else.

Both return gradients for the compact `values` (one per active position), the input and the bias,
and honour a structure's sampled-gradient request. The two paths have identical semantics; the
dense one also serves CUDA tensors, other dtypes and dilated convolutions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _kernels_conv as KC
from . import _kernels_linear as KL
from .structure import SparseStructure


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    """(v, v) for an int, the pair itself otherwise."""
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def uses_kernels(*tensors: Tensor | None) -> bool:
    """Whether the Numba path applies: every given tensor is a CPU float32 tensor."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors if t is not None)


def _np(t: Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor, outside autograd."""
    return t.detach().numpy()


def _bias_np(bias: Tensor | None, n: int) -> np.ndarray:
    """The bias as float32 numpy, zeros when there is none."""
    return np.zeros(n, np.float32) if bias is None else _np(bias.contiguous())


def _sampled_rows_cols(structure: SparseStructure) -> tuple[np.ndarray, np.ndarray]:
    """Row and in-row position (int32) of each requested sampled position."""
    pos = structure.sampled_positions
    assert pos is not None
    rows = pos // structure.row_size
    return rows.astype(np.int32), (pos - rows * structure.row_size).astype(np.int32)


def _record_dense_sample(structure: SparseStructure, dense_grad: Tensor) -> None:
    """Adds the requested entries of a dense weight gradient to the structure's sampled gradient."""
    flat = dense_grad.reshape(-1)
    if structure.samples_all:
        structure.add_sampled_grad(flat.clone())
    elif structure.sampled_positions is not None:
        structure.add_sampled_grad(flat[torch.from_numpy(structure.sampled_positions).to(flat.device)])


def _masked_dense_weight(values: Tensor, structure: SparseStructure) -> Tensor:
    """The dense weight for the fallback path, hooked to record any sampled-gradient request."""
    w = structure.to_dense(values)
    if w.requires_grad and (structure.samples_all or structure.sampled_positions is not None):
        w.register_hook(lambda g: _record_dense_sample(structure, g))
    return w


class _SparseLinearFn(torch.autograd.Function):
    """Y = X Wᵀ + b with W given by (values, structure); activations are kept (features, batch)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, structure: SparseStructure) -> Tensor:
        xt = x.t().contiguous()
        yt = torch.empty(structure.shape[0], x.shape[0], dtype=torch.float32)
        KL.spmm_t(structure.indptr, structure.cols, _np(values), _bias_np(bias, structure.shape[0]), _np(xt), _np(yt))
        ctx.save_for_backward(xt, values)
        ctx.structure = structure
        return yt.t()

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xt, values = ctx.saved_tensors
        s: SparseStructure = ctx.structure
        dyt = dy.t().contiguous()
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            idx = s.by_input()
            dxt = torch.empty_like(xt)
            zeros = np.zeros(s.shape[1], np.float32)
            KL.spmm_t(idx.ptr, idx.rows, _np(values)[idx.perm], zeros, _np(dyt), _np(dxt))
            dx = dxt.t()
        if ctx.needs_input_grad[1]:
            dv = torch.empty(s.nnz, dtype=torch.float32)
            KL.sampled_dot_t(s.rows, s.cols, _np(dyt), _np(xt), _np(dv))
        if ctx.needs_input_grad[2]:
            db = dyt.sum(1)
        if s.samples_all:
            s.add_sampled_grad((dyt @ xt.t()).reshape(-1))
        elif s.sampled_positions is not None:
            rows, cols = _sampled_rows_cols(s)
            g = torch.empty(rows.size, dtype=torch.float32)
            KL.sampled_dot_t(rows, cols, _np(dyt), _np(xt), _np(g))
            s.add_sampled_grad(g)
        return dx, dv, db, None


def sparse_linear(x: Tensor, values: Tensor, structure: SparseStructure, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, W, bias) for the sparse weight W = (values at structure's active positions).

    The output of the CPU kernels is a transposed view (batch innermost in memory); a following
    sparse_linear consumes it without a copy.
    """
    if len(structure.shape) != 2:
        raise ValueError(f"sparse_linear needs a 2-D weight structure, got shape {structure.shape}")
    out_f, in_f = structure.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {in_f}")
    if not uses_kernels(x, values, bias):
        return F.linear(x, _masked_dense_weight(values, structure), bias)
    lead = x.shape[:-1]
    y = _SparseLinearFn.apply(x.reshape(-1, in_f), values.contiguous(), bias, structure)
    return y.reshape(*lead, out_f)


class ConvGeometry(NamedTuple):
    """Stride and zero padding of a Conv2d, as (height, width) pairs."""

    stride: tuple[int, int]
    padding: tuple[int, int]


def _to_chwn(x: Tensor) -> Tensor:
    """x (N, C, H, W) as a contiguous (C, H, W, N) tensor, without a copy if already laid out so."""
    v = x.permute(1, 2, 3, 0)
    if v.is_contiguous():
        return v
    out = torch.empty(v.shape, dtype=torch.float32)
    KC.nchw_to_chwn(_np(x.contiguous()), _np(out))
    return out


# Stride-1 convolutions whose output is at least this wide run on padded NCHW planes ("wide" kernels:
# no transposes, long vectors); the others on the batch-innermost CHWN layout, which vectorizes
# over the batch and so stays efficient for small maps and strides.
WIDE_MIN_WIDTH = 12


class _SparseConv2dFn(torch.autograd.Function):
    """Direct sparse Conv2d: "wide" padded-NCHW kernels or CHWN kernels (see _kernels_conv)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, structure: SparseStructure, geom: ConvGeometry
    ) -> Tensor:
        n, _, h, w = x.shape
        o, cin_g, kh, kw = structure.shape
        (sh, sw), (ph, pw) = geom
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        cout_g = o // structure.groups
        y = torch.empty(n, o, ho, wo, dtype=torch.float32)
        ctx.wide = (sh, sw) == (1, 1) and wo >= WIDE_MIN_WIDTH
        if ctx.wide:
            xs = F.pad(x, (pw, pw, ph, ph)).contiguous()
            KC.conv_forward_wide(
                structure.indptr, structure.cols, _np(values), _bias_np(bias, o), _np(xs), _np(y), kh, kw, cout_g, cin_g
            )
        else:
            xs = _to_chwn(x)
            KC.conv_forward(
                structure.indptr, structure.cols, _np(values), _bias_np(bias, o), _np(xs), _np(y),
                sh, sw, ph, pw, kh, kw, cout_g, cin_g,
            )  # fmt: skip
        ctx.save_for_backward(xs, values)
        ctx.structure, ctx.geom, ctx.in_hw = structure, geom, (h, w)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xs, values = ctx.saved_tensors
        s: SparseStructure = ctx.structure
        (sh, sw), (ph, pw) = ctx.geom
        o, cin_g, kh, kw = s.shape
        cout_g = o // s.groups
        n, (h, w) = dy.shape[0], ctx.in_hw
        # stride 1: the input gradient is the forward conv of dy, padded by k - 1 - p, with the
        # transposed, flipped weight (structure.by_input()); strided convs use a gather kernel
        ah, aw = kh - 1 - ph, kw - 1 - pw
        dx = dv = db = None
        if ctx.wide:
            wp = w + 2 * pw
            dfull = F.pad(dy, (aw, aw, ah, ah)).contiguous() if ctx.needs_input_grad[0] else None
            if dfull is not None and dfull.shape[3] == wp:  # "same" padding: dfull has the input's row pitch
                ds, d_off = dfull, ah * wp + aw
            else:
                ds, d_off = F.pad(dy, (0, wp - dy.shape[3])).contiguous(), 0
        else:
            ds, dfull, d_off = _to_chwn(dy), None, 0
        if ctx.needs_input_grad[0]:
            idx = s.by_input()
            dx = torch.empty(n, s.in_channels, h, w, dtype=torch.float32)
            vin = _np(values)[idx.perm]
            zeros = np.zeros(s.in_channels, np.float32)
            if dfull is not None:
                KC.conv_forward_wide(idx.ptr, idx.tcols, vin, zeros, _np(dfull), _np(dx), kh, kw, cin_g, cout_g)
            elif (sh, sw) == (1, 1):
                KC.conv_forward(
                    idx.ptr, idx.tcols, vin, zeros, _np(ds), _np(dx), 1, 1, ah, aw, kh, kw, cin_g, cout_g
                )
            else:
                KC.conv_input_grad(idx.ptr, idx.rows, idx.cols, vin, _np(ds), _np(dx), sh, sw, ph, pw, kh, kw)
        if ctx.needs_input_grad[1]:
            dv = torch.empty(s.nnz, dtype=torch.float32)
            _conv_weight_grad(ctx, s.rows, s.cols, ds, d_off, xs, dv)
        if ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        if s.samples_all:
            if ctx.wide:
                x_nchw, pad = xs, (0, 0)
            else:
                x_nchw, pad = xs.permute(3, 0, 1, 2), (ph, pw)
            g = torch.nn.grad.conv2d_weight(x_nchw, s.shape, dy, stride=(sh, sw), padding=pad, groups=s.groups)
            s.add_sampled_grad(g.reshape(-1))
        elif s.sampled_positions is not None:
            rows, cols = _sampled_rows_cols(s)
            g = torch.empty(rows.size, dtype=torch.float32)
            _conv_weight_grad(ctx, rows, cols, ds, d_off, xs, g)
            s.add_sampled_grad(g)
        return dx, dv, db, None, None


def _conv_weight_grad(
    ctx: Any, rows: np.ndarray, cols: np.ndarray, ds: Tensor, d_off: int, xs: Tensor, out: Tensor
) -> None:
    """Weight gradient at positions (rows, cols) into `out`, with the layouts the forward chose."""
    s: SparseStructure = ctx.structure
    (sh, sw), (ph, pw) = ctx.geom
    o, cin_g, kh, kw = s.shape
    cout_g = o // s.groups
    if ctx.wide:
        KC.conv_sampled_grad_wide(rows, cols, _np(ds), d_off, _np(xs), _np(out), kh, kw, cout_g, cin_g)
    else:
        KC.conv_sampled_grad(rows, cols, _np(ds), _np(xs), _np(out), sh, sw, ph, pw, kh, kw, cout_g, cin_g)


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

    Input and output are NCHW (batched, 4-D). Dilated convolutions take the masked dense path.
    """
    if len(structure.shape) != 4:
        raise ValueError(f"sparse_conv2d needs a 4-D weight structure, got shape {structure.shape}")
    if x.dim() != 4 or x.shape[1] != structure.in_channels:
        raise ValueError(f"input must be (N, {structure.in_channels}, H, W), got {tuple(x.shape)}")
    geom = ConvGeometry(_pair(stride), _pair(padding))
    kh, kw = structure.kernel_size
    if x.shape[2] + 2 * geom.padding[0] < kh or x.shape[3] + 2 * geom.padding[1] < kw:
        raise ValueError(f"input {tuple(x.shape[2:])} with padding {geom.padding} is smaller than the kernel")
    if _pair(dilation) != (1, 1) or not uses_kernels(x, values, bias):
        w = _masked_dense_weight(values, structure)
        return F.conv2d(x, w, bias, geom.stride, geom.padding, _pair(dilation), structure.groups)
    return _SparseConv2dFn.apply(x, values.contiguous(), bias, structure, geom)
