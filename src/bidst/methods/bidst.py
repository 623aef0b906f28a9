"""BiDST: the mask is optimized (a bi-level problem) rather than picked by a heuristic; see docs/bidst.md.

Each sparse layer keeps a candidate set C = A ∪ E (its active weights and ⌈ρ·k⌉ inactive
exploration positions) with learned mask scores ψ and, for E, shadow weights that live in the
method (the model's inactive weights stay exactly zero). Every learning step the scores follow the
gradient of the loss through a Gumbel-sigmoid relaxation of the mask, computed from the layer
inputs and output gradients of the ordinary backward pass: the actives' gradient is the weight
gradient the backward already produced, the candidates' a sampled product (SDDMM) at E only.
Every `mask_interval` steps a flag decides whether each layer's top-k topology is committed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from .. import distributed
from ..backend import unwrap
from ..errors import BidstError, SharedError
from ..sampled import batched, output_row_norms, output_rows, rows_counted, sampled_weight_grad
from ..schedules import cosine_decay, is_update_step
from ..scores import grow_highest, random_scores
from ..sparse import grad_cleared
from .base import METHODS, require_choice, require_range

if TYPE_CHECKING:
    from ..engine import Sparsifier

SCORE_FLOPS = 16  # per candidate and learning step: noise, sigmoid, score gradient, optimizer update
UNROLLED_PASSES = 3  # one pass at the virtual step, two for the finite-difference Hessian-vector product
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
HYPERGRADIENTS = ("first_order", "implicit_diag", "unrolled", "second_order_diag")
LAYER_KEYS = ("pos", "psi", "shadow", "m1", "m2", "sq")  # per-layer state, aligned over the candidate set
CONSISTENCY_FLOPS = 3  # per candidate and learning step: square the shadow step, accumulate


def pass_flops(actives: int, candidates: int, rows: int) -> float:
    """FLOPs of one extra pass over a layer (unrolled, held-out): forward and input gradient through its
    `actives` weights, and the sampled products at its `candidates` positions, over `rows` output rows."""
    return (4.0 * actives + 2.0 * candidates) * rows


LAYER_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the layers whose scores bidst learns


def over_ranks(flops: float) -> float:
    """FLOPs each rank spends on its own share of a batch, summed over the DDP ranks (equal shares): every rank
    records the run's total, as the recipe counts the forward and backward of the global batch."""
    return flops * distributed.world_size()


def other_layers(sp: Sparsifier, names: list[str]) -> dict[str, nn.Module]:
    """The model's Conv/Linear layers outside `names` (the layers whose scores learn), by weight name: an extra
    pass runs through them too (layers kept dense, never sparsified, or without candidates)."""
    from ..budget import model_layers  # budget imports the method registry: import at call time

    learning = set(names)
    return {n: m for n, m in model_layers(sp.model).items() if n not in learning}


def other_pass_flops(sp: Sparsifier, layers: dict[str, nn.Module], rows: dict[str, int]) -> float:
    """FLOPs of one extra pass (forward and input gradient) through `layers` (active weights: the layer's budget
    where the sparsifier holds one, else all) with these output rows."""
    missing = sorted(set(layers) - set(rows))
    if missing:
        raise BidstError(f"the cost plan needs the output rows of every Conv/Linear layer (bidst.budget.model_rows); "
                         f"missing: {', '.join(missing)}")
    return sum(pass_flops(sp.budgets[n] if n in sp.budgets else m.weight.numel(), 0, rows[n]) for n, m in layers.items())


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put the model's buffers (batch-norm statistics) back as they were after the extra passes inside."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(model.buffers(), saved):
                buf.copy_(value)


class _LayerHook:
    """A forward hook of BiDST's on a model layer. A copy of the model (deepcopy, or pickled as by torch.save(model))
    gets an inert one, which removes itself at the copy's first forward: the copy is not the model its Sparsifier
    trains, so its forwards must not reach that Sparsifier's records (and a local function could not be pickled)."""

    def __init__(self, hook: Any = None) -> None:
        self.hook = hook

    @torch.compiler.disable  # under torch.compile: run eagerly, instead of recompiling the model at every step
    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.hook is not None:
            self.hook(module, inputs, output)
            return
        for key in [k for k, hook in module._forward_hooks.items() if hook is self]:  # noqa: SLF001 (no public way)
            del module._forward_hooks[key]  # noqa: SLF001  (the forward iterates over a copy of the hooks)

    def __deepcopy__(self, memo: dict[int, Any]) -> _LayerHook:
        return _LayerHook()

    def __reduce__(self) -> tuple[type[_LayerHook], tuple[()]]:
        return (_LayerHook, ())


