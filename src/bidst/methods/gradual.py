"""Dense-to-sparse methods: GMP (Zhu & Gupta 2017) and GraNet (Liu et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..schedules import cosine_decay, is_update_step
from .base import METHODS, Stateless, require_range
from .common import (
    gradient_grow,
    magnitude_drop,
    prune_and_grow,
    scheduled_budgets,
    silent,
)

if TYPE_CHECKING:
    from ..engine import Sparsifier


@METHODS.register("gmp")
@dataclass
class GMP(Stateless):
    """Gradual magnitude pruning: start dense, prune each layer on a cubic schedule to its target."""

    name: ClassVar[str] = "gmp"
    default_distribution: ClassVar[str] = "uniform"
    backends: ClassVar[tuple[str, ...]] = ("masked", "sparse")  # uses only the engine's weight/grad accessors
    interval: int = 100  # prune every this many steps
    start_fraction: float = 0.0  # pruning starts here (share of training)
    end_fraction: float = 0.75  # and reaches the target here
    initial_sparsity: float = 0.0  # 0 = dense start

    def validate(self) -> None:
        require_range(self.name, "start_fraction", self.start_fraction, 0.0, 1.0)
        require_range(self.name, "end_fraction", self.end_fraction, self.start_fraction, 1.0)
        require_range(self.name, "initial_sparsity", self.initial_sparsity, 0.0, 0.999)
        require_range(self.name, "interval", self.interval, 1, float("inf"))

    def _window(self, sp: Sparsifier) -> tuple[int, int]:
        return int(self.start_fraction * sp.total_steps), int(self.end_fraction * sp.total_steps)

    def _budgets(self, sp: Sparsifier, step: int) -> dict[str, int]:
        start, end = self._window(sp)
        initial = min(1.0 - self.initial_sparsity, 1.0)
        return scheduled_budgets(sp, max(initial, 1.0 - sp.sparsity), step, start, end)

    def setup(self, sp: Sparsifier) -> None:
        if self.initial_sparsity > 0:
            sp.random_masks(self._budgets(sp, 0))

    def _is_update(self, step: int, sp: Sparsifier) -> bool:
        start, end = self._window(sp)
        return is_update_step(step, self.interval, end, start) or step == end

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        return False

    def budget_changes(self, sp: Sparsifier, steps: int) -> list[tuple[int, dict[str, int]]] | None:
        """(step, budgets): the layers hold `budgets` from after `step` on; the initial ones, then each pruning's
        (for FLOPs plans: `bidst.budget.planned_flops`). Uses `sp.total_steps` for the schedule's window."""
        prunes = [(s, self._budgets(sp, s)) for s in range(1, steps + 1) if self._is_update(s, sp)]
        return [(0, self._budgets(sp, 0)), *prunes]

    def _prune(self, sp: Sparsifier, step: int) -> bool:
        budgets = self._budgets(sp, step)
        changed = False
        for n in sp.sparse_names():
            k = sp.budgets[n] - budgets[n]
            if k > 0:
                drop = magnitude_drop(sp)(n, k)
                sp.change(n, drop, drop[:0])
                changed = True
        return changed

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        return self._is_update(step, sp) and self._prune(sp, step)


@METHODS.register("granet")
@dataclass
class GraNet(GMP):
    """GraNet: gradual magnitude pruning plus zero-cost neuroregeneration by gradient.

    At each update the layer is pruned to its scheduled budget, then a fraction of its active
    weights is dropped by magnitude and the same number regrown where the dense gradient is
    largest. That fraction decays by a half cosine over the whole run, not the pruning window, as
    in GraNet's code (which floors it at 0.005), so regeneration goes on to the window's end.
    `initial_sparsity` 0 is the dense-to-sparse variant, > 0 sparse-to-sparse.
    """

    name: ClassVar[str] = "granet"
    default_distribution: ClassVar[str] = "erk"
    initial_sparsity: float = 0.5  # GraNet's s_i
    drop_fraction: float = 0.5  # neuroregeneration fraction, cosine-decayed over the whole run

    def validate(self) -> None:
        super().validate()
        require_range(self.name, "drop_fraction", self.drop_fraction, 0.0, 1.0)

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        return self._is_update(step, sp)

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        if not self._is_update(step, sp) or dense_grads is None:
            return False
        changed = self._prune(sp, step)
        fraction = cosine_decay(step, self.drop_fraction, sp.total_steps)
        grow = gradient_grow(dense_grads)
        return prune_and_grow(sp, fraction, magnitude_drop(sp), grow, silent(dense_grads)) or changed
