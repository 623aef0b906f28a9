"""The `sparse` compute backend of a Sparsifier: layers that store and train only their active weights.

With `backend="masked"` (the default) a sparsified layer keeps its dense weight and the engine
multiplies it by the mask. With `backend="sparse"` the engine swaps each layer it may change for a
`bidst.sparse` twin once the initial masks exist, and puts the twin's compact `values` into the
user's optimizer in place of the dense weight (its state gathered to the active positions), so
parameter and optimizer memory scale with density and forward/backward run sparse kernels.
Topology changes then resize the values and remap the optimizer state incrementally.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from .errors import BidstError
from .sparse import SparseModule, SparseStructure, to_sparse_modules
from .sparse.modules import zero_padding

BACKENDS = ("masked", "sparse")


def supports(method: object, backend: str) -> bool:
    """Whether a DST method declares it works with `backend` (methods opt in to "sparse" via `backends`)."""
    return backend in getattr(method, "backends", ("masked",))


def check_method_backend(backend: str, method: object) -> None:
    """Raise BidstError unless `backend` is known and the method supports it (a recipe checks this before any work)."""
    if backend not in BACKENDS:
        raise BidstError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    name = getattr(method, "name", type(method).__name__)
    if backend != "masked" and not supports(method, backend):
        raise BidstError(f"method {name!r} does not support backend 'sparse' (it reads or writes dense weights); use 'masked'")


def check_backend(backend: str, method: object, model: nn.Module) -> None:
    """Raise BidstError unless `backend` is known, the method supports it and, for "sparse", the model is unwrapped."""
    check_method_backend(backend, method)
    if backend == "masked":
        return
    wrapper = next((m for m in _wrappers(model) if isinstance(m, _PARALLEL)), None)
    if wrapper is not None:
        raise BidstError(
            f"backend 'sparse' needs the model without its {type(wrapper).__name__} wrapper: a topology change resizes "
            "parameters, which the wrapper cannot follow, so under torchrun the Sparsifier averages gradients over ranks itself"
        )


_PARALLEL = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _inner(model: nn.Module) -> nn.Module | None:
    """The module a DDP/DataParallel or torch.compile wrapper holds, or None for any other module."""
    if isinstance(model, _PARALLEL):
        return cast(nn.Module, model.module)
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else None


def _wrappers(model: nn.Module) -> list[nn.Module]:
    """`model` and the modules it wraps, outermost first, down to the bare model."""
    chain = [model]
    while (inner := _inner(chain[-1])) is not None:
        chain.append(inner)
    return chain


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP/DataParallel and torch.compile wrappers (any nesting): layer names and the
    modules the backends swap do not depend on how a model is wrapped."""
    return _wrappers(model)[-1]


# optimizers whose state follows a weight's shape (Adafactor factors 2-D weights): the compact 1-D values would get
# other state than the dense weight
SHAPE_BOUND_OPTIMIZERS = tuple(getattr(torch.optim, n) for n in ("Adafactor",) if hasattr(torch.optim, n))


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise BidstError for an optimizer the sparse backend's compact values would train differently."""
    if isinstance(optimizer, SHAPE_BOUND_OPTIMIZERS):
        raise BidstError(f"backend 'sparse' cannot train with {type(optimizer).__name__}: its state depends on the "
                         "weight's shape; use backend 'masked'")


def check_layers(model: nn.Module, modules: dict[str, nn.Module], in_optimizer: set[int]) -> None:
    """Raise BidstError unless every module has a sparse twin: an exact nn.Linear or a zero-padded nn.Conv2d
    whose parameters no other module holds and carry no gradient hooks (a twin holds copies, so a tie or a hook
    would silently break) and whose trainable parameters are in the optimizer (`in_optimizer`: their ids; the
    twin's replace them there)."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, m in model.named_modules():
        for leaf, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((f"{path}.{leaf}" if path else leaf, m))
    for name, module in modules.items():
        layer = f"layer {name.rpartition('.')[0]!r}"
        if "." not in name:  # the sparse twin could not take the place of the model object the caller holds
            raise BidstError(f"backend 'sparse' cannot replace the model itself (a bare {type(module).__name__}); "
                             "wrap it, e.g. nn.Sequential(layer), or use backend 'masked'")
        if type(module) is nn.Conv2d:
            try:
                zero_padding(module)
            except ValueError as e:
                raise BidstError(f"backend 'sparse' cannot make {layer} sparse: {e} (keep it out with filter_fn, "
                                 "or use backend 'masked')") from None
        elif type(module) is not nn.Linear:
            raise BidstError(
                f"backend 'sparse' supports nn.Linear and zero-padded nn.Conv2d layers; {layer} is a "
                f"{type(module).__name__} (keep it out with filter_fn, or use backend 'masked')"
            )
        for leaf, p in module.named_parameters(recurse=False):
            others = [path for path, m in holders[id(p)] if m is not module]
            if others:
                raise BidstError(f"backend 'sparse' cannot keep {layer}'s parameters shared with {others[0]} (its "
                                 "sparse twin would hold a copy); use backend 'masked' or untie them")
            if p._backward_hooks or p._post_accumulate_grad_hooks:  # noqa: SLF001 (no public way to ask)
                raise BidstError(f"backend 'sparse' cannot carry the gradient hooks on {layer}'s {leaf} over to its "
                                 "sparse twin (a new parameter); register them after sparsify, or use backend 'masked'")
            if p.requires_grad and id(p) not in in_optimizer:
                raise BidstError(f"backend 'sparse' needs {layer}'s {leaf} in the optimizer given to sparsify (the "
                                 "sparse twin's copy replaces it there); add it to that optimizer, or use backend 'masked'")


def _replace_param(
    optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, gather: SparseStructure | None, new_name: str
) -> None:
    """Put `new` in `old`'s place in the optimizer's groups (renamed `new_name` where the optimizer was built
    from named parameters) and state, if it is there (a frozen bias may not be); per-weight state is gathered
    by `gather` if given."""
    for group in optimizer.param_groups:
        if "param_names" in group:
            group["param_names"] = [new_name if p is old else n for p, n in zip(group["params"], group["param_names"])]
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            k: gather.gather(v) if gather is not None and torch.is_tensor(v) and v.shape == old.shape else v
            for k, v in state.items()
        }


def swap_in(model: nn.Module, optimizer: torch.optim.Optimizer, masks: dict[str, Tensor]) -> dict[str, SparseModule]:
    """Swap the layers whose weights `masks` names for sparse twins, in place, and rewire the optimizer to their values and biases.

    The twins copy the bias into a new Parameter, so the optimizer's bias entry is replaced too.
    """
    old = {name: model.get_submodule(name.rpartition(".")[0]) for name in masks}
    layers = to_sparse_modules(model, masks)
    for name, layer in layers.items():
        path = name.rpartition(".")[0]
        _replace_param(optimizer, old[name].weight, layer.values, layer.structure, f"{path}.values")
        if layer.bias is not None:
            _replace_param(optimizer, old[name].bias, layer.bias, None, f"{path}.bias")
    return layers


def dense_grad(layer: SparseModule, scale: float) -> Tensor:
    """The dense weight gradient captured since `layer.request_sampled_grad(None)`, divided by the loss `scale`."""
    grad = layer.take_sampled_grad()
    shape = layer.structure.shape
    if grad is None:
        return torch.zeros(shape, dtype=layer.values.dtype, device=layer.values.device)
    grad = grad.detach().reshape(shape)
    return grad / scale if scale != 1.0 else grad
