"""Methods without topology changes: dense training and static sparse masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .base import METHODS, Stateless

if TYPE_CHECKING:
    from ..engine import Sparsifier


@METHODS.register("dense")
@dataclass
class Dense(Stateless):
    """The dense reference: every weight active, no mask work."""

    name: ClassVar[str] = "dense"
    default_distribution: ClassVar[str] = "uniform"
    backends: ClassVar[tuple[str, ...]] = ("masked", "sparse")  # masks chosen before the sparse swap

    def setup(self, sp: Sparsifier) -> None:
        del sp

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        return False

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        return False


@METHODS.register("static")
@dataclass
class Static(Dense):
    """Random masks at the layer-wise densities, fixed for the whole run: the floor DST must beat."""

    name: ClassVar[str] = "static"
    default_distribution: ClassVar[str] = "erk"

    def setup(self, sp: Sparsifier) -> None:
        sp.random_masks()
