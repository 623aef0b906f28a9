"""SparseLinear / SparseConv2d modules and helpers to swap them in for a model's dense layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor, nn

from ._common import pair
from .conv import sparse_conv2d
from .layout import use_batch_innermost, use_plain_modules
from .linear import sparse_linear
from .structure import SparseStructure, TopologyDelta


class _SparseLayer(nn.Module):
    """Base of the sparse layers: weight = `values` over `structure`, saved with its active positions."""

    structure: SparseStructure
    values: nn.Parameter
    bias: nn.Parameter | None
    exported: bool = False  # set by to_dense_modules: the model holds a dense layer in this one's place

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
        raise AttributeError(
            f"{type(self).__name__} has no dense 'weight': backend 'sparse' trains `values` at `structure`'s active "
            "positions (`dense_weight()` builds a dense copy); code that reads a layer's .weight needs backend 'masked' "
            "(nn.TransformerEncoderLayer reads it in its inference fast path: torch.backends.mha.set_fastpath_enabled(False) "
            "turns that off)"
        )

    def dense_weight(self) -> Tensor:
        """The dense weight (zeros at inactive positions), detached: for checks, export and checkpoints."""
        return self.structure.to_dense(self.values.detach())

    def mask(self) -> Tensor:
        """The bool mask of active positions, on the values' device."""
        return self.structure.mask(self.values.device)

    def request_sampled_grad(self, positions: Tensor | None = None) -> None:
        """See SparseStructure.request_sampled_grad: dL/dW at flat `positions` (None: all) on the next backward."""
        self.structure.request_sampled_grad(positions)

    def take_sampled_grad(self) -> Tensor | None:
        """The sampled gradient accumulated since the request (None if no backward ran); ends the request."""
        return self.structure.take_sampled_grad()

    @torch.no_grad()
    def update_topology(self, dropped: Tensor, grown: Tensor, grown_values: Tensor | float = 0.0) -> TopologyDelta:
        """Drop and grow flat positions in place; the `values` Parameter (the same object) and its .grad are resized.

        Optimizer state sized to the old active count must be remapped with `remap_optimizer_state`.
        """
        new, delta = self.structure.updated(dropped, grown)
        grad = self.values.grad
        self._resize_values(delta.remap(self.values.detach(), grown_values))
        self.values.grad = None if grad is None else delta.remap(grad)
        self.structure = new
        return delta

    def _resize_values(self, data: Tensor) -> None:
        """Give the `values` Parameter (the same object) new data of another size.

        Not `values.data = data`: autograd keeps a leaf's gradient accumulator, which remembers the
        leaf's size, for as long as any graph that used it is alive (a loss the caller still holds),
        so the next backward would reject the resized gradient. Swapping in a fresh tensor gives
        the Parameter a fresh accumulator. A Parameter something holds a weak reference to (as
        torch.compile's guards do) cannot be swapped and gets its data set: the caller must then
        let go of old graphs before the next backward.
        """
        values = self.values
        hooks, post_hooks, attributes = values._backward_hooks, values._post_accumulate_grad_hooks, dict(values.__dict__)
        try:
            torch.utils.swap_tensors(values, nn.Parameter(data, requires_grad=values.requires_grad))
        except RuntimeError:  # "Cannot swap t1 because it has weakref associated with it"
            values.data = data
            return
        # the swap moved the user's gradient hooks and attributes to the discarded tensor: put them back
        values.__dict__.update(attributes)
        if hooks is not None:
            values._backward_hooks = hooks
        if post_hooks is not None:
            values._post_accumulate_grad_hooks = post_hooks

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "active_positions"] = torch.from_numpy(self.structure.flat.copy())

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "active_positions"
        if key in state_dict:
            flat = state_dict[key].detach().cpu().numpy().astype(np.int64)
            if not np.array_equal(flat, self.structure.flat):  # the same positions keep their structure (and the
                # gradient request standing on it: weights put back after an evaluation, say)
                structure = SparseStructure(self.structure.shape, flat, self.structure.groups)
                structure.copy_request(self.structure)
                self.structure = structure
                self._resize_values(self.values.detach().new_zeros(self.structure.nnz))
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k != key},
            prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
        )  # fmt: skip

    def _trainable_as(self, dense: nn.Module) -> Self:
        """This layer with `dense`'s requires_grad flags on its values and bias (a frozen layer stays frozen)."""
        self.values.requires_grad_(dense.weight.requires_grad)
        if self.bias is not None and dense.bias is not None:
            self.bias.requires_grad_(dense.bias.requires_grad)
        return self

    def _init_sparse(self, structure: SparseStructure, values: Tensor, bias: Tensor | None) -> None:
        """Registers the structure, the compact values and the optional bias."""
        if values.shape != (structure.nnz,):
            raise ValueError(f"values must have shape ({structure.nnz},), got {tuple(values.shape)}")
        self.structure = structure
        self.values = nn.Parameter(values)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias))


