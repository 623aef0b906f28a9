"""The Sparsifier: owns masks, budgets and the masking invariants; methods only choose positions."""

from __future__ import annotations

import operator
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import backend as backends
from . import distributed
from .density import check_sparsity, layer_budgets, layer_densities
from .errors import BidstError
from .methods.base import Method, create_method
from .sparse import SparseConv2d, SparseLinear, SparseStructure, remap_optimizer_state
from .sparse.modules import fresh_state

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, name: str) -> bool:
    """Sparsify the weights of every trainable Conv and Linear layer; a frozen one (requires_grad False) stays as it
    is. Transposed convolutions are left to `filter_fn` (BiDST and the sparse backend do not serve them).

    A weight computed from the layer's own weight_* parameters (the old torch.nn.utils.spectral_norm, before its
    first forward) trains if they do, so that it is refused rather than passed over as frozen."""
    del name
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return False
    sources = [p for n, p in module.named_parameters(recurse=False) if n.startswith("weight")]
    return module.weight.requires_grad or any(p.requires_grad for p in sources)


def _maskable(module: nn.Module, name: str, weight: nn.Parameter) -> bool:
    """Whether the weight of a module a filter selected gets a mask: not a 1-D one (a norm's gains, which a broad
    filter such as `n != "fc"` meets: they stay as they are); a sparse-gradient embedding is refused."""
    if getattr(module, "sparse", False) is True and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        raise BidstError(f"{name!r} is an embedding with sparse gradients (sparse=True), which bidst cannot mask: "
                         "build it with sparse=False, or keep it out of filter_fn")
    return isinstance(weight, nn.parameter.UninitializedParameter) or weight.dim() >= 2


def _warn_unmasked(module: nn.Module, name: str, fn: FilterFn) -> None:
    """Warn when a filter selects a module without a `weight` whose own trainable matrices (an LSTM's or LSTMCell's,
    attention's in_proj_weight) would stay dense while the run reports its sparsity: bidst masks `weight` only."""
    if isinstance(module, nn.utils.parametrize.ParametrizationList):  # (the weight it computes is its layer's)
        return
    matrices = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad and p.dim() >= 2]
    if not matrices:
        return
    try:
        selected = fn(module, name)
    except AttributeError:  # a filter written for layers with a weight (m.weight.dim() == 4): not meant for this one
        return
    if selected:
        warnings.warn(f"filter_fn selected {type(module).__name__} {name!r}, whose matrices "
                      f"({', '.join(matrices[:3])}) bidst does not mask: it masks a module's `weight` (Linear, Conv, "
                      "Embedding), so they stay dense", stacklevel=4)


@dataclass(frozen=True)
class LayerReport:
    """Target and actual density of one sparsified weight."""

    name: str
    shape: tuple[int, ...]
    numel: int
    target_density: float
    active: int

    @property
    def density(self) -> float:
        return self.active / self.numel

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density


# id of every parameter a live Sparsifier trains -> that Sparsifier: a model is sparsified once at a time
_OWNERS: weakref.WeakValueDictionary[int, Sparsifier] = weakref.WeakValueDictionary()


