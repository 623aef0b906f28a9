"""RigL (Evci et al. 2020): drop the smallest magnitudes, grow where the dense gradient is largest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .base import METHODS, Stateless
from .common import gradient_grow, magnitude_drop, prune_and_grow, silent
from .schedule import UpdateSchedule

if TYPE_CHECKING:
    from ..engine import Sparsifier


@METHODS.register("rigl")
@dataclass
class RigL(Stateless, UpdateSchedule):
    """RigL at ERK: every 100 steps swap a cosine-decayed 30% of each layer, until 75% of training.

    The dense gradient is captured only at update steps; new weights start at zero with their
    optimizer state reset.
    """

    name: ClassVar[str] = "rigl"
    default_distribution: ClassVar[str] = "erk"
    backends: ClassVar[tuple[str, ...]] = ("masked", "sparse")  # uses only the engine's weight/grad accessors

    def setup(self, sp: Sparsifier) -> None:
        sp.random_masks()

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        return self.is_update(step, sp)

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        if not self.is_update(step, sp) or dense_grads is None:
            return False
        return prune_and_grow(
            sp, self.fraction(step, sp), magnitude_drop(sp), gradient_grow(dense_grads), silent(dense_grads)
        )