@METHODS.register("bidst")
@dataclass
class BiDST:
    """Bi-level DST: mask scores on a candidate set, learned by a first-order hypergradient at sparse cost.

    Topology changes follow RigL's volume (α·k swaps, α cosine-decayed) between learned rankings;
    a layer commits only when it would swap at least `min_swap_fraction` of its actives.
    """

    name: ClassVar[str] = "bidst"
    default_distribution: ClassVar[str] = "erk"
    backends: ClassVar[tuple[str, ...]] = ("masked", "sparse")  # candidates' gradients via sampled_positions
    explore_ratio: float = 1.0  # ρ: ⌈ρ·k⌉ inactive exploration candidates per layer
    explore: str = "gradient"  # refill E at a commit by dense-gradient magnitude (counted) or "random"
    tau_start: float = 1.0  # temperature of the Gumbel-sigmoid relaxation at the start ...
    tau_end: float = 1.0  # ... annealed geometrically to this at stop_fraction (0.1 was no better on val)
    mask_optimizer: str = "adam"  # scores' optimizer: adam | sgd | layer_sgd (SGD, gradient / its layer RMS)
    mask_lr: float = 0.05  # learning rate of the scores; 0 is the control (scores stay 0)
    shadow_decay: float = 5e-4  # β: the sparse regularizer on the shadow (candidate) weights
    mask_interval: int = 100  # steps between checks of the topology flag (RigL's ΔT)
    min_swap_fraction: float = 0.01  # a layer commits only if it swaps at least this share of its actives
    swap: str = "forced"  # forced: exactly α·k swaps; capped: at most α·k, where a candidate outranks an active
    drop_fraction: float = 0.7  # α at step 0, cosine-decayed to 0 at stop_fraction (0.3 was worse on the MLP's val, better on ResNet-20's)
    stop_fraction: float = 0.75  # no mask learning nor topology change after this share of training
    grow_init: str = "zero"  # new active weights start at zero or at their shadow value ("shadow")
    rank: str = "psi_plus_log_magnitude"  # ranking for the hard top-k: psi | psi_plus_log_magnitude
    hypergradient: str = "first_order"  # first_order | implicit_diag | unrolled | second_order_diag
    implicit_coef: float = 0.0  # 1/λ of implicit_diag; 0: 1 / the optimizer's weight decay
    unroll_eps: float = 0.01  # unrolled: finite-difference step, divided by the vector's norm (DARTS)
    learn_every: int = 10  # learn scores and shadow weights every this many steps (mask-learning cost / n)
    mask_rows: float = 1.0  # share of the output rows (batch × positions) the sampled gradient at E sums over
    row_sampling: str = "uniform"  # how those rows are drawn: uniform (without replacement) | grad_norm (∝ |dL/dy_r|)
    explore_refresh: float = 0.0  # at a commit, also replace this share of the non-grown E (lowest-ranked) by fresh picks
    check_grad: bool = False  # the dense gradient of step 1 and the checks also steps the shadow weights at E (exact)
    consistency: float = 0.0  # γ: candidates rank by ψ + log|θ_E| + γ·log(|Σ steps| / √Σ steps²) (sign consistency)
    scores_decide: str = "both"  # which swaps the learned ranking picks: both | grow | drop (the other side ranks without ψ)
    allocate: str = "layer"  # grows per layer: layer (as many as it drops) | scores (the commit's grows go to the top ψ of all layers)
    upper_data: str = "train"  # the scores' gradient from the step's training batch, or "holdout": held-out batches (masked)
    _layers: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _learn_steps: int = field(default=0, init=False, repr=False)
    _swaps: int = field(default=0, init=False, repr=False)  # committed drops + grows
    _set_by_scores: int = field(default=0, init=False, repr=False)  # of those, the ones the ranking without ψ would not make
    _moved: int = field(default=0, init=False, repr=False)  # grows placed beyond their layer's drops (allocate: scores)
    _holdout_draws: int = field(default=0, init=False, repr=False)  # held-out batches used so far (upper_data: holdout)
    _holdout_rows: dict[str, int] | None = field(default=None, init=False, repr=False)  # per layer, for the cost plan
    _captures: dict[str, list[list[Any]]] = field(default_factory=dict, init=False, repr=False)
    _hooks: list[Any] = field(default_factory=list, init=False, repr=False)
    _extra_pass: bool = field(default=False, init=False, repr=False)
    _forward: dict[str, tuple[int, int, torch.Tensor]] = field(  # per layer on learning steps: (rows, batch, θ over C)
        default_factory=dict, init=False, repr=False)
    _records_step: int = field(default=0, init=False, repr=False)  # the step whose forwards _captures/_forward hold

    def validate(self) -> None:
        """Check every option's range and choices."""
        require_range(self.name, "explore_ratio", self.explore_ratio, 0.0, float("inf"))
        require_choice(self.name, "explore", self.explore, ("gradient", "random"))
        require_range(self.name, "tau_start", self.tau_start, 1e-6, float("inf"))
        require_range(self.name, "tau_end", self.tau_end, 1e-6, float("inf"))
        require_choice(self.name, "mask_optimizer", self.mask_optimizer, ("adam", "sgd", "layer_sgd"))
        require_range(self.name, "mask_lr", self.mask_lr, 0.0, float("inf"))
        require_range(self.name, "shadow_decay", self.shadow_decay, 0.0, float("inf"))
        require_range(self.name, "mask_interval", self.mask_interval, 1, float("inf"))
        require_range(self.name, "min_swap_fraction", self.min_swap_fraction, 0.0, 1.0)
        require_choice(self.name, "swap", self.swap, ("forced", "capped"))
        require_range(self.name, "drop_fraction", self.drop_fraction, 0.0, 1.0)
        require_range(self.name, "stop_fraction", self.stop_fraction, 0.0, 1.0)
        require_choice(self.name, "grow_init", self.grow_init, ("zero", "shadow"))
        require_choice(self.name, "rank", self.rank, ("psi", "psi_plus_log_magnitude"))
        require_choice(self.name, "hypergradient", self.hypergradient, HYPERGRADIENTS)
        require_range(self.name, "implicit_coef", self.implicit_coef, 0.0, float("inf"))
        require_range(self.name, "unroll_eps", self.unroll_eps, 0, float("inf"), above_lo=True)
        require_range(self.name, "learn_every", self.learn_every, 1, float("inf"))
        require_range(self.name, "mask_rows", self.mask_rows, 0, 1.0, above_lo=True)
        require_choice(self.name, "row_sampling", self.row_sampling, ("uniform", "grad_norm"))
        require_range(self.name, "explore_refresh", self.explore_refresh, 0.0, 1.0)
        require_range(self.name, "consistency", self.consistency, 0.0, float("inf"))
        require_choice(self.name, "scores_decide", self.scores_decide, ("both", "grow", "drop"))
        require_choice(self.name, "allocate", self.allocate, ("layer", "scores"))
        require_choice(self.name, "upper_data", self.upper_data, ("train", "holdout"))
        if self.upper_data == "holdout" and self.hypergradient == "unrolled":
            raise BidstError("option 'upper_data: holdout' of method 'bidst' takes the first-order family of "
                             "hypergradients, not 'unrolled'")
        if self.allocate == "scores" and self.swap != "forced":
            raise BidstError("option 'allocate: scores' of method 'bidst' needs swap 'forced' (a fixed number of drops)")
        if not isinstance(self.check_grad, bool):
            raise BidstError("option 'check_grad' of method 'bidst' must be true or false")
        if not isinstance(self.mask_interval, int) or not isinstance(self.learn_every, int):
            raise BidstError("options 'mask_interval' and 'learn_every' of method 'bidst' must be integers")

    # -- schedule ----------------------------------------------------------------------
    def stop_step(self, sp: Sparsifier) -> int:
        """The last step with mask learning or a topology check."""
        return int(self.stop_fraction * sp.total_steps)

    def learns(self, step: int, sp: Sparsifier) -> bool:
        """Whether step `step` updates the scores and shadow weights (so its backward pass is captured)."""
        return step <= self.stop_step(sp) and step % self.learn_every == 0

    def is_check(self, step: int, sp: Sparsifier) -> bool:
        """Whether the topology flag is checked after step `step`."""
        return is_update_step(step, self.mask_interval, self.stop_step(sp))

    def temperature(self, step: int, sp: Sparsifier) -> float:
        """τ annealed geometrically from tau_start to tau_end over the learning phase."""
        progress = min(1.0, step / max(1, self.stop_step(sp)))
        return self.tau_start * (self.tau_end / self.tau_start) ** progress

    def captures(self) -> bool:
        """Whether the learning steps need the layers' inputs and output gradients (unrolled passes, row
        subsampling), which the masked backend captures; otherwise the engine serves the candidates'
        gradients (`sampled_positions`): the sparse kernels sample them, the masked backend reads them
        off the dense gradient autograd computes anyway, with no host synchronisation per product."""
        return self.hypergradient == "unrolled" or self.mask_rows < 1.0 or self.upper_data == "holdout"

    def sub_rows(self, rows: int) -> int:
        """Rows the sampled gradient at E sums over, out of `rows`: round(mask_rows·rows), at least 1."""
        return rows if self.mask_rows >= 1.0 else min(rows, max(1, round(self.mask_rows * rows)))

    @property
    def moves_budgets(self) -> bool:
        """Whether layer budgets move during training (a layer at density 1 may not stay there)."""
        return self.allocate == "scores"

    def explore_size(self, sp: Sparsifier, name: str, k: int | None = None) -> int:
        """|E| of a layer with k (default: its budget) active weights: ⌈ρ·k⌉, at most the inactive positions."""
        k = sp.budgets[name] if k is None else k
        return min(math.ceil(round(self.explore_ratio * k, 9)), sp.numel[name] - k)  # 0.55·100 is 55.00000000000001

    # -- the Method protocol -----------------------------------------------------------
    def setup(self, sp: Sparsifier) -> None:
        """Random ERK masks, random initial exploration sets, zero scores; hooks on every sparse layer."""
        self.check_setting(sp.backend, sp.holdout_batches is not None)
        sp.random_masks()
        # the hooks go with the Sparsifier, so a model whose Sparsifier was dropped can be sparsified again
        weakref.finalize(sp, self.remove_hooks)
        for name in sp.sparse_names():
            module = sp.modules[name]
            if not isinstance(module, LAYER_KINDS):
                kind = type(module).__name__
                raise BidstError(f"bidst learns masks of Linear, Conv1d and Conv2d layers; {name} is a {kind} (keep it "
                                 "out with filter_fn)")
            mask = sp.masks[name].view(-1)
            active = mask.nonzero().squeeze(1)
            explore = grow_highest(random_scores(mask.shape, sp.rng, mask.device), ~mask, self.explore_size(sp, name))
            pos = torch.cat([active, explore])
            zeros = torch.zeros(pos.numel(), device=mask.device)
            self._layers[name] = {"pos": pos, "psi": zeros.clone(), "shadow": zeros.clone(),
                                  "m1": zeros.clone(), "m2": zeros.clone(), "sq": zeros.clone()}
        self.add_hooks(sp)

    def add_hooks(self, sp: Sparsifier) -> None:
        """A forward hook on every layer holding a learned weight (a tied weight's uses all count), holding the
        Sparsifier weakly. Added before any forward, so a torch.compile'd model traces them (it ignores hooks added
        later); the sparse backend's twins take them over."""
        owner = weakref.ref(sp)
        for name in self._layers:
            hook = self._capture_hook(owner, name) if self.captures() else self._forward_hook(owner, name)
            twin = sp.sparse_layers.get(name)  # on the sparse backend, after the swap (a rollback)
            for holder in [twin] if twin is not None else self.holders(sp, name):
                self._hooks.append(holder.register_forward_hook(_LayerHook(hook)))

    def loaded(self, sp: Sparsifier) -> None:
        """After a rollback in the process to a step inside the learning phase, put back the hooks its end removed."""
        if not self._hooks and sp.step_count < self.stop_step(sp):
            self.add_hooks(sp)

    def check_setting(self, backend: str, holdout: bool) -> None:
        """Refuse options the backend cannot serve, and `upper_data: holdout` without held-out batches (a recipe
        checks this before any data loads)."""
        if backend == "sparse" and self.hypergradient == "unrolled":
            raise BidstError("hypergradient 'unrolled' sets trial weights in dense layers: use backend 'masked'")
        if backend == "sparse" and self.mask_rows < 1.0:
            raise BidstError("mask_rows < 1 subsamples captured rows, which backend 'sparse' does not capture: use 'masked'")
        if self.upper_data == "holdout":
            if backend == "sparse":
                raise BidstError("upper_data 'holdout' runs extra passes over dense layers: use backend 'masked'")
            if not holdout:
                raise BidstError("upper_data 'holdout' needs held-out batches: set holdout_size in the recipe "
                                 "(or pass holdout_batches to sparsify)")

    def holders(self, sp: Sparsifier, name: str) -> list[nn.Module]:
        """The Linear/Conv layers whose forward uses weight `name`: its own and any it is tied to. A weight also
        held by another kind (an embedding tied to a classifier) is refused where the scores' gradient comes from
        captures, which only these layers give."""
        weight = sp.params[name]
        holders = [m for m in unwrap(sp.model).modules() if getattr(m, "weight", None) is weight] or [sp.modules[name]]
        other = [type(m).__name__ for m in holders if not isinstance(m, LAYER_KINDS)]
        if other and self.captures():
            raise BidstError(f"bidst's captured gradients (unrolled, mask_rows < 1, upper_data: holdout) come from "
                             f"Linear and Conv layers, but {name} is also used by a {other[0]}: use the default options")
        return [m for m in holders if isinstance(m, LAYER_KINDS)]

    def check_loss_scaling(self) -> None:
        """Refuse a scaled loss (fp16's GradScaler) with `unrolled`, whose extra passes start from the captured,
        scaled output gradients; the candidates' sampled products divide the step's scale out (`candidate_grads`)."""
        if self.hypergradient == "unrolled":
            raise BidstError("fp16 with a GradScaler is not supported with hypergradient 'unrolled' (its extra passes "
                             "start from scaled gradients): use bf16 or fp32")

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        """The dense gradient is needed only to choose E by gradient: at step 1 and at flag checks."""
        return self.explore == "gradient" and (step == 1 or self.is_check(step, sp))

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        """Learn scores and shadow weights from this step's backward pass; at a check, commit by the flag."""
        if self.learns(step, sp):
            self.learn(sp, step)
        self._captures.clear()
        if step == 1 and dense_grads is not None:  # the first exploration set by gradient, not at random
            if self.uses_check_grad(dense_grads):
                for name in self.learned(sp):
                    sp.add_cost("mask_learning", 2.0 * self.explore_size(sp, name))
            for name in self.learned(sp):
                state = self._layers[name]
                self.remove_entries(state, (~sp.masks[name].view(-1)[state["pos"]]).nonzero().squeeze(1))
                self.add_candidates(sp, name, state["pos"][:0], dense_grads)
        changed = False
        if self.is_check(step, sp):
            if self.uses_check_grad(dense_grads) and not self.learns(step, sp):  # else learn() took this step already
                self.shadow_step_dense(sp, cast(dict, dense_grads))
            changed = self.commit(sp, step, dense_grads)
        if step >= self.stop_step(sp):
            self.remove_hooks()
        return changed

    def learned(self, sp: Sparsifier) -> list[str]:
        """The layers whose scores and candidates learn: all but those frozen since (requires_grad False), which
        keep them as they are, as they keep their topology."""
        return [n for n in self._layers if sp.trainable(n).requires_grad]

    def uses_check_grad(self, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        """Whether this step's dense gradient (step 1 or a check, explore: gradient) also steps the shadow weights."""
        return self.check_grad and self.explore == "gradient" and dense_grads is not None

    def shadow_step_dense(self, sp: Sparsifier, dense_grads: dict[str, torch.Tensor]) -> None:
        """θ_E ← θ_E − η·g_E with the dense gradient the engine computed at this check (this step's batch), at a
        check that is not a learning step; costed."""
        for name in self.learned(sp):
            state = self._layers[name]
            explore = ~sp.masks[name].view(-1)[state["pos"]]
            lr = float(self.param_group(sp, name)["lr"])
            delta = lr * dense_grads[name].view(-1)[state["pos"][explore]].float()
            state["shadow"][explore] -= delta
            if self.consistency > 0:
                state["sq"][explore] += delta * delta
            sp.add_cost("mask_learning", 2.0 * self.explore_size(sp, name))

    def state_dict(self) -> dict[str, Any]:
        """Candidate positions, scores, shadow weights and score-optimizer moments per layer."""
        return {
            "layers": {n: {k: v.detach().cpu().clone() for k, v in s.items()} for n, s in self._layers.items()},
            "learn_steps": self._learn_steps,
            "decisions": {"swaps": self._swaps, "set_by_scores": self._set_by_scores, "moved": self._moved},
            "holdout_draws": self._holdout_draws,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` onto the devices of the current state."""
        for name, saved in state["layers"].items():
            device = self._layers[name]["pos"].device if name in self._layers else torch.device("cpu")
            self._layers[name] = {k: v.clone().to(device) for k, v in saved.items()}
            self._layers[name].setdefault("sq", torch.zeros_like(self._layers[name]["shadow"]))  # older states
        self._learn_steps = int(state["learn_steps"])
        decisions = state.get("decisions", {})  # absent from older states
        self._swaps, self._set_by_scores = int(decisions.get("swaps", 0)), int(decisions.get("set_by_scores", 0))
        self._moved = int(decisions.get("moved", 0))
        self._holdout_draws = int(state.get("holdout_draws", 0))  # absent from older states

    def sampled_positions(self, step: int, sp: Sparsifier) -> dict[str, torch.Tensor] | None:
        """At learning steps, the exploration candidates E, whose gradient the engine reports (see `captures`)."""
        if self.captures() or not self.learns(step, sp):
            return None
        return {n: self._layers[n]["pos"][self.explore_slots(sp, n)] for n in self.learned(sp)}

    def explore_count(self, sp: Sparsifier, name: str) -> int:
        """|E| of a layer now, without looking at the masks: C holds every active weight, so |C| − k."""
        return self._layers[name]["pos"].numel() - sp.budgets[name]

    def explore_slots(self, sp: Sparsifier, name: str) -> torch.Tensor:
        """Slots of E in the layer's candidate list C, in order, found without a host synchronisation."""
        active = sp.masks[name].view(-1)[self._layers[name]["pos"]]
        return torch.sort(active.to(torch.uint8), stable=True).indices[: self.explore_count(sp, name)]

    def _forward_hook(self, owner: weakref.ref[Sparsifier], name: str) -> Any:
        """A forward hook keeping (output rows, batch, θ over C) of a layer on learning steps, for the
        hypergradient θ⊙g at the weights the gradient was taken at, and for costs and Fisher."""

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            sp = owner()
            if sp is not None and torch.is_grad_enabled() and self.learns(sp.step_count + 1, sp):
                self._records_for(sp.step_count + 1)
                self._forget_discarded(sp, name)
                rows, batch = output_rows(module, output), batched(module, inputs[0]).shape[0]

                # a forward counts once its output's gradient arrives (a grad-enabled validation pass does not)
                def count(grad: torch.Tensor) -> None:
                    seen = self._forward.get(name)
                    if seen is None:
                        self._forward[name] = (rows, batch, self.weights_at(sp, name, self._layers[name]["pos"]))
                    else:  # another forward before the step (gradient accumulation): its rows and samples count too
                        self._forward[name] = (rows + seen[0], batch + seen[1], seen[2])

                if output.requires_grad:
                    output.register_hook(count)

        return hook

    @staticmethod
    def weights_at(sp: Sparsifier, name: str, positions: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """The weights (or, with `grad`, their gradients) of layer `name` at flat `positions`, 0 where inactive."""
        layer = sp.sparse_layers.get(name)
        if layer is None:
            source = sp.params[name].grad if grad else sp.params[name]
            if source is None:
                return torch.zeros(positions.numel(), device=positions.device)
            return source.detach().view(-1)[positions].float()
        source = layer.values.grad if grad else layer.values
        flat = layer.structure.flat_indices(positions.device)
        if source is None or flat.numel() == 0:
            return torch.zeros(positions.numel(), device=positions.device)
        slot = torch.searchsorted(flat, positions).clamp_(max=flat.numel() - 1)
        return torch.where(flat[slot] == positions, source.detach()[slot].float(), 0.0)

    # -- capture -----------------------------------------------------------------------
    def _records_for(self, step: int) -> None:
        """Forget what the forwards of an earlier step recorded: a step the optimizer skipped (a GradScaler that
        found inf) never reaches `update`, which clears them, and its records must not join this step's."""
        if self._records_step != step and not self._extra_pass:
            self._captures.clear()
            self._forward.clear()
            self._records_step = step

    def _forget_discarded(self, sp: Sparsifier, name: str) -> None:
        """Drop layer `name`'s records of finished backward passes when a forward finds its gradient zeroed:
        that backward was discarded (a step skipped after prepare_gradients, SAM's first pass), as `.grad` itself
        was. Captures still waiting for their gradient belong to this pass (a weight used twice) and stay."""
        finished = name in self._forward or any(entry[2] is not None for entry in self._captures.get(name, []))
        # (nothing to drop, the usual case, asks nothing of the gradient: on an accelerator that is a host sync)
        if self._extra_pass or not finished or not grad_cleared(sp.trainable(name)):
            return
        self._forward.pop(name, None)  # counted once their output gradient arrived
        if name in self._captures:
            self._captures[name] = [entry for entry in self._captures[name] if entry[2] is None]

    def _capture_hook(self, owner: weakref.ref[Sparsifier], name: str) -> Any:
        """A forward hook keeping the layer input, the weights at C and (by a tensor hook) the output gradient."""

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            sp = owner()
            if sp is None:
                return
            wanted = self._extra_pass or self.learns(sp.step_count + 1, sp)
            if not (wanted and torch.is_grad_enabled() and output.requires_grad):
                return
            self._records_for(sp.step_count + 1)
            self._forget_discarded(sp, name)
            entry: list[Any] = [inputs[0].detach(), sp.params[name].detach().view(-1)[self._layers[name]["pos"]], None]
            self._captures.setdefault(name, []).append(entry)

            def keep_grad(grad: torch.Tensor) -> None:
                entry[2] = grad.detach()

            output.register_hook(keep_grad)

        return hook

    def remove_hooks(self) -> None:
        """Stop capturing (after the learning phase) and release what was captured."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._captures.clear()

    def candidate_grads(
        self, sp: Sparsifier, name: str, entries: list[list[Any]], actives_from_grad: bool
    ) -> torch.Tensor:
        """g = dL/d(θ⊙m̂) over C: the actives' from param.grad (or sampled), E's sampled (SDDMM), DDP-averaged.

        `actives_from_grad`: the entries are the training step's captures, whose output gradients carry the loss scale
        of a GradScaler (divided out here; param.grad is unscaled already); else an extra pass's, unscaled."""
        state = self._layers[name]
        module = sp.modules[name]
        active = sp.masks[name].view(-1)[state["pos"]]
        grads = torch.zeros(state["pos"].numel(), device=state["pos"].device)
        sampled = ~active if actives_from_grad else torch.ones_like(active)
        where = sampled.nonzero().squeeze(1)
        for x, _, gout in entries:
            rows, weights = (self.row_subset(sp, module, gout) if actives_from_grad else (None, None))
            grads[where] += sampled_weight_grad(module, x, gout, state["pos"][where], rows, weights).to(grads)
        if actives_from_grad and sp.loss_scale != 1.0:
            grads.div_(sp.loss_scale)
        sp.all_reduce_mean(grads)
        if actives_from_grad:
            grad = sp.params[name].grad
            if grad is not None:
                grads[active] = grad.detach().view(-1)[state["pos"][active]].float()
        return grads

    def row_subset(
        self, sp: Sparsifier, module: nn.Module, gout: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rows (and their weights) for an unbiased estimate of the sampled gradient from `sub_rows` rows.

        `uniform`: rows without replacement, each weighted total/n. `grad_norm`: n rows with
        replacement, row r with probability p_r ∝ |dL/dy_r| (the output gradient's norm, which
        the standard approximate-matrix-product sampling uses), weighted 1/(n·p_r); rows whose
        output gradient is zero contribute nothing and are never drawn. Random numbers come from
        the engine's generator, a fixed count per call (the same on every rank).
        """
        total = output_rows(module, gout)
        n = self.sub_rows(total)
        if n >= total:
            return None, None
        if self.row_sampling == "grad_norm":
            norms = output_row_norms(module, gout).cpu().double()
            u = torch.rand(n, generator=sp.rng, dtype=torch.float64)
            mass = float(norms.sum())
            if mass > 0:
                p = norms / mass
                rows = torch.searchsorted(p.cumsum(0), u * float(p.sum())).clamp_(max=total - 1)
                rows = torch.where(p[rows] > 0, rows, p.nonzero().squeeze(1)[-1])  # guard rounding at the ends
                return rows, (1.0 / (n * p[rows])).float()
            return (u * total).long().clamp_(max=total - 1), torch.full((n,), total / n)
        rows = torch.randperm(total, generator=sp.rng)[:n]
        return rows, torch.full((n,), total / n)

    # -- the upper and lower level -----------------------------------------------------
    def learn(self, sp: Sparsifier, step: int) -> None:
        """One step of the scores (upper level) and of the shadow weights (lower level of the candidates)."""
        psi_grads, grads = self.score_grads(sp, step)
        if psi_grads:
            self._learn_steps += 1
        for name, psi_grad in psi_grads.items():
            self.step_scores(self._layers[name], psi_grad)
            self.step_shadow(sp, name, grads[name])

    def check_same_use_on_ranks(self) -> None:
        """Under DDP, raise SharedError on every rank if some layer's forward ran a different number of times on
        different ranks this learning step: each rank's share of the score gradient comes from its own forwards,
        so a branch taken on some ranks only would leave the ranks' scores, and then their masks, apart."""
        if distributed.world_size() == 1:
            return
        calls = {n: torch.tensor(len(self._captures.get(n, [])) + (n in self._forward)) for n in self._layers}
        uneven = distributed.differing(calls)
        if uneven:
            raise SharedError(
                f"bidst under DDP learns a layer's scores from every rank's forward of it, but layer "
                f"{uneven[0].rpartition('.')[0]!r} ran on some ranks and not on others this step (a branch not taken "
                "everywhere): keep such layers out with filter_fn"
            )

    @staticmethod
    def check_modules_ran(sp: Sparsifier, unseen: list[str]) -> None:
        """Raise BidstError if a layer whose module's forward never ran this step still got a gradient: its
        weight is used outside the module (nn.MultiheadAttention's out_proj, say), so no scores can be learned.
        A layer the step did not use at all (a branch not taken) has no gradient and is fine."""
        for name in unseen:
            grad = sp.trainable(name).grad
            if grad is not None and bool(grad.any()):
                raise BidstError(
                    f"bidst learns a layer's scores from its module's forward, but layer {name.rpartition('.')[0]!r} "
                    "got a gradient while its forward never ran (its weight is used outside the module, as "
                    "nn.MultiheadAttention uses out_proj.weight: keep such layers out with filter_fn; or a "
                    "torch.compile'd model reused a graph compiled before the hooks existed: torch._dynamo.reset() "
                    "before compiling)"
                )

    def score_grads(self, sp: Sparsifier, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """From this step's captures: dL/dψ through σ((ψ+G)/τ) (straight-through) and g, both over C, per layer."""
        # the captures whose output gradient arrived (not a grad-enabled forward the loss did not use)
        entries = {n: kept for n, e in self._captures.items() if (kept := [item for item in e if item[2] is not None])}
        tau = self.temperature(step, sp)
        grads, thetas, relaxed, batches = {}, {}, {}, {}
        self.check_same_use_on_ranks()
        learned = self.learned(sp)
        seen = [n for n in learned if n in entries or (n in sp.sampled_grads and n in self._forward)]
        # (a layer unfrozen this step ran its forward, but its candidates' gradient was not asked for: it learns next step)
        self.check_modules_ran(sp, [n for n in learned if n not in seen and n not in self._forward])
        for name in seen:
            state = self._layers[name]
            explore_count = self.explore_count(sp, name)
            if explore_count == 0:  # no candidates (a layer at density 1): nothing to rank against, no swap possible
                continue
            active = sp.masks[name].view(-1)[state["pos"]]
            module = sp.modules[name]
            if name in entries:  # masked: sampled products from the captured inputs and output gradients
                caught = entries[name]
                rows = sum(self.sub_rows(output_rows(module, g)) for _, _, g in caught)
                batches[name] = sum(batched(module, x).shape[0] for x, _, _ in caught)
                if self.row_sampling == "grad_norm" and self.mask_rows < 1.0:  # the output-gradient row norms
                    rows_all = sum(output_rows(module, gout) for _, _, gout in caught)
                    sp.add_cost("mask_learning", over_ranks(2.0 * rows_all * int(module.weight.shape[0])))
                grads[name] = self.candidate_grads(sp, name, caught, actives_from_grad=True)
                thetas[name] = torch.where(active, caught[0][1].float(), state["shadow"])
            else:  # the engine reported E's gradient; the actives' is the (masked) gradient of the weights
                rows, batches[name], theta = self._forward[name]
                grads[name] = self.weights_at(sp, name, state["pos"], grad=True)
                grads[name].masked_scatter_(~active, sp.sampled_grads[name].to(grads[name]))
                thetas[name] = torch.where(active, theta, state["shadow"])
            sp.add_cost("mask_learning", over_ranks(2.0 * explore_count * rows) + SCORE_FLOPS * active.numel())
            if self.consistency > 0:
                sp.add_cost("mask_learning", CONSISTENCY_FLOPS * explore_count)
            noise = random_scores(state["psi"].shape, sp.rng, active.device).clamp_(1e-6, 1 - 1e-6)
            relaxed[name] = torch.sigmoid((state["psi"] + noise.log() - (-noise).log1p()) / tau)
        self._forward.clear()
        if self.hypergradient == "unrolled" and entries:
            mask_grads = self.unrolled_mask_grads(sp, grads, thetas, {n: entries[n] for n in grads})
        else:
            upper = grads
            if self.upper_data == "holdout" and grads:
                upper, batches = self.holdout_grads(sp, list(grads))
            mask_grads = {n: self.mask_grad(sp, n, upper[n], thetas[n], relaxed[n], batches[n]) for n in grads}
        return {n: mask_grads[n] * relaxed[n] * (1 - relaxed[n]) / tau for n in grads}, grads

    def holdout_grads(self, sp: Sparsifier, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """(g over C, batch size) per layer on the next held-out batch at the current weights: the upper
        level's own data (upper_data: holdout); its forward and backward are counted as mask learning."""
        batch = cast(Any, sp.holdout_batches)(self._holdout_draws)
        self._holdout_draws += 1
        with buffers_kept(sp.model):  # batch-norm statistics follow the training data only
            grads, rows, other = self.extra_pass(sp, batch, names)
        for n in names:
            sp.add_cost("mask_learning", over_ranks(pass_flops(sp.budgets[n], self._layers[n]["pos"].numel(), rows[n])))
        if other:
            sp.add_cost("mask_learning", over_ranks(other))
        size = int(batch[0].shape[0])
        return grads, dict.fromkeys(names, size)

    def mask_grad(
        self, sp: Sparsifier, name: str, grads: torch.Tensor, theta: torch.Tensor, relaxed: torch.Tensor, batch: int
    ) -> torch.Tensor:
        """dL/dm over C: θ⊙g (first order); implicit_diag subtracts (1/λ)·m̂⊙g⊙g; second_order_diag adds

        (m̃ − m̂)⊙θ²⊙F, the derivative of the relaxed loss's diagonal second-order term with the
        empirical Fisher F = batch·g² as curvature (an OBD-like saliency for actives).
        """
        out = theta * grads
        active = sp.masks[name].view(-1)[self._layers[name]["pos"]]
        if self.hypergradient == "implicit_diag":
            out = out - self.implicit_scale(sp, name) * active * grads * grads
        elif self.hypergradient == "second_order_diag":
            # the empirical Fisher batch·g² of the global batch (g is averaged over the DDP ranks, batch is this rank's)
            out = out + (relaxed - active.float()) * theta * theta * batch * distributed.world_size() * grads * grads
        return out

    def implicit_scale(self, sp: Sparsifier, name: str) -> float:
        """1/λ of implicit_diag: the option, else 1 / the weight decay of the layer's optimizer group."""
        if self.implicit_coef > 0:
            return self.implicit_coef
        decay = float(self.param_group(sp, name).get("weight_decay", 0.0))
        if decay <= 0:
            raise BidstError("hypergradient 'implicit_diag' needs implicit_coef > 0 or an optimizer weight decay")
        return 1.0 / decay

    @staticmethod
    def param_group(sp: Sparsifier, name: str) -> dict[str, Any]:
        """The optimizer parameter group that holds layer `name`'s weight."""
        param = sp.params[name]
        return next(g for g in sp.optimizer.param_groups if any(p is param for p in g["params"]))

    def step_scores(self, state: dict[str, torch.Tensor], grad: torch.Tensor) -> None:
        """ψ ← ψ − η_ψ·(Adam or SGD direction of `grad`); nothing moves when mask_lr is 0 (the control)."""
        if self.mask_lr == 0:
            return
        if self.mask_optimizer == "sgd":
            state["psi"].sub_(self.mask_lr * grad)
            return
        if self.mask_optimizer == "layer_sgd":
            state["psi"].sub_(self.mask_lr * grad / grad.pow(2).mean().sqrt().clamp_min(1e-30))
            return
        b1, b2 = ADAM_BETAS
        state["m1"].mul_(b1).add_(grad, alpha=1 - b1)
        state["m2"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m1 = state["m1"] / (1 - b1**self._learn_steps)
        m2 = state["m2"] / (1 - b2**self._learn_steps)
        state["psi"].sub_(self.mask_lr * m1 / (m2.sqrt() + ADAM_EPS))

    def step_shadow(self, sp: Sparsifier, name: str, grads: torch.Tensor) -> None:
        """θ_E ← θ_E − η·(g_E + β·θ_E) with the layer's current learning rate; actives keep a zero shadow."""
        state = self._layers[name]
        explore = (~sp.masks[name].view(-1)[state["pos"]]).to(grads.dtype)  # a 0/1 factor: no boolean indexing
        lr = float(self.param_group(sp, name)["lr"])
        delta = lr * (grads + self.shadow_decay * state["shadow"]) * explore
        state["shadow"].sub_(delta)
        if self.consistency > 0:
            state["sq"].add_(delta * delta)

    # -- the unrolled hypergradient ----------------------------------------------------
    def unrolled_mask_grads(
        self,
        sp: Sparsifier,
        grads: dict[str, torch.Tensor],
        thetas: dict[str, torch.Tensor],
        entries: dict[str, list[list[Any]]],
    ) -> dict[str, torch.Tensor]:
        """dU/dm over C for U(m) = L((θ − η·m⊙g)⊙m), the one-step-unrolled loss on this batch.

        dU/dm = θ'⊙g' − η·m⊙g⊙g' − η·θ⊙H(m⊙g'), with g' the gradient at the virtual step θ' and
        the Hessian-vector product by central differences (second-order DARTS). The extra
        passes run on the step's own batch and leave weights, gradients and buffers as they were.
        """
        batch = sp.batch
        if batch is None:
            raise BidstError("hypergradient 'unrolled' needs the training batch: call sparsifier.step(batch=(x, y))")
        names = list(entries)
        masks = {n: sp.masks[n].view(-1)[self._layers[n]["pos"]].float() for n in names}
        lrs = {n: float(self.param_group(sp, n)["lr"]) for n in names}
        virtual = {n: thetas[n] - lrs[n] * masks[n] * grads[n] for n in names}
        saved = {n: sp.params[n].detach().view(-1)[self._layers[n]["pos"]].clone() for n in names}
        try:
            with buffers_kept(sp.model):
                g_virtual, _, other = self.extra_pass(sp, batch, names, {n: virtual[n] * masks[n] for n in names})
                u = {n: masks[n] * g_virtual[n] for n in names}
                eps = self.unroll_eps / max(math.sqrt(sum(float(v.pow(2).sum()) for v in u.values())), 1e-12)
                plus = self.extra_pass(sp, batch, names, {n: (thetas[n] + eps * u[n]) * masks[n] for n in names})[0]
                minus = self.extra_pass(sp, batch, names, {n: (thetas[n] - eps * u[n]) * masks[n] for n in names})[0]
        finally:
            with torch.no_grad():
                for n in names:
                    sp.params[n].view(-1)[self._layers[n]["pos"]] = saved[n]
        for n in names:
            rows = sum(output_rows(sp.modules[n], gout) for _, _, gout in entries[n])
            sp.add_cost("unrolled", over_ranks(UNROLLED_PASSES * pass_flops(sp.budgets[n], masks[n].numel(), rows)))
        if other:  # the three passes run on the same batch
            sp.add_cost("unrolled", over_ranks(UNROLLED_PASSES * other))
        return {
            n: virtual[n] * g_virtual[n] - lrs[n] * masks[n] * grads[n] * g_virtual[n]
            - lrs[n] * thetas[n] * (plus[n] - minus[n]) / (2 * eps)
            for n in names
        }

    def extra_pass(
        self,
        sp: Sparsifier,
        batch: tuple[torch.Tensor, torch.Tensor],
        names: list[str],
        values: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
        """Forward and backward of `batch`, with the weights at C first set to `values` if given: (g over C,
        output rows) for each layer in `names`, and the FLOPs of the pass through the model's other layers.

        Only input gradients are propagated (no dense weight gradient, param.grad untouched); the
        gradients over C are sampled products from the captured layer inputs and output gradients.
        """
        with torch.no_grad():
            for n, v in (values or {}).items():
                sp.params[n].view(-1)[self._layers[n]["pos"]] = v.to(sp.params[n].dtype)
        inputs, targets = batch
        model = unwrap(sp.model)  # the extra passes must not trigger DDP's gradient reduction
        self._captures.clear()
        others = other_layers(sp, names)
        self._extra_pass = True
        try:
            with torch.enable_grad(), rows_counted(others.items()) as other_rows:
                x = inputs.detach().requires_grad_(True)
                torch.autograd.grad(sp.loss_fn(model(x), targets), x)
        finally:
            self._extra_pass = False
        out = {n: self.candidate_grads(sp, n, self._captures[n], actives_from_grad=False) for n in names}
        rows = {n: sum(output_rows(sp.modules[n], gout) for _, _, gout in self._captures[n]) for n in names}
        self._captures.clear()
        return out, rows, other_pass_flops(sp, others, other_rows)

    # -- the topology flag -------------------------------------------------------------
    def ranking(self, sp: Sparsifier, name: str, scores: bool = True) -> torch.Tensor:
        """r over C: ψ, or ψ + log|θ| with the current weights for actives and shadows for E; with
        `scores` false, ψ is taken as 0 (the ranking the control, mask_lr 0, commits by)."""
        state = self._layers[name]
        psi = state["psi"] if scores else torch.zeros_like(state["psi"])
        if self.rank == "psi":
            return psi.clone()
        active = sp.masks[name].view(-1)[state["pos"]]
        theta = torch.where(active, self.weights_at(sp, name, state["pos"]), state["shadow"])
        rank = psi + theta.abs().log()
        if self.consistency > 0:  # |Σ steps| / √(Σ steps²): √T for a steady push, about 1 for noise
            ratio = state["shadow"].abs() / state["sq"].sqrt().clamp_min(1e-30)
            rank = torch.where(active, rank, rank + self.consistency * ratio.clamp_min(1e-30).log())
        return rank

    def commit(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        """Per layer: swap the lowest-ranked actives for the highest-ranked candidates if the flag holds."""
        alpha = cosine_decay(step, self.drop_fraction, self.stop_step(sp))
        volumes: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # (active slots, candidate slots, drops)
        for name in sp.sparse_names():
            active = sp.masks[name].view(-1)[self._layers[name]["pos"]]
            act_idx, exp_idx = active.nonzero().squeeze(1), (~active).nonzero().squeeze(1)
            k = sp.budgets[name]
            n = min(round(alpha * k), exp_idx.numel(), k - 1)
            if n > 0 and (self.swap == "capped" or n >= self.min_swap_fraction * k):  # capped: flag checked below
                volumes[name] = (act_idx, exp_idx, n)
        grows = self.grow_counts(volumes)
        changed = False
        for name, (act_idx, exp_idx, n) in volumes.items():
            state = self._layers[name]
            k, m = sp.budgets[name], grows[name]
            rank = self.ranking(sp, name)
            drop, grow = self.swap_candidates(rank, act_idx, exp_idx, n, m)
            plain_drop, plain_grow = self.swap_candidates(self.ranking(sp, name, scores=False), act_idx, exp_idx, n, m)
            if self.scores_decide == "grow":  # the scores pick one side only, the control's ranking the other
                drop = plain_drop
            elif self.scores_decide == "drop":
                grow = plain_grow
            if self.swap == "capped":
                n = int((rank[grow] > rank[drop]).long().cumprod(0).sum())
                drop, grow = drop[:n], grow[:n]
                if n == 0 or n < self.min_swap_fraction * k:
                    continue
            # the lowest-ranked candidates that were not grown leave C: `explore_refresh` of them make room for
            # fresh ones, and any beyond ⌈ρ·k⌉ of a layer that the allocation shrank are not replaced
            rest = exp_idx[~torch.isin(exp_idx, grow)]
            excess = rest.numel() - self.explore_size(sp, name, k - drop.numel() + grow.numel())
            leaving = max(int(self.explore_refresh * rest.numel()), excess)
            stale = rest[torch.sort(rank[rest], stable=True).indices[:leaving]] if leaving > 0 else exp_idx[:0]
            self.record_decisions(drop, grow, plain_drop[: drop.numel()], plain_grow[: grow.numel()])
            self._moved += max(grow.numel() - drop.numel(), 0)
            values = state["shadow"][grow] if self.grow_init == "shadow" else None
            sp.change(name, state["pos"][drop], state["pos"][grow], values)
            self.refill(sp, name, drop, grow, dense_grads, stale)
            changed = True
        return changed

    def grow_counts(self, volumes: dict[str, tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, int]:
        """Grows per committing layer: as many as it drops, or (`allocate: scores`) the commit's total drops
        spread over the layers by the learned scores: the candidates of all of them with the highest ψ win,
        so the upper level moves budget between layers (ψ in SGD units compares across layers; the control,
        whose ψ is 0, keeps every layer's budget)."""
        counts = {name: n for name, (_, _, n) in volumes.items()}
        if self.allocate == "layer" or self.mask_lr == 0 or not volumes:
            return counts
        names = list(volumes)
        psi = torch.cat([self._layers[n]["psi"][volumes[n][1]] for n in names])
        owner = torch.cat([torch.full((volumes[n][1].numel(),), i, device=psi.device) for i, n in enumerate(names)])
        best = torch.sort(psi, descending=True, stable=True).indices[: sum(counts.values())]
        won = torch.bincount(owner[best], minlength=len(names)).tolist()
        return dict(zip(names, won, strict=True))

    @staticmethod
    def swap_candidates(
        rank: torch.Tensor, act_idx: torch.Tensor, exp_idx: torch.Tensor, n: int, m: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The n lowest-ranked actives and the m highest-ranked candidates (indices into C; ties by position)."""
        drop = act_idx[torch.sort(rank[act_idx], stable=True).indices[:n]]
        grow = exp_idx[torch.sort(rank[exp_idx], descending=True, stable=True).indices[:m]]
        return drop, grow

    def record_decisions(
        self, drop: torch.Tensor, grow: torch.Tensor, plain_drop: torch.Tensor, plain_grow: torch.Tensor
    ) -> None:
        """Count this commit's swaps and those not among the as many that the ranking without ψ picks (`plain_*`)."""
        self._swaps += drop.numel() + grow.numel()
        self._set_by_scores += int((~torch.isin(drop, plain_drop)).sum()) + int((~torch.isin(grow, plain_grow)).sum())

    def stats(self) -> dict[str, float]:
        """What the learned scores decided: committed drops + grows, and the share of them that the same
        ranking without ψ (the control's) would not have chosen; 0 means the upper level changed nothing.
        `budget_moved`: with `allocate: scores`, the grows placed in a layer beyond its own drops."""
        share = self._set_by_scores / self._swaps if self._swaps else 0.0
        return {"swap_decisions": self._swaps, "set_by_scores": share, "budget_moved": self._moved}

    def refill(
        self,
        sp: Sparsifier,
        name: str,
        drop: torch.Tensor,
        grow: torch.Tensor,
        dense_grads: dict[str, torch.Tensor] | None,
        stale: torch.Tensor | None = None,
    ) -> None:
        """After a commit: dropped (and `stale`) entries leave C, grown ones lose their shadow, E is refilled to ⌈ρ·k⌉."""
        state = self._layers[name]
        leaving = drop if stale is None else torch.cat([drop, stale])
        dropped = state["pos"][leaving]
        state["shadow"][grow] = 0.0
        self.remove_entries(state, leaving)
        self.add_candidates(sp, name, dropped, dense_grads)

    @staticmethod
    def remove_entries(state: dict[str, torch.Tensor], index: torch.Tensor) -> None:
        """Delete entries `index` (into C) from every per-layer tensor."""
        keep = torch.ones_like(state["pos"], dtype=torch.bool)
        keep[index] = False
        for key in LAYER_KEYS:
            state[key] = state[key][keep]

    def add_candidates(
        self, sp: Sparsifier, name: str, excluded: torch.Tensor, dense_grads: dict[str, torch.Tensor] | None
    ) -> None:
        """Fill E up to ⌈ρ·k⌉ with inactive positions outside C and `excluded`, by |dense gradient| or at random
        (also where that gradient is zero everywhere: a branch this step did not use). Where too few such
        positions are left (a layer at density 1/(1+ρ) or more, whose other inactive weights are all in C),
        the `excluded` ones (just dropped) fill the rest, so E never runs dry and the layer keeps exploring.

        New candidates start with a zero shadow weight and a neutral score: 0, or just below the
        active threshold under `rank: psi`.
        """
        state = self._layers[name]
        mask = sp.masks[name].view(-1)
        free = ~mask.clone()  # inactive positions outside C
        free[state["pos"]] = False
        eligible = free.clone()
        eligible[excluded] = False
        others = int(eligible.sum())
        missing = min(self.explore_size(sp, name) - int((~mask[state["pos"]]).sum()), int(free.sum()))
        if missing <= 0:
            return
        if self.explore == "gradient" and dense_grads is not None and bool(dense_grads[name].any()):
            scores = dense_grads[name].view(-1).abs()
        else:
            scores = random_scores(mask.shape, sp.rng, mask.device)
        new = grow_highest(scores, eligible, min(missing, others))
        if missing > others:
            new = torch.cat([new, grow_highest(scores, free & ~eligible, missing - others)])
        # slots in position order: the gradient's order among near-equal values changes with its rounding (a
        # DDP average), and a slot's order decides its noise draws and ties, so ranks and world sizes would part
        new = new.sort().values
        neutral = 0.0
        if self.rank == "psi":
            threshold = state["psi"][mask[state["pos"]]].min()
            neutral = float(torch.nextafter(threshold, torch.tensor(-math.inf, device=threshold.device)))
        zeros = torch.zeros(missing, device=mask.device)
        shadow = zeros
        if self.uses_check_grad(dense_grads):  # the gradient they were picked by is their first shadow step
            lr = float(self.param_group(sp, name)["lr"])
            shadow = -lr * cast(dict, dense_grads)[name].view(-1)[new].float()
        additions = {"pos": new, "psi": zeros + neutral, "shadow": shadow, "m1": zeros, "m2": zeros, "sq": shadow**2}
        for key in LAYER_KEYS:
            state[key] = torch.cat([state[key], additions[key].to(state[key].dtype)])

    # -- cost plan (for matching training FLOPs before a run) -----------------------------
    def holdout_rows(self, sp: Sparsifier) -> dict[str, int]:
        """Output rows of every Conv/Linear layer on a held-out batch (one no-grad forward of batch 0, measured once)."""
        if self._holdout_rows is None:
            from ..budget import model_rows  # budget imports the method registry: import at call time

            rows = model_rows(sp.model, cast(Any, sp.holdout_batches)(0)[0])  # this rank's share: the global batch's
            self._holdout_rows = {n: r * distributed.world_size() for n, r in rows.items()}
        return self._holdout_rows

    def planned_costs(self, sp: Sparsifier, rows: dict[str, int]) -> dict[str, float]:
        """FLOPs of this method's own work over the run (dense gradients excluded: the engine plans those).

        `rows` maps each layer to its output positions times batch size for one step.
        """
        learn_steps = sum(1 for s in range(1, sp.total_steps + 1) if self.learns(s, sp))
        held = self.holdout_rows(sp) if self.upper_data == "holdout" else None
        sizes = {n: self.explore_size(sp, n) for n in sp.sparse_names()}
        learning = {n: e for n, e in sizes.items() if e > 0}  # score_grads skips the layers without candidates
        mask, unrolled = 0.0, 0.0
        if held is not None or self.hypergradient == "unrolled":  # the extra passes also run through the other layers
            others = other_layers(sp, list(learning))
            if held is not None:
                mask += other_pass_flops(sp, others, held)
            if self.hypergradient == "unrolled":
                unrolled += UNROLLED_PASSES * other_pass_flops(sp, others, rows)
        for name, e in learning.items():
            k = sp.budgets[name]
            mask += 2.0 * e * self.sub_rows(rows[name]) + SCORE_FLOPS * (k + e)
            if self.consistency > 0:
                mask += CONSISTENCY_FLOPS * e
            if self.row_sampling == "grad_norm" and self.mask_rows < 1.0:
                mask += 2.0 * rows[name] * int(sp.modules[name].weight.shape[0])
            if held is not None:  # the held-out batch's pass
                mask += pass_flops(k, k + e, held[name])
            unrolled += UNROLLED_PASSES * pass_flops(k, k + e, rows[name])
        costs = {"mask_learning": learn_steps * mask}
        if self.check_grad and self.explore == "gradient":  # step 1's initial shadows, a shadow step at other checks
            dense_steps = sum(1 for s in range(1, sp.total_steps + 1)
                              if self.wants_dense_grad(s, sp) and (s == 1 or not self.learns(s, sp)))
            costs["mask_learning"] += dense_steps * sum(2.0 * self.explore_size(sp, n) for n in sp.sparse_names())
        if self.hypergradient == "unrolled":
            costs["unrolled"] = learn_steps * unrolled
        return costs
