"""sparse_linear / sparse_conv2d: Numba kernels for CPU float32, masked dense compute everywhere else.

Both return gradients for the compact `values` (one per active position), the input and the bias,
and honour a structure's sampled-gradient request. The two paths have identical semantics; the
dense one also serves CUDA tensors, other dtypes and dilated convolutions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _kernels_conv as KC
from . import _kernels_linear as KL
from . import _kernels_wide as KW
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
            KL.sddmm_t(s.indptr, s.cols, _np(dyt), _np(xt), _np(dv))
        if ctx.needs_input_grad[2]:
            db = dyt.sum(1)
        if s.samples_all:
            s.add_sampled_grad((dyt @ xt.t()).reshape(-1))
        elif s.sampled_positions is not None:
            rows, cols = _rows_cols(s, s.sampled_positions)
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


# Convolutions with a square stride whose output is at least this wide run on the "wide" kernels
# (padded NCHW planes, no transposes, long vectors); the others on the batch-innermost CHWN
# layout, which vectorizes over the batch and so stays efficient for small maps.
WIDE_MIN_WIDTH = 12


def _rows_cols(structure: SparseStructure, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and in-row position (int32) of flat positions of `structure`'s weight."""
    rows = positions // structure.row_size
    return rows.astype(np.int32), (positions - rows * structure.row_size).astype(np.int32)


class _WidePlan(NamedTuple):
    """A conv as a stride-1 conv over zero-padded (and, for stride s > 1, space-to-depth) input."""

    structure: SparseStructure  # the working weight: the original or its space-to-depth twin
    perm: np.ndarray | None  # working slot -> original slot (None: the same)
    stride: int
    pads: tuple[int, int, int, int]  # (left, right, top, bottom) padding of the input; negative crops


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
        o, cin_w, kh2, kw2 = ws.shape
        left, right, top, bottom = plan.pads
        vals = _np(values) if plan.perm is None else _np(values)[plan.perm]
        y = torch.empty(n, o, (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1, dtype=torch.float32)
        KW.wide_forward(
            _np(x), ws.indptr, ws.cols, vals, _bias_np(bias, o), _np(y), s, top, left,
            (h + top + bottom) // s, (w + left + right) // s, kh2, kw2, kh, kw, o // ws.groups, cin_w,
        )  # fmt: skip
        ctx.save_for_backward(x, values)
        ctx.structure, ctx.plan, ctx.geom = structure, plan, geom
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, values = ctx.saved_tensors
        s: SparseStructure = ctx.structure
        plan: _WidePlan = ctx.plan
        ws, stride = plan.structure, plan.stride
        o, cin_w, kh2, kw2 = ws.shape
        n, c, h, w = x.shape
        left, right, top, bottom = plan.pads
        need_dx = bool(ctx.needs_input_grad[0])
        vals = _np(values) if plan.perm is None else _np(values)[plan.perm]
        # weight gradient positions: the active slots (working order), then any requested positions
        rows, cols = (ws.rows, ws.cols) if ctx.needs_input_grad[1] else (ws.rows[:0], ws.cols[:0])
        requested = s.sampled_positions
        if requested is not None:
            r2, c2 = _rows_cols(ws, _working_positions(plan, s, requested))
            rows, cols = np.concatenate([rows, r2]), np.concatenate([cols, c2])
        t_ptr, t_cols, t_vals = ws.indptr, ws.cols, vals  # placeholders of the right types
        if need_dx:
            idx = ws.by_input()
            t_ptr, t_cols, t_vals = idx.ptr, idx.tcols, vals[idx.perm]
        nchunk = max(1, min(n, numba.get_num_threads()))
        grad_w = np.zeros((nchunk, rows.size))
        grad_b = np.zeros((nchunk, o))
        dx = torch.empty((n, c, h, w) if need_dx else (0,), dtype=torch.float32)
        KW.wide_backward(
            _np(x), _np(dy.contiguous()), t_ptr, t_cols, t_vals, rows, cols, _np(dx), grad_w, grad_b, stride, top, left,
            (h + top + bottom) // stride, (w + left + right) // stride, kh2, kw2, *s.kernel_size, o // ws.groups, cin_w,
            need_dx, nchunk,
        )  # fmt: skip
        gw = torch.from_numpy(grad_w.sum(0).astype(np.float32))
        dv = None
        if ctx.needs_input_grad[1]:
            dv = gw[: s.nnz] if plan.perm is None else torch.empty(s.nnz).index_copy_(0, torch.from_numpy(plan.perm), gw[: s.nnz])
        if requested is not None:
            s.add_sampled_grad(gw[rows.size - requested.size :])
        if s.samples_all:
            g = torch.nn.grad.conv2d_weight(x, s.shape, dy, ctx.geom.stride, ctx.geom.padding, groups=s.groups)
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
            structure.indptr, structure.cols, _np(values), _bias_np(bias, o), _np(xt), _np(y),
            sh, sw, ph, pw, kh, kw, o // structure.groups, cin_g,
        )  # fmt: skip
        ctx.save_for_backward(xt, values)
        ctx.structure, ctx.geom = structure, geom
        return y

    @staticmethod
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
            vin = _np(values)[idx.perm]
            if (sh, sw) == (1, 1):  # forward conv of dy with the transposed, flipped weight
                zeros = np.zeros(c, np.float32)
                KC.conv_forward(
                    idx.ptr, idx.tcols, vin, zeros, _np(dyt), _np(dx), 1, 1, kh - 1 - ph, kw - 1 - pw, kh, kw, cin_g, cout_g
                )
            else:
                KC.conv_input_grad(idx.ptr, idx.rows, idx.cols, vin, _np(dyt), _np(dx), *geo)
        if ctx.needs_input_grad[1]:
            dv = torch.empty(s.nnz, dtype=torch.float32)
            KC.conv_sampled_grad(s.rows, s.cols, _np(dyt), _np(xt), _np(dv), *geo, cout_g, cin_g)
        if ctx.needs_input_grad[2]:
            db = dyt.sum((1, 2, 3))
        if s.samples_all:
            g = torch.nn.grad.conv2d_weight(xt.permute(3, 0, 1, 2), s.shape, dy, (sh, sw), (ph, pw), groups=s.groups)
            s.add_sampled_grad(g.reshape(-1))
        elif s.sampled_positions is not None:
            rows, cols = _rows_cols(s, s.sampled_positions)
            g = torch.empty(rows.size, dtype=torch.float32)
            KC.conv_sampled_grad(rows, cols, _np(dyt), _np(xt), _np(g), *geo, cout_g, cin_g)
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
    geom = ConvGeometry(_pair(stride), _pair(padding))
    kh, kw = structure.kernel_size
    if x.shape[2] + 2 * geom.padding[0] < kh or x.shape[3] + 2 * geom.padding[1] < kw:
        raise ValueError(f"input {tuple(x.shape[2:])} with padding {geom.padding} is smaller than the kernel")
    if _pair(dilation) != (1, 1) or not uses_kernels(x, values, bias):
        w = _masked_dense_weight(values, structure)
        return F.conv2d(x, w, bias, geom.stride, geom.padding, _pair(dilation), structure.groups)
    (sh, sw), (ph, pw) = geom
    wide = sh == sw and (x.shape[3] + 2 * pw - kw) // sw + 1 >= WIDE_MIN_WIDTH
    return (_WideConvFn if wide else _ChwnConvFn).apply(x, values.contiguous(), bias, structure, geom)
