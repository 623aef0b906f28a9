"""Batch-innermost activations: dense layers that keep the memory layout the sparse kernels emit.

Sparse Conv2d layers return (N, C, H, W) tensors stored as (C, H, W, N), and sparse Linear layers
(N, F) ones stored as (F, N): with the batch innermost, every active weight multiplies long
contiguous runs. The next sparse layer reads that layout without a copy, but PyTorch's batch norm,
pooling and flatten return contiguous NCHW (and elementwise backwards slow down severalfold when a
contiguous gradient meets a batch-innermost activation), and its matmul takes a slow path for a
transposed input. The twins below give the same results with the same parameters and buffers for any input,
and keep a batch-innermost input batch-innermost; `use_batch_innermost` gives a model's layers
these classes in place (the sparse backend does so when it swaps in the sparse layers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from . import _kernels_pool as KP
from ._common import match_torch_threads, np_view, uses_kernels
from .linear import linear_any_layout


def is_batch_innermost(x: Tensor) -> bool:
    """Whether a 4-D (N, C, H, W) tensor with N > 1 is stored as a contiguous (C, H, W, N) one."""
    return x.dim() == 4 and x.shape[0] > 1 and not x.is_contiguous() and x.permute(1, 2, 3, 0).is_contiguous()


def batch_innermost(shape: tuple[int, ...], like: Tensor | None = None) -> Tensor:
    """An uninitialized (N, C, H, W) tensor laid out batch-innermost, as (C, H, W, N) in memory; float32 CPU,
    or the dtype and device of `like`.

    Allocated with those strides (not a permuted view), so in-place ops on a layer's output are allowed.
    """
    n, _, h, w = shape
    options = {"dtype": torch.float32} if like is None else {"dtype": like.dtype, "device": like.device}
    return torch.empty_strided(shape, (1, h * w * n, w * n, n), **options)


class BatchInnermostLinear(nn.Linear):
    """nn.Linear that multiplies a batch-innermost 2-D input as W·xᵀ, a plain GEMM (PyTorch's own path is about 5x slower)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear_any_layout(x, self.weight, self.bias)


class BatchInnermostBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that normalizes a batch-innermost input as the contiguous (1, C, H·W·N) tensor it is in memory.

    The statistics run over the same N·H·W values per channel, so outputs, gradients and running
    statistics are those of nn.BatchNorm2d; the output stays batch-innermost, with no copy.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not is_batch_innermost(x):
            return super().forward(x)
        n, c, h, w = x.shape
        y = super().forward(x.permute(1, 2, 3, 0).reshape(1, c, h * w * n))
        return y.view(c, h, w, n).permute(3, 0, 1, 2)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4 and not (x.dim() == 3 and x.shape[0] == 1):  # 3-D only as the (1, C, H*W*N) view of forward
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class BatchInnermostReLU(nn.ReLU):
    """nn.ReLU that applies out of place to a batch-innermost view (what the twins here return) even when `inplace`.

    An in-place op on a view makes autograd rebuild the base's gradient through contiguous copies,
    which also hands the layers before a contiguous gradient; a fresh output costs one allocation.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace and x._is_view() and is_batch_innermost(x):
            return F.relu(x)
        return super().forward(x)


class BatchInnermostReLU6(nn.ReLU6):
    """nn.ReLU6 that applies out of place to a batch-innermost view even when `inplace` (see BatchInnermostReLU)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace and x._is_view() and is_batch_innermost(x):
            return F.relu6(x)
        return super().forward(x)


def pooled_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """Output length of a dilation-1 pooling window along one axis, as PyTorch computes it (ceil mode: a last,
    partial window, unless it would start in the right padding)."""
    out = -(-(size + 2 * p - k) // s) + 1 if ceil_mode else (size + 2 * p - k) // s + 1
    return out - 1 if ceil_mode and (out - 1) * s >= size + p else out


class _MaxPoolFn(torch.autograd.Function):
    """max_pool2d of a batch-innermost CPU float32 input by the Numba kernels (dilation 1), output batch-innermost."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], ceil_mode: bool) -> Tensor:
        match_torch_threads()
        y = batch_innermost((*x.shape[:2], *(pooled_size(x.shape[2 + i], k[i], s[i], p[i], ceil_mode) for i in (0, 1))))
        arg = torch.empty(y.permute(1, 2, 3, 0).shape, dtype=torch.int32)
        KP.max_pool(np_view(x.permute(1, 2, 3, 0)), *k, *s, *p, np_view(y.permute(1, 2, 3, 0)), np_view(arg))
        ctx.save_for_backward(arg)
        ctx.geometry, ctx.input_shape = (*k, *s, *p), x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        match_torch_threads()
        (arg,) = ctx.saved_tensors
        gx = batch_innermost(ctx.input_shape)
        KP.max_pool_backward(np_view(gy.permute(1, 2, 3, 0).contiguous()), np_view(arg), *ctx.geometry,
                             np_view(gx.permute(1, 2, 3, 0)))  # fmt: skip
        return gx, None, None, None, None


class BatchInnermostMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that pools a batch-innermost input without a copy: by the Numba kernels (CPU float32, dilation 1),
    else as a (1, C, H, W, N) volume with a (kh, kw, 1) window."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or not is_batch_innermost(x):
            return super().forward(x)
        k, s, p, d = (_pair(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        h, w = x.shape[2:]
        fits = all(s[i] > 0 and 2 * p[i] <= k[i] <= (h, w)[i] + 2 * p[i] for i in (0, 1))  # else PyTorch's error
        if d == (1, 1) and fits and uses_kernels(x) and not torch.compiler.is_compiling():
            return _MaxPoolFn.apply(x, k, s, p, self.ceil_mode)
        y = F.max_pool3d(x.permute(1, 2, 3, 0).unsqueeze(0), (*k, 1), (*s, 1), (*p, 0), (*d, 1), self.ceil_mode)
        return y.squeeze(0).permute(3, 0, 1, 2)


class BatchInnermostAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d that averages a batch-innermost input to 1x1 as a mean over the (C, H, W, N) view.

    Its gradient then reaches the layers before batch-innermost too; PyTorch's pooling would hand
    them a contiguous one, which every elementwise backward after it would have to transpose.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _pair(self.output_size) != (1, 1) or not is_batch_innermost(x):
            return super().forward(x)
        return x.permute(1, 2, 3, 0).mean((1, 2), keepdim=True).permute(3, 0, 1, 2)


class BatchInnermostFlatten(nn.Flatten):
    """nn.Flatten that turns a batch-innermost (N, C, H, W) input into a batch-innermost (N, C·H·W) one without a copy."""

    def forward(self, x: Tensor) -> Tensor:
        if self.start_dim == 1 and self.end_dim == -1 and is_batch_innermost(x):
            return x.permute(1, 2, 3, 0).reshape(-1, x.shape[0]).t()
        return super().forward(x)


TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: BatchInnermostLinear,
    nn.BatchNorm2d: BatchInnermostBatchNorm2d,
    nn.ReLU: BatchInnermostReLU,
    nn.ReLU6: BatchInnermostReLU6,
    nn.MaxPool2d: BatchInnermostMaxPool2d,
    nn.AdaptiveAvgPool2d: BatchInnermostAdaptiveAvgPool2d,
    nn.Flatten: BatchInnermostFlatten,
}


def use_batch_innermost(model: nn.Module) -> None:
    """Give every exact nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AdaptiveAvgPool2d and nn.Flatten
    of `model` its batch-innermost twin, in place.

    Only the class changes (parameters, buffers and hooks stay the same objects), so optimizers
    and state dicts are unaffected.
    """
    for module in model.modules():
        twin = TWINS.get(type(module))
        if twin is not None:
            module.__class__ = twin


def use_plain_modules(model: nn.Module) -> None:
    """Undo `use_batch_innermost`, in place: every twin becomes the PyTorch class it stands for again (for export:
    TorchScript and other tools expect PyTorch's own modules)."""
    plain = {twin: original for original, twin in TWINS.items()}
    for module in model.modules():
        original = plain.get(type(module))
        if original is not None:
            module.__class__ = original
