"""sparse_conv2d: direct sparse convolution kernels (no im2col) for CPU float32, masked dense elsewhere.

Two kernel families: "wide" (padded NCHW images, one fused pass per image; square strides, used
when the output is at least WIDE_MIN_WIDTH wide) and CHWN (batch innermost; any stride, best for
small maps). Both have identical semantics; dilated convolutions take the masked dense path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_weight

from . import _kernels_conv as KC
from . import _kernels_wide as KW
from ._common import (
    bias_array,
    masked_dense_weight,
    np_view,
    pair,
    rows_cols,
    uses_kernels,
)
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
    out = torch.empty(v.shape, dtype=torch.float32)
    KC.nchw_to_chwn(np_view(x.contiguous()), np_view(out))
    return out


# Convolutions with a square stride whose output is at least this wide run on the "wide" kernels
# (padded NCHW planes, no transposes, long vectors); the others on the batch-innermost CHWN
# layout, which vectorizes over the batch and so stays efficient for small maps.
WIDE_MIN_WIDTH = 12


class _WidePlan(NamedTuple):
    """A conv as a stride-1 conv over zero-padded (and, for stride s > 1, space-to-depth) input."""

    structure: SparseStructure  # the working weight: the original or its space-to-depth twin
    perm: np.ndarray | None  # working slot -> original slot (None: the same)
    stride: int
    pads: tuple[int, int, int, int]  # (left, right, top, bottom) padding of the input; negative crops


def _wide_geometry(plan: _WidePlan, structure: SparseStructure, h: int, w: int) -> KW.WideGeometry:
    """The geometry tuple of the wide kernels for an h x w input."""
    left, right, top, bottom = plan.pads
    s, ws = plan.stride, plan.structure
    return (s, top, left, (h + top + bottom) // s, (w + left + right) // s, *ws.kernel_size, *structure.kernel_size,
            ws.shape[0] // ws.groups, ws.shape[1])  # fmt: skip


def _wide_plan(structure: SparseStructure, geom: ConvGeometry, h: int, w: int) -> _WidePlan:
    """The working weight and input padding for the wide kernels."""
    s, (ph, pw) = geom.stride[0], geom.padding
    if s == 1:
        return _WidePlan(structure, None, 1, (pw, pw, ph, ph))
    ws, perm = structure.space_to_depth(s)
    kh, kw = structure.kernel_size
    kh2, kw2 = ws.kernel_size
    ho, wo = (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1
    return _WidePlan(ws, perm, s, (pw, s * (wo + kw2 - 1) - w - pw, ph, s * (ho + kh2 - 1) - h - ph))


def _working_positions(plan: _WidePlan, structure: SparseStructure, positions: np.ndarray) -> np.ndarray:
    """Flat positions of the original weight mapped into the working weight."""
    return positions if plan.perm is None else structure.s2d_positions(positions, plan.stride)


def _chunks(n: int) -> int:
    """Task chunks of a kernel call over n tasks (images, or output rows): one contiguous chunk per Numba thread."""
    return max(1, min(n, numba.get_num_threads()))


class _WideConvFn(torch.autograd.Function):
    """Sparse Conv2d on the fused wide kernels (square strides; see _kernels_wide)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, structure: SparseStructure, geom: ConvGeometry
    ) -> Tensor:
        x = x.contiguous()
        n, _, h, w = x.shape
        kh, kw = structure.kernel_size
        (s, _), (ph, pw) = geom
        plan = _wide_plan(structure, geom, h, w)
        ws = plan.structure
        o = ws.shape[0]
        vals = np_view(values) if plan.perm is None else np_view(values)[plan.perm]
        y = torch.empty(n, o, (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1, dtype=torch.float32)
        KW.wide_forward(
            np_view(x), ws.indptr, ws.cols, vals, bias_array(bias, o), np_view(y), _wide_geometry(plan, structure, h, w),
            _chunks(n),
        )  # fmt: skip
        ctx.save_for_backward(x, values)
        ctx.structure, ctx.plan, ctx.geom = structure, plan, geom
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, values = ctx.saved_tensors
        s: SparseStructure = ctx.structure
        plan: _WidePlan = ctx.plan
        ws, o = plan.structure, plan.structure.shape[0]
        n, c, h, w = x.shape
        need_dx = bool(ctx.needs_input_grad[0])
        vals = np_view(values) if plan.perm is None else np_view(values)[plan.perm]
        # weight gradient positions: the active slots (working order), then any requested positions
        rows, cols = (ws.rows, ws.cols) if ctx.needs_input_grad[1] else (ws.rows[:0], ws.cols[:0])
        requested = s.sampled_positions
        if requested is not None:
            r2, c2 = rows_cols(ws, _working_positions(plan, s, requested))
            rows, cols = np.concatenate([rows, r2]), np.concatenate([cols, c2])
        t_ptr, t_cols, t_vals = ws.indptr, ws.cols, vals  # placeholders of the right types
        if need_dx:
            idx = ws.by_input()
            t_ptr, t_cols, t_vals = idx.ptr, idx.tcols, vals[idx.perm]
        nchunk = _chunks(n)
        grad_w = np.zeros((nchunk, rows.size))
        grad_b = np.zeros((nchunk, o))
        dx = torch.empty((n, c, h, w) if need_dx else (0,), dtype=torch.float32)
        KW.wide_backward(
            np_view(x), np_view(dy.contiguous()), t_ptr, t_cols, t_vals, rows, cols, np_view(dx), grad_w, grad_b,
            _wide_geometry(plan, s, h, w), need_dx, bool(ctx.needs_input_grad[2]), nchunk,
        )  # fmt: skip
        gw = torch.from_numpy(grad_w.sum(0).astype(np.float32))
        dv = None
        if ctx.needs_input_grad[1]:
            dv = gw[: s.nnz]
            if plan.perm is not None:  # back from working order to the structure's slot order
                dv = torch.empty_like(dv).index_copy_(0, torch.from_numpy(plan.perm), dv)
        if requested is not None:
            s.add_sampled_grad(gw[rows.size - requested.size :])
        if s.samples_all:
            g = conv2d_weight(x, s.shape, dy, ctx.geom.stride, ctx.geom.padding, groups=s.groups)
            s.add_sampled_grad(g.reshape(-1))
        db = torch.from_numpy(grad_b.sum(0).astype(np.float32)) if ctx.needs_input_grad[2] else None
        return (dx if need_dx else None), dv, db, None, None


class _ChwnConvFn(torch.autograd.Function):
    """Sparse Conv2d on the batch-innermost CHWN kernels (any stride; see _kernels_conv)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, values: Tensor, bias: Tensor | None, structure: SparseStructure, geom: ConvGeometry
    ) -> Tensor:
        n, _, h, w = x.shape
        o, cin_g, kh, kw = structure.shape
        (sh, sw), (ph, pw) = geom
        y = torch.empty(n, o, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1, dtype=torch.float32)
        xt = _to_chwn(x)
        KC.conv_forward(
            structure.indptr, structure.cols, np_view(values), bias_array(bias, o), np_view(xt), np_view(y),
            sh, sw, ph, pw, kh, kw, o // structure.groups, cin_g, _chunks(o * y.shape[2]),
        )  # fmt: skip
        ctx.save_for_backward(xt, values)
        ctx.structure, ctx.geom = structure, geom
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        xt, values = ctx.saved_tensors
        s: SparseStructure = ctx.structure
        (sh, sw), (ph, pw) = ctx.geom
        o, cin_g, kh, kw = s.shape
        cout_g = o // s.groups
        dyt = _to_chwn(dy)
        geo = (sh, sw, ph, pw, kh, kw)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            idx = s.by_input()
            c, h, w, n = xt.shape
            dx = torch.empty(n, c, h, w, dtype=torch.float32)
            vin = np_view(values)[idx.perm]
            if (sh, sw) == (1, 1):  # forward conv of dy with the transposed, flipped weight
                zeros = np.zeros(c, np.float32)
                KC.conv_forward(
                    idx.ptr, idx.tcols, vin, zeros, np_view(dyt), np_view(dx), 1, 1, kh - 1 - ph, kw - 1 - pw, kh, kw, cin_g, cout_g,
                    _chunks(c * h),
                )  # fmt: skip
            else:
                KC.conv_input_grad(idx.ptr, idx.rows, idx.cols, vin, np_view(dyt), np_view(dx), *geo)
        if ctx.needs_input_grad[1]:
            dv = torch.empty(s.nnz, dtype=torch.float32)
            KC.conv_sampled_grad(s.rows, s.cols, np_view(dyt), np_view(xt), np_view(dv), *geo, cout_g, cin_g)
        if ctx.needs_input_grad[2]:
            db = dyt.sum((1, 2, 3))
        if s.samples_all:
            g = conv2d_weight(xt.permute(3, 0, 1, 2), s.shape, dy, (sh, sw), (ph, pw), groups=s.groups)
            s.add_sampled_grad(g.reshape(-1))
        elif s.sampled_positions is not None:
            rows, cols = rows_cols(s, s.sampled_positions)
            g = torch.empty(rows.size, dtype=torch.float32)
            KC.conv_sampled_grad(rows, cols, np_view(dyt), np_view(xt), np_view(g), *geo, cout_g, cin_g)
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

    Input and output are NCHW (batched, 4-D). Dilated convolutions take the masked dense path.
    """
    if len(structure.shape) != 4:
        raise ValueError(f"sparse_conv2d needs a 4-D weight structure, got shape {structure.shape}")
    if x.dim() != 4 or x.shape[1] != structure.in_channels:
        raise ValueError(f"input must be (N, {structure.in_channels}, H, W), got {tuple(x.shape)}")
    geom = ConvGeometry(pair(stride), pair(padding))
    kh, kw = structure.kernel_size
    if x.shape[2] + 2 * geom.padding[0] < kh or x.shape[3] + 2 * geom.padding[1] < kw:
        raise ValueError(f"input {tuple(x.shape[2:])} with padding {geom.padding} is smaller than the kernel")
    if pair(dilation) != (1, 1) or not uses_kernels(x, values, bias, structure=structure):
        w = masked_dense_weight(values, structure)
        return F.conv2d(x, w, bias, geom.stride, geom.padding, pair(dilation), structure.groups)
    (sh, sw), (_, pw) = geom
    wide = sh == sw and (x.shape[3] + 2 * pw - kw) // sw + 1 >= WIDE_MIN_WIDTH
    return (_WideConvFn if wide else _ChwnConvFn).apply(x, values.contiguous(), bias, structure, geom)
