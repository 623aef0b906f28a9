"""SNFS (Dettmers & Zettlemoyer 2019): grow by momentum, redistribute layer budgets by momentum."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..scores import grow_highest
from .base import METHODS, require_range
from .common import allocate, magnitude_drop
from .schedule import UpdateSchedule

if TYPE_CHECKING:
    from ..engine import Sparsifier


@METHODS.register("snfs")
@dataclass
class SNFS(UpdateSchedule):
    """Sparse momentum: drop by magnitude, regrow where the dense momentum is largest.

    SNFS keeps an exponentially averaged dense gradient (its own momentum, a dense cost every
    step) and moves budget between layers in proportion to the mean momentum magnitude of their
    active weights, so per-layer counts change while the total stays fixed. The optimizer's own
    state still follows the engine's rules (cleared at changed positions). The schedule is RigL's
    (until 75% of training), as google-research/rigl runs SNFS; Dettmers' code updates every epoch
    to the end of training (`stop_fraction=1.0, interval=1, interval_unit="epochs"`).
    """

    name: ClassVar[str] = "snfs"
    default_distribution: ClassVar[str] = "erk"
    backends: ClassVar[tuple[str, ...]] = ("masked", "sparse")  # uses only the engine's weight/grad accessors
    # layer budgets move (a full layer cannot regrow what it drops, even without redistribute): the FLOPs plan and
    # record count a dense gradient for every changeable layer, density-1 ones included
    moves_budgets: ClassVar[bool] = True
    drop_fraction: float = 0.5  # SNFS prune rate
    momentum: float = 0.9  # decay of the dense momentum used for growth and redistribution
    redistribute: bool = True  # move budget between layers by momentum
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def validate(self) -> None:
        super().validate()
        require_range(self.name, "momentum", self.momentum, 0.0, 1.0)

    def setup(self, sp: Sparsifier) -> None:
        sp.random_masks()

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        return step <= self.stop_step(sp)

    def planned_costs(self, sp: Sparsifier, rows: dict[str, int]) -> dict[str, float]:
        """The dense momentum's update, 2 FLOPs per weight of every changeable layer at each dense-gradient step."""
        del rows
        steps = sum(1 for s in range(1, sp.total_steps + 1) if self.wants_dense_grad(s, sp))
        return {"momentum": steps * 2.0 * sum(sp.numel[n] for n in sp.sparse_names())}

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        if dense_grads is None:
            return False
        sp.add_cost("momentum", 2.0 * sum(sp.numel[n] for n in sp.sparse_names()))
        for name in sp.sparse_names():
            grad = dense_grads[name]
            buf = self._buffers.get(name)
            buf = torch.zeros_like(grad) if buf is None else buf.to(grad.device)
            self._buffers[name] = buf.mul_(self.momentum).add_(grad)
        if not self.is_update(step, sp):
            return False
        fraction = self.fraction(step, sp)
        names = sp.sparse_names()
        drops = {n: min(int(round(fraction * sp.budgets[n])), sp.budgets[n] - 1) for n in names}
        if self.redistribute:
            shares = {n: float(self._buffers[n][sp.masks[n]].abs().mean()) for n in names}
        else:
            shares = {n: float(drops[n]) for n in names}
        caps = {n: sp.numel[n] - sp.budgets[n] for n in names}
        grows = allocate(sum(drops.values()), shares, caps)
        if sum(grows.values()) < sum(drops.values()):  # not enough room anywhere: shrink the drops
            excess = sum(drops.values()) - sum(grows.values())
            for n in names:
                cut = min(excess, drops[n])
                drops[n] -= cut
                excess -= cut
        changed = False
        drop_fn = magnitude_drop(sp)
        for n in names:
            if drops[n] == 0 and grows[n] == 0:
                continue
            eligible = ~sp.masks[n]
            drop = drop_fn(n, drops[n])
            grow = grow_highest(self._buffers[n].abs(), eligible, grows[n])
            sp.change(n, drop, grow)
            changed = True
        return changed

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": {n: b.detach().cpu().clone() for n, b in self._buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._buffers = {n: b.clone() for n, b in state["buffers"].items()}