class SparseLinear(_SparseLayer):
    """A Linear layer that stores only its active weights and computes with sparse kernels."""

    def __init__(self, structure: SparseStructure, values: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if len(structure.shape) != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight structure, got {structure.shape}")
        self._init_sparse(structure, values, bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor) -> SparseLinear:
        """The sparse layer holding `linear`'s weights at the True entries of `mask` (copies)."""
        structure = SparseStructure.from_mask(mask.to(torch.bool))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(structure, structure.gather(linear.weight), bias)._trainable_as(linear)

    @property
    def in_features(self) -> int:
        """Input features."""
        return self.structure.shape[1]

    @property
    def out_features(self) -> int:
        """Output features."""
        return self.structure.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """F.linear with the sparse weight."""
        return sparse_linear(x, self.values, self.structure, self.bias)

    def to_dense_module(self) -> nn.Linear:
        """An equivalent nn.Linear (weights copied)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, self.values.device, self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, density={self.structure.density:.4f}"


def zero_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The (height, width) zero padding of `conv` as numbers; ValueError where a sparse twin cannot pad as it does."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")
    if not isinstance(conv.padding, str):
        return pair(conv.padding)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if conv.padding == "same" and any(t % 2 for t in total):
        raise ValueError("padding='same' with an even effective kernel is asymmetric: not supported")
    return (0, 0) if conv.padding == "valid" else (total[0] // 2, total[1] // 2)


class SparseConv2d(_SparseLayer):
    """A zero-padded Conv2d that stores only its active weights and computes with direct sparse kernels."""

    def __init__(
        self,
        structure: SparseStructure,
        values: Tensor,
        bias: Tensor | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        super().__init__()
        if len(structure.shape) != 4:
            raise ValueError(f"SparseConv2d needs a 4-D weight structure, got {structure.shape}")
        self._init_sparse(structure, values, bias)
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Tensor) -> SparseConv2d:
        """The sparse layer holding `conv`'s weights at the True entries of `mask` (copies)."""
        structure = SparseStructure.from_mask(mask.to(torch.bool), conv.groups)
        bias = None if conv.bias is None else conv.bias.detach().clone()
        layer = cls(structure, structure.gather(conv.weight), bias, conv.stride, zero_padding(conv), conv.dilation)  # type: ignore[arg-type]
        return layer._trainable_as(conv)

    def forward(self, x: Tensor) -> Tensor:
        """F.conv2d with the sparse weight."""
        return sparse_conv2d(x, self.values, self.structure, self.bias, self.stride, self.padding, self.dilation)

    def to_dense_module(self) -> nn.Conv2d:
        """An equivalent nn.Conv2d (weights copied)."""
        o, cin_g, kh, kw = self.structure.shape
        g = self.structure.groups
        conv = nn.Conv2d(
            cin_g * g, o, (kh, kw), self.stride, self.padding, self.dilation, g, self.bias is not None,
            device=self.values.device, dtype=self.values.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if conv.bias is not None and self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        o, cin_g, kh, kw = self.structure.shape
        return (
            f"{cin_g * self.structure.groups}, {o}, kernel_size={(kh, kw)}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.structure.groups}, density={self.structure.density:.4f}"
        )


SparseModule = SparseLinear | SparseConv2d


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def module_paths(model: nn.Module, module: nn.Module) -> list[str]:
    """Every dotted path at which `module` (the same object) sits in `model`: more than one for a layer used twice."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


# The hooks a twin takes over from the layer it replaces (state-dict hooks stay: the twin's keys differ).
_MODULE_HOOKS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` at every path of `old`, so a layer used at several places stays one layer; `new` takes over
    `old`'s forward and backward hooks (the same dicts, so the user's handles still remove them)."""
    for attr in _MODULE_HOOKS:
        object.__setattr__(new, attr, getattr(old, attr))
    for path in module_paths(model, old):
        _set_submodule(model, path, new)


def to_sparse_modules(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, SparseModule]:
    """Swaps, in place, each nn.Linear / nn.Conv2d whose "<module>.weight" is a key of `masks` for its sparse twin.

    Returns the new modules keyed by the same weight names; their trainable weight is now
    "<module>.values", so an optimizer must be built (or rebuilt) after the swap. The model's dense
    layers get their batch-innermost twins (`layout.use_batch_innermost`: the class changes, nothing
    else), which keep the layout the kernels emit; PyTorch's own take slow paths for it.
    """
    swapped: dict[str, SparseModule] = {}
    for weight_name, mask in masks.items():
        mod_name, _, leaf = weight_name.rpartition(".")
        if leaf != "weight":
            raise ValueError(f"mask key {weight_name!r} does not name a '.weight'")
        dense = model.get_submodule(mod_name)
        if type(dense) is nn.Linear:
            sparse: SparseModule = SparseLinear.from_dense(dense, mask)
        elif type(dense) is nn.Conv2d:
            sparse = SparseConv2d.from_dense(dense, mask)
        else:
            raise ValueError(f"{mod_name!r} is a {type(dense).__name__}; only nn.Linear and nn.Conv2d can be made sparse")
        _replace_module(model, dense, sparse)
        swapped[weight_name] = sparse
    use_batch_innermost(model)
    return swapped


def to_dense_modules(model: nn.Module) -> list[str]:
    """Swaps, in place, every SparseLinear / SparseConv2d back to its dense nn module, and the batch-innermost twins
    of the other layers back to PyTorch's own; returns the sparse layers' names.

    A Sparsifier training those layers refuses to step afterwards: to export during training, pass a copy."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    for _, layer in layers:
        _replace_module(model, layer, layer.to_dense_module())
        layer.exported = True
    use_plain_modules(model)
    return [n for n, _ in layers]


# Per-weight optimizer state a new weight does not start at zero: (optimizer class, state key) -> its group option.
_NONZERO_START = {(torch.optim.Rprop, "step_size"): "lr", (torch.optim.Adagrad, "sum"): "initial_accumulator_value"}


def fresh_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, key: str) -> float:
    """The value per-weight state `key` of `param` starts at in `optimizer`: zero but for Rprop's step size (lr)
    and Adagrad's sum (its initial accumulator), so a grown weight starts as a fresh one would (an Rprop step
    size of zero would never grow again)."""
    for (kind, state_key), option in _NONZERO_START.items():
        if isinstance(optimizer, kind) and key == state_key:
            group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
            return float(group[option])
    return 0.0


def remap_optimizer_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, delta: TopologyDelta) -> None:
    """Remaps every per-weight state tensor of `param` (momentum, Adam moments) after a topology change.

    Kept weights keep their state, grown ones start as fresh weights do (`fresh_state`); scalar state
    (Adam's step) is untouched.
    """
    state = optimizer.state.get(param, {})
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == delta.old_nnz:
            state[key] = delta.remap(value, fresh_state(optimizer, param, key))