def _remove_hooks(handles: dict[int, torch.utils.hooks.RemovableHandle]) -> None:
    """Remove the gradient hooks a Sparsifier put on its weights."""
    for handle in handles.values():
        handle.remove()


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host synchronisation for all of them (one per
    tensor would stall a CUDA stream once per layer). Finite sums prove it in one pass (an inf or NaN entry makes
    its sum inf or NaN); only a non-finite sum, which finite entries can also give by overflowing, takes the exact
    elementwise check (four passes)."""
    tensors = list(tensors)
    if not tensors:
        return True
    sums = torch.stack([t.sum().float().to(tensors[0].device) for t in tensors])
    return bool(torch.isfinite(sums).all()) or all(bool(torch.isfinite(t).all()) for t in tensors)


class Sparsifier:
    """Keeps a model sparse during training; call `step()` in place of `optimizer.step()`.

    After every step the inactive weights are exactly zero, their optimizer state is zero, and
    each layer holds exactly its budget of active weights; the method decides topology changes.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        method: Method,
        *,
        sparsity: float,
        total_steps: int,
        distribution: str | None = None,
        steps_per_epoch: int | None = None,
        filter_fn: FilterFn | None = None,
        dense_first: bool = False,
        dense_last: bool = False,
        seed: int = 0,
        init_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        backend: str = "masked",
        holdout_batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        backends.check_backend(backend, method, model)
        if any(id(p) in _OWNERS for p in backends.unwrap(model).parameters()):
            raise BidstError("the model is already sparsified by another Sparsifier, which masks its weights too: "
                             "build the new one on a fresh model (or drop every reference to the old one first)")
        self.sparsity = check_sparsity(sparsity)
        total_steps, seed = _integer("total_steps", total_steps), _integer("seed", seed)
        if total_steps <= 0:
            raise BidstError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.model = model
        self.optimizer = optimizer
        self.method = method
        self.total_steps = total_steps
        if steps_per_epoch is not None:
            steps_per_epoch = _integer("steps_per_epoch", steps_per_epoch)
            if steps_per_epoch <= 0:
                raise BidstError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        self.steps_per_epoch = steps_per_epoch
        if getattr(method, "interval_unit", "steps") == "epochs" and not steps_per_epoch:  # say so before any change
            raise BidstError(f"method {method.name!r} counts its interval in epochs (interval_unit: epochs), which "
                             "needs steps_per_epoch: pass it to sparsify, or set interval_unit='steps'")
        self.distribution = distribution or method.default_distribution
        self.init_batch = init_batch
        # batch j of data the weights never train on, for an upper level posed on other data (BiDST's upper_data)
        self.holdout_batches = holdout_batches
        self.loss_fn = loss_fn or nn.functional.cross_entropy
        self.step_count = 0
        self.topology_changes = 0
        self._masks_before: dict[str, torch.Tensor] = {}  # the latest step's changed layers' masks before it
        self.captured_dense_grad = False  # whether the latest step captured dense gradients
        self.loss_scale = 1.0  # the GradScaler's scale of the latest step's backward (1: none), for captured gradients
        self.rng = torch.Generator().manual_seed(seed)
        self.costs: dict[str, float] = {}  # FLOPs of the methods' own work, by phase (2 per multiply-add)
        self.backend = backend
        self.sparse_layers: dict[str, backends.SparseModule] = {}  # the layers computing sparse (backend "sparse")
        self._topologies: dict[str, object] = {}  # each sparse layer's structure as this Sparsifier last set it
        self._rebuild_seconds = 0.0  # see rebuild_seconds
        self._rebuilt: dict[str, SparseStructure] = {}  # structures topology changes made, whose first use builds more
        self.clock: Callable[[], float] = time.perf_counter  # times the rebuilds (benchmarks use CPU time)
        self._dense_grad_requested = False  # sparse backend: the next backward captures dense gradients
        self._sampled_requested: dict[str, torch.Tensor] = {}  # positions whose gradient the next step reports
        self.sampled_grads: dict[str, torch.Tensor] = {}  # the last step's gradients at those positions
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (inputs, targets), if given
        # (step, backward count) of the gradients already averaged over ranks (sparse backend under DDP), and of
        # those prepare_gradients has made ready for the optimizer: a backward since then brings new gradients
        self._backwards = 0  # backward passes that reached a sparsified weight (counted by gradient hooks)
        self._counted: dict[int, torch.utils.hooks.RemovableHandle] = {}  # those hooks, by id of the tensor
        weakref.finalize(self, _remove_hooks, self._counted)
        self._synced_for = self._prepared_for = (0, 0)
        self._prepared: tuple[dict[str, torch.Tensor] | None, bool] = (None, True)  # its dense gradients, finite
        if backend == "sparse":  # no DDP wrapper here (see sync_gradients): start every rank from rank 0's state, as DDP does
            distributed.broadcast_state(model)

        self.params: dict[str, nn.Parameter] = {}
        self.modules: dict[str, nn.Module] = {}
        fn = filter_fn or default_filter
        for mod_name, module in backends.unwrap(model).named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                _warn_unmasked(module, mod_name, fn)
                continue
            if not fn(module, mod_name):
                continue
            if not isinstance(weight, nn.Parameter):
                raise BidstError(f"layer {mod_name!r} computes its weight (a parametrization such as weight_norm or "
                                 "spectral_norm), which bidst cannot mask: remove it, or keep the layer out with filter_fn")
            if not _maskable(module, mod_name, weight):
                continue
            # a weight tied between layers is one tensor with one mask, under the first layer's name
            if all(weight is not p for p in self.params.values()):
                name = f"{mod_name}.weight" if mod_name else "weight"
                self.params[name] = weight
                self.modules[name] = module
        if not self.params:
            if any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules()):
                raise BidstError("no layer to sparsify: the model's layers are already sparse-backend twins "
                                 "(a model is sparsified once; build a new Sparsifier on a fresh model)")
            raise BidstError("no layer to sparsify: the filter selected no weight (trainable Conv/Linear by default)")
        for name, weight in self.params.items():
            if isinstance(weight, nn.parameter.UninitializedParameter):
                raise BidstError(f"{name} is not initialized yet (a lazy layer): run one forward pass before sparsify")
            if weight.is_meta:
                raise BidstError(f"{name} is on the meta device: materialize the model (to_empty, then initialize) before sparsify")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise BidstError("LBFGS cannot be sparsified: its step needs a closure that re-evaluates the loss, and "
                             "Sparsifier.step() runs the optimizer's step without one")
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.params.items() if id(p) not in in_optimizer]
        if missing:
            raise BidstError(f"the optimizer does not hold the sparsified weights {missing[:3]}")

        names = list(self.params)
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(p.shape) for n, p in self.params.items()}
        self.dense_names: set[str] = set()
        if dense_first:
            self.dense_names.add(names[0])
        if dense_last:
            self.dense_names.add(names[-1])
        self.numel = {n: p.numel() for n, p in self.params.items()}
        self.target_densities = layer_densities(
            self.shapes,
            1.0 - self.sparsity,
            self.distribution,
            self.dense_names,
        )
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()
        }
        self.budgets: dict[str, int] = dict(self.numel)
        if backend == "sparse":  # before the masks touch the model, so a refusal leaves it as it was
            backends.check_optimizer(optimizer)
            backends.check_layers(backends.unwrap(model), {n: self.modules[n] for n in self._sparse_backend_names()}, in_optimizer)
        method.setup(self)
        schedule = getattr(method, "budget_changes", None)  # (returning None: the budgets do not change)
        # whether the method says its layer budgets change; if not, every step checks that they stay
        self._budgets_move = bool(getattr(method, "moves_budgets", False)) or (
            schedule is not None and schedule(self, self.total_steps) is not None)
        self.apply_masks()
        if backend == "sparse":
            self._swap_in()
        else:
            self._request_grads(self.step_count + 1)
        self.check_invariants()
        self.check_ranks_agree("after the initial masks")
        for param in backends.unwrap(model).parameters():
            _OWNERS[id(param)] = self
        self._count_backwards()

    def _count_backwards(self) -> None:
        """Count the backward passes that reach the sparsified weights, so that gradients prepared for a step that
        was then skipped (zero_grad and a new backward, no `step()`) are not taken for the new ones. Weights frozen
        now get their hook at a later call, once they train. The hooks hold the Sparsifier weakly and are removed
        with it (a later Sparsifier of the model starts clean)."""
        owner = weakref.ref(self)

        def counted(_: torch.Tensor) -> None:
            live = owner()
            if live is not None:
                live._backwards += 1

        for tensor in map(self.trainable, self.params):
            if tensor.requires_grad and id(tensor) not in self._counted:
                self._counted[id(tensor)] = tensor.register_post_accumulate_grad_hook(counted)

    def _sparse_backend_names(self) -> list[str]:
        """The layers the sparse backend swaps for twins: a layer at target density 1 computes faster dense,
        and a fixed-budget method never thins it."""
        return [n for n in self.params if n not in self.dense_names and self.target_densities[n] < 1.0]

    def _swap_in(self) -> None:
        """Replace the changeable layers by sparse twins, their weights in the optimizer by the compact values."""
        names = self._sparse_backend_names()
        self.sparse_layers = backends.swap_in(backends.unwrap(self.model), self.optimizer, {n: self.masks[n] for n in names})
        for name, layer in self.sparse_layers.items():
            self.params[name] = layer.values
            self.modules[name] = layer
        self._note_topologies()
        self._request_grads(self.step_count + 1)

    def _note_topologies(self) -> None:
        """Remember each sparse layer's structure, to notice one replaced behind the Sparsifier's back."""
        self._topologies = {name: layer.structure for name, layer in self.sparse_layers.items()}

    def _check_topologies(self) -> None:
        """Refuse to step sparse layers whose active positions something else set (model.load_state_dict alone)
        unless they equal the masks: the masks and the method's state would describe another topology."""
        for name, layer in self.sparse_layers.items():
            if layer.structure is self._topologies[name]:
                continue
            if not torch.equal(layer.mask().cpu(), self.masks[name].cpu()):
                raise BidstError(
                    f"the sparse layer {name.rpartition('.')[0]!r} got active positions other than this Sparsifier's "
                    "masks (a model state_dict loaded on its own): load the Sparsifier's state_dict from the same "
                    "checkpoint after the model's (sp.load_state_dict)"
                )
            self._topologies[name] = layer.structure

    def _request_grads(self, step: int) -> None:
        """Note what step `step`'s method needs from the coming backward.

        The gradient at the positions that an optional `method.sampled_positions(step, sp)` names (a
        sampled product, e.g. BiDST's candidates) comes back in `sampled_grads`: the sparse kernels
        compute it in the backward, the masked backend reads it off the dense `param.grad` that
        autograd computes anyway (or both read it off a dense gradient captured for the method).
        Sparse layers are also told whether to build the dense gradient (`wants_dense_grad`).
        """
        self._dense_grad_requested = bool(self.sparse_layers) and self.method.wants_dense_grad(step, self)
        wanted = getattr(self.method, "sampled_positions", None)
        positions = wanted(step, self) if wanted is not None else None
        self._sampled_requested = {n: p for n, p in (positions or {}).items() if n in self.params}
        self._arm_requests()

    def _arm_requests(self) -> None:
        """Tell the sparse layers what the coming backward passes must gather for this step (noted by _request_grads)."""
        for name, layer in self.sparse_layers.items():
            if self._dense_grad_requested:
                layer.request_sampled_grad(None)
            elif name in self._sampled_requested:
                layer.request_sampled_grad(self._sampled_requested[name])
            else:
                layer.take_sampled_grad()  # ends a request left from before

    def _take_sampled_grads(self, dense_grads: dict[str, torch.Tensor] | None, scale: float) -> None:
        """Fill `sampled_grads` with the gradient at the positions requested for this step (unscaled).

        Runs before inactive gradients are zeroed; a masked layer's `param.grad` is already unscaled.
        """
        self.sampled_grads = {}
        for name, positions in self._sampled_requested.items():
            if dense_grads is not None:
                self.sampled_grads[name] = dense_grads[name].reshape(-1)[positions.to(dense_grads[name].device)]
                continue
            if name not in self.sparse_layers:
                grad = self.params[name].grad
                flat = torch.zeros_like(self.params[name]).view(-1) if grad is None else grad.detach().reshape(-1)
                self.sampled_grads[name] = flat[positions.to(flat.device)]
                continue
            grad = self.sparse_layers[name].take_sampled_grad()
            values = self.sparse_layers[name].values
            if grad is None:
                grad = torch.zeros(positions.numel(), dtype=values.dtype, device=values.device)
            self.sampled_grads[name] = grad.detach() / scale if scale != 1.0 else grad.detach()

    def __repr__(self) -> str:
        return (f"Sparsifier(method={self.method.name!r}, sparsity={self.sparsity!r}, layers={len(self.params)}, "
                f"measured_sparsity={self.measured_sparsity():.4f}, step={self.step_count}/{self.total_steps}, "
                f"topology_changes={self.topology_changes}, backend={self.backend!r})")

    # -- helpers for methods -------------------------------------------------------------
    def sparse_names(self) -> list[str]:
        """Layers the method may change: all but those kept dense, and but those frozen since (requires_grad
        False: a frozen layer keeps its weights, so its topology stays as it is)."""
        return [n for n in self.params if n not in self.dense_names and self.trainable(n).requires_grad]

    def trainable(self, name: str) -> torch.Tensor:
        """The tensor the optimizer trains for weight `name`: the parameter, or its sparse twin's values."""
        layer = self.sparse_layers.get(name)
        return self.params[name] if layer is None else layer.values

    def target_budgets(self) -> dict[str, int]:
        """Final active counts per layer at the target densities."""
        return layer_budgets(self.numel, self.target_densities)

    def steps(self, value: float, unit: str) -> int:
        """An interval given in 'steps', 'epochs' or 'fraction' of training, in optimizer steps."""
        if unit == "steps":
            return int(value)
        if unit == "fraction":
            return max(1, int(round(value * self.total_steps)))
        if unit == "epochs":
            if not self.steps_per_epoch:
                raise BidstError("an interval in epochs needs steps_per_epoch (pass it to sparsify)")
            return max(1, int(round(value * self.steps_per_epoch)))
        raise BidstError(f"unknown interval unit {unit!r}; known: steps, epochs, fraction")

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace the masks wholesale (initialisation only) and set budgets from them."""
        for name, mask in masks.items():
            self.masks[name].copy_(mask.to(self.masks[name].device).view_as(self.masks[name]))
            self.budgets[name] = int(self.masks[name].sum())

    def random_masks(self, budgets: dict[str, int] | None = None) -> None:
        """Uniformly random masks holding `budgets` (default: the target budgets) active weights."""
        budgets = budgets or self.target_budgets()
        masks = {}
        for name in self.params:
            flat = torch.zeros(self.numel[name], dtype=torch.bool)
            flat[torch.randperm(self.numel[name], generator=self.rng)[: budgets[name]]] = True
            masks[name] = flat
        self.set_masks(masks)

    def _known(self, name: str) -> None:
        """Raise KeyError, listing the sparsified weights, unless `name` is one of them."""
        if name not in self.masks:
            raise KeyError(f"no sparsified weight {name!r}; the sparsified weights are {', '.join(self.masks)}")

    def weight(self, name: str) -> torch.Tensor:
        """The dense weight of layer `name` (detached, zero where inactive), what magnitude-based drops score.

        Under the sparse backend it is built from the compact values on every call: call it at update steps only.
        """
        self._known(name)
        layer = self.sparse_layers.get(name)
        return self.params[name].detach() if layer is None else layer.dense_weight()

    def active_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions ascending, detached values) of layer `name`'s active weights.

        Under the sparse backend these are the layer's own index array and compact values, so a
        selection among the active weights costs O(active) instead of a pass over the dense weight.
        """
        self._known(name)
        layer = self.sparse_layers.get(name)
        if layer is not None:
            return torch.from_numpy(layer.structure.flat).to(layer.values.device), layer.values.detach()
        positions = self.masks[name].view(-1).nonzero().squeeze(1)
        return positions, self.params[name].detach().view(-1)[positions]

    def grad(self, name: str) -> torch.Tensor | None:
        """The dense gradient of layer `name`'s active weights (zero elsewhere) from the last backward, or None."""
        self._known(name)
        layer = self.sparse_layers.get(name)
        grad = self.params[name].grad
        if grad is None:
            return None
        return grad.detach() * self.masks[name] if layer is None else layer.structure.to_dense(grad.detach())

    @property
    def last_swaps(self) -> dict[str, int]:
        """Positions that became active in the latest step, per changed layer: a weight dropped and grown again in
        the same step (GraNet prunes, then regrows among all inactive positions) is no swap."""
        return {n: int((self.masks[n].view(-1) & ~before).count_nonzero()) for n, before in self._masks_before.items()}

    def add_cost(self, phase: str, flops: float) -> None:
        """Record `flops` of a method's own work (e.g. 'mask_learning', 'dense_grad') under `phase`."""
        self.costs[phase] = self.costs.get(phase, 0.0) + float(flops)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average `tensor` over DDP ranks in place (a no-op in a single process), so decisions agree."""
        return distributed.all_reduce_mean(tensor)

    def check_ranks_agree(self, when: str) -> None:
        """Under DDP, raise on every rank unless all ranks hold the same masks and mask generator state."""
        distributed.check_in_sync({**self.masks, "the mask generator": self.rng.get_state()}, when)

    @torch.no_grad()
    def change(
        self,
        name: str,
        drop: torch.Tensor,
        grow: torch.Tensor,
        grow_values: torch.Tensor | None = None,
    ) -> None:
        """Deactivate flat positions `drop`, activate `grow`; clear their weights and optimizer state.

        Dropping an inactive position or growing an active one is a bug in the method and raises.
        New weights start at zero unless `grow_values` is given, their optimizer state as a fresh weight's
        (`fresh_state`: zero but for Rprop's step size and Adagrad's initial accumulator).
        """
        self._known(name)
        mask = self.masks[name].view(-1)
        drop = drop.to(mask.device, torch.long)
        grow = grow.to(mask.device, torch.long)
        if drop.numel() and not bool(mask[drop].all()):
            raise RuntimeError(f"{name}: drop picked an inactive position")
        if grow.numel() and bool(mask[grow].any()):
            raise RuntimeError(f"{name}: growth picked an active position")
        if torch.unique(torch.cat([drop, grow])).numel() != drop.numel() + grow.numel():
            raise RuntimeError(f"{name}: repeated positions in a topology change")
        self._masks_before.setdefault(name, mask.clone())
        mask[drop] = False
        mask[grow] = True
        self.budgets[name] += grow.numel() - drop.numel()
        layer = self.sparse_layers.get(name)
        if layer is not None:
            started = self.clock()
            delta = layer.update_topology(drop, grow, 0.0 if grow_values is None else grow_values)
            self._topologies[name] = layer.structure
            remap_optimizer_state(self.optimizer, layer.values, delta)
            self._rebuild_seconds += self.clock() - started
            replaced = self._rebuilt.pop(name, None)
            if replaced is not None:
                self._rebuild_seconds += replaced.build_seconds
            self._rebuilt[name] = layer.structure
            return
        weight = self.params[name].data.view(-1)
        weight[drop] = 0.0
        weight[grow] = 0.0 if grow_values is None else grow_values.to(weight)
        param = self.params[name]
        for key, value in self.optimizer.state.get(param, {}).items():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.view(-1)[drop] = 0
                value.view(-1)[grow] = fresh_state(self.optimizer, param, key)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every inactive weight and its optimizer state (sparse layers hold no inactive weight)."""
        for name, param in self.params.items():
            if name in self.sparse_layers:
                continue
            mask = self.masks[name]
            param.data.mul_(mask)
            for value in self.optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.mul_(mask)

    def _check_kept_budgets(self, before: dict[str, int]) -> None:
        """Raise if a method that does not say its budgets move (`moves_budgets`, `budget_changes`) changed one by
        dropping more or fewer weights than it grew: the sparsity it reports, FLOPs plans and match_flops assume not."""
        for name, budget in before.items():
            if self.budgets[name] != budget:
                raise RuntimeError(
                    f"{name}: method {self.method.name!r} changed the layer's budget from {budget} to "
                    f"{self.budgets[name]} active weights: grow as many as it drops, or declare moving budgets "
                    "(moves_budgets = True, or budget_changes)")

    def check_invariants(self) -> None:
        """Raise if a layer's active count differs from its budget (a bug, never user error)."""
        for name, mask in self.masks.items():
            active = int(torch.count_nonzero(mask))  # no int64 conversion, as a bool sum makes
            if active != self.budgets[name]:
                raise RuntimeError(f"{name}: {active} active weights, budget {self.budgets[name]}")
            layer = self.sparse_layers.get(name)
            if layer is not None and (layer.structure.nnz != active or layer.values.numel() != active):
                raise RuntimeError(f"{name}: sparse layer holds {layer.structure.nnz} weights, mask {active}")

    # -- the training-loop API -----------------------------------------------------------
    def sync_gradients(self) -> None:
        """Average this step's gradients over DDP ranks (sparse backend; a no-op otherwise or when done already).

        The sparse backend trains the model without a DDP wrapper, because a topology change resizes
        the layers' parameters, which DDP cannot follow; this all-reduce does what DDP's would, for
        every parameter gradient and the gradients captured for the method (dense or at sampled
        positions). `prepare_gradients()` calls it.
        """
        step = self.step_count + 1
        if self.backend != "sparse" or self._synced_for == (step, self._backwards) or distributed.world_size() == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        requested = [layer for layer in self.sparse_layers.values()
                     if layer.structure.samples_all or layer.structure.sampled_positions is not None]
        # as DDP's find_unused_parameters: a gradient some rank lacks (its forward skipped the layer) counts as
        # zero there, one no rank has stays None, so every rank all-reduces the same tensors
        used = distributed.all_reduce_sum(torch.tensor(
            [p.grad is not None for p in params] + [layer.structure.sampled_grad is not None for layer in requested],
            dtype=torch.float32, device=distributed.collective_device()))
        for p, anywhere in zip(params, used[: len(params)].tolist()):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
        for layer, anywhere in zip(requested, used[len(params):].tolist()):
            s = layer.structure
            if anywhere and s.sampled_grad is None:
                size = s.numel if s.samples_all else s.sampled_positions.size
                s.sampled_grad = torch.zeros(size, dtype=layer.values.dtype, device=layer.values.device)
        grads = [p.grad for p in params if p.grad is not None]
        captured = [layer.structure.sampled_grad for layer in requested if layer.structure.sampled_grad is not None]
        distributed.all_reduce_mean_many(grads + captured)
        self._synced_for = (step, self._backwards)

    def prepare_gradients(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Make every `param.grad` the gradient the optimizer step will apply; `step()` calls it once per step.

        Averages over DDP ranks (sparse backend, `sync_gradients`), unscales with `scaler`, keeps
        what the method needs from this backward (dense gradients, gradients at sampled positions),
        then zeroes the inactive weights' gradients. Call it yourself, with the same scaler as
        `step()`, before anything that reads the gradients, such as clipping: then both backends
        clip the same gradient (a masked layer's dense gradient would count inactive weights).
        A step prepared and then skipped (zero_grad and a new backward, no `step()`: a non-finite clipped norm,
        say) leaves nothing behind: the next call prepares the new gradients (with a GradScaler, call
        `scaler.update()` when skipping, as PyTorch requires after `unscale_`). Under gradient accumulation call it
        after the last micro-batch's backward: it zeroes the inactive gradients that later ones would add to.
        """
        exported = [n for n, layer in self.sparse_layers.items() if layer.exported]
        if exported:
            raise BidstError(f"the model's sparse layers ({exported[0]}, ...) were swapped back to dense ones by "
                             "to_dense_modules, so this Sparsifier no longer trains them; to keep training, export "
                             "a copy: exported = copy.deepcopy(model); to_dense_modules(exported)")
        self._check_topologies()
        self._count_backwards()  # a weight unfrozen since gets its hook
        step = self.step_count + 1
        if self._prepared_for == (step, self._backwards):  # prepared, and no backward since (a skipped step's has one)
            return
        check_scaling = getattr(self.method, "check_loss_scaling", None)
        if scaler is not None and scaler.is_enabled() and check_scaling is not None:
            check_scaling()
        self.sync_gradients()
        if scaler is not None:
            try:
                scaler.unscale_(self.optimizer)
            except RuntimeError as error:
                if "already been called" not in str(error):
                    raise
                raise BidstError("the scaler already unscaled this step's gradients: bidst unscales them itself, so "
                                 "call sparsifier.prepare_gradients(scaler) in place of scaler.unscale_(optimizer), "
                                 "and after a step you skip call scaler.update()") from None
        dense_grads: dict[str, torch.Tensor] | None = None
        scale = self.loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        wants = self._dense_grad_requested if self.sparse_layers else self.method.wants_dense_grad(step, self)
        if wants:
            dense_grads = {}
            for name, param in self.params.items():
                layer = self.sparse_layers.get(name)
                if layer is not None:
                    dense_grads[name] = backends.dense_grad(layer, scale)
                else:
                    grad = param.grad if param.grad is not None else torch.zeros_like(param)
                    dense_grads[name] = grad.detach().clone()
        self._take_sampled_grads(dense_grads, scale)
        self._arm_requests()  # again, for a backward that replaces these gradients before step() (a skipped step)
        # the method learns from this step only if they are all finite
        finite = all_finite([*(dense_grads or {}).values(), *self.sampled_grads.values()])
        with torch.no_grad():
            for name, param in self.params.items():
                if param.grad is not None and name not in self.sparse_layers:
                    param.grad.mul_(self.masks[name])
        self._prepared_for, self._prepared = (step, self._backwards), (dense_grads, finite)

    def step(
        self, scaler: torch.amp.GradScaler | None = None, batch: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> bool:
        """Optimizer step plus the method's work; returns True if the topology changed.

        `batch` (inputs, targets) is kept as `self.batch` for methods that take extra passes on it
        (BiDST's unrolled hypergradient); the others ignore it.

        With a GradScaler, `scaler.step(optimizer)` and `scaler.update()` are called here: do not call update again.

        Gradients of inactive weights are zeroed before the optimizer sees them (`prepare_gradients`),
        so momentum and Adam moments never accumulate there; weights are re-masked afterwards so no
        optimizer feature (weight decay, AdamW's decoupled decay) can revive an inactive weight.
        Sparse layers have no inactive weights; their dense gradients, when the method wants them,
        were requested before the backward (at the end of the previous step). Under DDP with the
        sparse backend the gradients are averaged over ranks first (`sync_gradients`).
        """
        step = self.step_count + 1
        self.batch = batch
        self.prepare_gradients(scaler)
        (dense_grads, finite), self._prepared = self._prepared, (None, True)
        if scaler is not None:
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(self.optimizer)
            scaler.update()
            # the scaler skipped the optimizer step (inf/NaN gradients) exactly when it backed its scale off
            finite = finite and not (scaler.is_enabled() and scaler.get_scale() < scale)
        else:
            self.optimizer.step()
        self.apply_masks()
        self.step_count = step
        self._masks_before = {}
        self.captured_dense_grad = dense_grads is not None
        changed = False
        if finite:
            before = None if self._budgets_move else dict(self.budgets)
            changed = bool(self.method.update(self, step, dense_grads))
            if before is not None:
                self._check_kept_budgets(before)
        if changed:
            self.topology_changes += 1
            self.check_invariants()
            self.check_ranks_agree(f"after the topology change at step {step}")
        self._request_grads(step + 1)
        return changed

    # -- inspection ---------------------------------------------------------------------
    def report(self) -> list[LayerReport]:
        """Per-layer target density and actual active count."""
        return [
            LayerReport(n, self.shapes[n], self.numel[n], self.target_densities[n], int(self.masks[n].sum()))
            for n in self.params
        ]

    @property
    def rebuild_seconds(self) -> float:
        """Seconds spent rebuilding sparse layers and optimizer state at topology changes (the Sparsifier's clock),
        and building the new structures' input-channel index and kernel orderings on their first use (wall time)."""
        return self._rebuild_seconds + sum(s.build_seconds for s in self._rebuilt.values())

    def measured_sparsity(self) -> float:
        """Fraction of zero entries over all sparsified weights, read off the weights' masks."""
        total = sum(self.numel.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Method, sparsity, distribution, masks, budgets, step, counters, the mask RNG and the method state (tensors,
        numbers and strings only)."""
        return {
            "method": self.method.name,
            "sparsity": self.sparsity,
            "distribution": self.distribution,
            "step": self.step_count,
            "topology_changes": self.topology_changes,
            "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()},
            "budgets": dict(self.budgets),
            "target_densities": dict(self.target_densities),  # pruning at init derives them from its scoring batch
            "rng": self.rng.get_state(),
            "costs": dict(self.costs),
            "rebuild_seconds": self.rebuild_seconds,  # measured, so a resumed run reports the whole run's
            "method_state": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; a state from another method or model is refused with a clear error."""
        if state.get("method") != self.method.name:
            raise BidstError(f"checkpoint is for method {state.get('method')!r}, not {self.method.name!r}")
        for key in ("sparsity", "distribution"):  # absent from older states
            if key in state and state[key] != getattr(self, key):
                raise BidstError(f"checkpoint is for {key} {state[key]!r}, not {getattr(self, key)!r}")
        missing = [k for k in ("masks", "budgets", "step", "topology_changes", "rng", "method_state") if k not in state]
        if missing:
            raise BidstError(f"not a Sparsifier state_dict: it lacks {', '.join(missing)}")
        masks = state["masks"]
        if set(masks) != set(self.masks):
            extra, missing = sorted(set(masks) - set(self.masks)), sorted(set(self.masks) - set(masks))
            raise BidstError(f"checkpoint masks do not match this model (unexpected {extra[:3]}, missing {missing[:3]})")
        for name, mask in masks.items():
            if tuple(mask.shape) != tuple(self.masks[name].shape):
                raise BidstError(
                    f"checkpoint mask {name} has shape {tuple(mask.shape)}, the model's weight {tuple(self.masks[name].shape)}"
                )
        for name, layer in self.sparse_layers.items():
            if not torch.equal(layer.mask().cpu(), masks[name].cpu()):
                raise BidstError(f"checkpoint mask {name} differs from the sparse layer's topology: load the model's state_dict first")
        for name, mask in masks.items():
            self.masks[name].copy_(mask)
        self.budgets = {n: int(v) for n, v in state["budgets"].items()}
        if set(state.get("target_densities", {})) == set(self.masks):  # absent from older states
            self.target_densities = {n: float(v) for n, v in state["target_densities"].items()}
        self.step_count = int(state["step"])
        self.topology_changes = int(state["topology_changes"])
        # a rollback inside the process: the next step's gradients are new ones, to average and prepare again
        self._synced_for = self._prepared_for = (0, 0)
        self._prepared = (None, True)
        self.rng.set_state(state["rng"])
        self.costs = {k: float(v) for k, v in state.get("costs", {}).items()}
        self._rebuild_seconds, self._rebuilt = float(state.get("rebuild_seconds", 0.0)), {}
        self.method.load_state_dict(state["method_state"])
        self._note_topologies()
        self.apply_masks()
        self.check_invariants()
        loaded = getattr(self.method, "loaded", None)
        if loaded is not None:
            loaded(self)
        self._request_grads(self.step_count + 1)


def _integer(key: str, value: object) -> int:
    """`value` as an int (NumPy integers included; bools and floats refused), or a BidstError naming `key`."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise BidstError(f"{key} must be an integer, got {value!r}")


def sparsify(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: str = "rigl",
    sparsity: float = 0.9,
    *,
    total_steps: int,
    distribution: str | None = None,
    steps_per_epoch: int | None = None,
    filter_fn: FilterFn | None = None,
    dense_first: bool = False,
    dense_last: bool = False,
    seed: int = 0,
    init_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    backend: str = "masked",
    holdout_batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    **method_options: Any,
) -> Sparsifier:
    """Make `model` sparse with DST `method`; call the returned object's `step()` instead of `optimizer.step()`.

    `method_options` are the method's own options (see `bidst.method_options(name)`). `backend`
    "masked" keeps dense weights times masks; "sparse" swaps the layers for `bidst.sparse` ones
    in place and puts their compact values into `optimizer` in place of the dense weights, so
    build the optimizer before calling this, as usual, and any later one from `model.parameters()`.
    `holdout_batches(j)` returns the j-th (inputs, targets) batch of data kept out of training, for
    a method whose upper level learns on it (BiDST with `upper_data="holdout"`).
    """
    if method == "dense":
        sparsity = 0.0
    return Sparsifier(
        model,
        optimizer,
        create_method(method, **method_options),
        sparsity=sparsity,
        total_steps=total_steps,
        distribution=distribution,
        steps_per_epoch=steps_per_epoch,
        filter_fn=filter_fn,
        dense_first=dense_first,
        dense_last=dense_last,
        seed=seed,
        init_batch=init_batch,
        loss_fn=loss_fn,
        backend=backend,
        holdout_batches=holdout_batches,
    )

