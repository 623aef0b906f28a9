"""Training-FLOPs plans, so that a run can be held to another method's training cost (BiDST's 158 vs 160 epochs).

A plan counts, per step, the forward and backward of the active weights (3 × 2·k·rows per layer,
rows = output positions × batch; k follows the method's `budget_changes` where it has them, as
dense-to-sparse GMP and GraNet and MEST's EM&S do, and is the layer budget otherwise), a dense
weight gradient of every sparse layer at each step where the method asks the engine for one
(`wants_dense_grad`), and the method's own declared work (`planned_costs`: SNFS's momentum,
MEST's drop scores, BiDST's mask learning and unrolled passes). Counting follows the FLOPs
conventions of the RigL paper: Conv/Linear weights only, 2 FLOPs per multiply-add.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .backend import unwrap
from .flops import counted_layers
from .methods import create_method
from .sampled import rows_counted

if TYPE_CHECKING:
    from .engine import Sparsifier
    from .methods.base import Method


def layer_rows(model: nn.Module, layers: Iterable[tuple[str, nn.Module]], example_input: torch.Tensor) -> dict[str, int]:
    """Output positions times batch of the (name, layer) pairs on `example_input` (one no-grad eval forward), summed
    per name."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), rows_counted(layers) as rows:
            model(example_input)
    finally:
        model.train(was_training)
    return rows


def model_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv/Linear weight of `model`, sparse-backend twins included, with a layer holding it, keyed by the
    weight's name as the Sparsifier names it: under DDP/compile wrappers too, and a weight tied between layers once,
    under its first layer's name (a twin's trainable tensor is `values`, but the sparsifier keeps the weight's name)."""
    return dict(counted_layers(unwrap(model)))


def model_rows(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Output positions times batch of every Conv/Linear weight of `model` on `example_input`: the `rows` of a plan
    (a weight tied between layers sums them all under its first layer's name). A DDP/compile wrapper is looked
    through, so the names are the Sparsifier's and the forward runs no collective."""
    bare = unwrap(model)
    return layer_rows(bare, counted_layers(bare), example_input)


def planned_flops(
    sp: Sparsifier, method: Method, rows: dict[str, int], steps: int, budgets: dict[str, int] | None = None
) -> dict[str, float]:
    """FLOPs of `steps` steps of `method` at `sp`'s layers, by phase ('train', 'dense_grad', ...): at `budgets`
    (default: `sp`'s current ones), or along the method's own `budget_changes` where it has them."""
    saved = sp.total_steps
    sp.total_steps = steps
    try:
        schedule = getattr(method, "budget_changes", None)
        if method.name == "dense":
            changes = [(0, dict(sp.numel))]
        else:  # a schedule's (step, budgets) pairs; None or no schedule: constant budgets
            changes = (schedule(sp, steps) if schedule is not None else None) or [(0, budgets or sp.budgets)]
        plan = {"train": 0.0, "dense_grad": 0.0}
        moves = getattr(method, "moves_budgets", False)
        for (start, held), (end, _) in zip(changes, [*changes[1:], (steps, None)]):  # steps start+1..end
            plan["train"] += max(0, min(end, steps) - start) * sum(6.0 * held[n] * rows[n] for n in sp.params)
            # a dense gradient of the layers the method may change, those at density 1 aside (theirs is the ordinary
            # one) unless budgets move between layers (the recipe then counts them all, as here)
            dense_steps = sum(1 for s in range(start + 1, min(end, steps) + 1) if method.wants_dense_grad(s, sp))
            plan["dense_grad"] += dense_steps * sum(2.0 * sp.numel[n] * rows[n] for n in sp.sparse_names()
                                                    if moves or held[n] < sp.numel[n])  # fmt: skip
        if not plan["dense_grad"]:
            del plan["dense_grad"]
        own = getattr(method, "planned_costs", None)
        if own is not None:  # the method's own work at the same budgets (a baseline's: the run's target ones)
            held, sp.budgets = sp.budgets, dict(budgets or sp.budgets)
            try:
                plan.update(own(sp, rows))
            finally:
                sp.budgets = held
    finally:
        sp.total_steps = saved
    return plan


def matched_steps(sp: Sparsifier, baseline: str | Method, rows: dict[str, int]) -> int:
    """The most steps (at most `sp.total_steps`) whose plan costs no more than `baseline` over `sp.total_steps`.

    The baseline is a method name (planned with its default options) or a method built with the options its own
    run uses (its update interval sets how many dense gradients it pays for), planned at this run's target layer
    budgets (what a dense-to-sparse run ends at, not the dense layers it starts from).
    """
    method = create_method(baseline) if isinstance(baseline, str) else baseline
    budget = sum(planned_flops(sp, method, rows, sp.total_steps, sp.target_budgets()).values())
    lo, hi = 1, sp.total_steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(planned_flops(sp, sp.method, rows, mid).values()) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
