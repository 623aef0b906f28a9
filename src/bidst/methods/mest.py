"""MEST (Yuan et al. 2021): drop by |w| + lambda |g| on active weights, regrow at random, every few epochs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..scores import drop_lowest
from .base import METHODS, Stateless, require_choice, require_range
from .common import random_grow, scheduled_budgets
from .schedule import UpdateSchedule

if TYPE_CHECKING:
    from ..engine import Sparsifier


@METHODS.register("mest")
@dataclass
class MEST(Stateless, UpdateSchedule):
    """Memory-economic sparse training with elastic mutation (EM) and the soft memory bound (EM&S).

    The drop score uses only the gradients of active weights (no dense gradient). Under `ems`
    the run starts `ems_gap` below the target sparsity and mutation grows fewer weights than
    it drops until the target is reached at `ems_end_fraction` of training (a pruning step of its own there
    unless a mutation falls on it, so the run always ends at the target).
    """

    name: ClassVar[str] = "mest"
    default_distribution: ClassVar[str] = "erk"
    backends: ClassVar[tuple[str, ...]] = ("masked", "sparse")  # uses only the engine's weight/grad accessors
    drop_fraction: float = 0.1  # mutation ratio, decayed linearly
    interval: float = 5.0  # every 5 epochs (fractions allowed)
    interval_unit: str = "epochs"
    decay: str = "linear"
    grad_weight: float = 1.0  # lambda in |w| + lambda |g| (MEST's code defaults to 0.5)
    variant: str = "em"  # "em" (elastic mutation) or "ems" (EM with the soft memory bound)
    ems_gap: float = 0.1  # EM&S starts at target sparsity minus this gap
    ems_end_fraction: float = 0.5  # EM&S reaches the target sparsity here

    def validate(self) -> None:
        super().validate()
        require_choice(self.name, "variant", self.variant, ("em", "ems"))
        require_range(self.name, "ems_gap", self.ems_gap, 0.0, 1.0)
        require_range(self.name, "ems_end_fraction", self.ems_end_fraction, 0.0, 1.0)

    def ems_end(self, sp: Sparsifier) -> int:
        """The step at which EM&S reaches the target sparsity."""
        return max(1, int(self.ems_end_fraction * sp.total_steps))

    def mutates(self, step: int, sp: Sparsifier) -> bool:
        """Whether the topology changes after `step`: the mutation schedule, and EM&S's end step."""
        return self.is_update(step, sp) or (self.variant == "ems" and step == self.ems_end(sp))

    def _start_density(self, sp: Sparsifier) -> float:
        return min(1.0, 1.0 - sp.sparsity + self.ems_gap) if self.variant == "ems" else 1.0 - sp.sparsity

    def setup(self, sp: Sparsifier) -> None:
        if self.variant == "ems":
            sp.random_masks(scheduled_budgets(sp, self._start_density(sp), 0, 0, 1))
        else:
            sp.random_masks()

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        return False

    def planned_costs(self, sp: Sparsifier, rows: dict[str, int]) -> dict[str, float]:
        """The drop score |w| + λ|g|, 3 FLOPs per active weight at each mutation, at the budgets held then."""
        del rows
        changes = self.budget_changes(sp, sp.total_steps)
        if changes is None:  # EM: the same budgets at every mutation
            held = [sp.budgets] * sum(1 for s in range(1, sp.total_steps + 1) if self.is_update(s, sp))
        else:  # EM&S: one change per mutation, each scored at the budgets held before it
            held = [budgets for _, budgets in changes[:-1]]
        return {"scoring": sum(3.0 * sum(b[n] for n in sp.sparse_names()) for b in held)}

    def budget_changes(self, sp: Sparsifier, steps: int) -> list[tuple[int, dict[str, int]]] | None:
        """Under `ems`, (step, budgets) from the start budgets through each mutation's (for FLOPs plans, see
        GMP.budget_changes); None under `em`, whose budgets do not change."""
        if self.variant != "ems":
            return None
        end = self.ems_end(sp)
        start = self._start_density(sp)
        mutations = [(s, scheduled_budgets(sp, start, s, 0, end)) for s in range(1, steps + 1) if self.mutates(s, sp)]
        return [(0, scheduled_budgets(sp, start, 0, 0, 1)), *mutations]

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        if not self.mutates(step, sp):
            return False
        if self.variant == "ems":
            budgets = scheduled_budgets(sp, self._start_density(sp), step, 0, self.ems_end(sp))
        else:
            budgets = dict(sp.budgets)
        fraction = self.fraction(step, sp) if self.is_update(step, sp) else 0.0  # EM&S's end step only prunes
        # the score |w| + lambda |g| over the active weights: 3 FLOPs per active weight
        sp.add_cost("scoring", 3.0 * sum(sp.budgets[n] for n in sp.sparse_names()))
        changed = False
        for n in sp.sparse_names():
            grad = sp.grad(n)
            score = sp.weight(n).abs()
            if grad is not None:
                score = score + self.grad_weight * grad.abs()
            shrink = max(0, sp.budgets[n] - budgets[n])
            k = min(int(round(fraction * budgets[n])), sp.numel[n] - sp.budgets[n])
            k = max(0, min(k, sp.budgets[n] - shrink - 1))
            if k + shrink == 0:
                continue
            eligible = ~sp.masks[n]
            drop = drop_lowest(score, sp.masks[n], k + shrink)
            grow = random_grow(sp)(n, eligible, k)
            sp.change(n, drop, grow)
            changed = True
        return changed
