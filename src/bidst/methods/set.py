"""SET (Mocanu et al. 2018): drop the smallest positive and negative weights, regrow at random."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..scores import set_drop
from .base import METHODS, Stateless
from .common import prune_and_grow, random_grow
from .schedule import UpdateSchedule

if TYPE_CHECKING:
    from ..engine import Sparsifier


@METHODS.register("set")
@dataclass
class SET(Stateless, UpdateSchedule):
    """Sparse Evolutionary Training with ER initialisation and RigL's update schedule."""

    name: ClassVar[str] = "set"
    default_distribution: ClassVar[str] = "er"
    backends: ClassVar[tuple[str, ...]] = ("masked", "sparse")  # uses only the engine's weight/grad accessors

    def setup(self, sp: Sparsifier) -> None:
        sp.random_masks()

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        return False

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        if not self.is_update(step, sp):
            return False
        return prune_and_grow(
            sp,
            self.fraction(step, sp),
            lambda n, k: set_drop(sp.weight(n), sp.masks[n], k),
            random_grow(sp),
        )
