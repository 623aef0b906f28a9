"""The update schedule options shared by the prune-and-grow methods (SET, RigL, SNFS, MEST, GraNet)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import BidstError
from ..schedules import cosine_decay, is_update_step, linear_decay
from .base import require_choice, require_range

if TYPE_CHECKING:
    from ..engine import Sparsifier

DECAYS = ("cosine", "linear", "constant")
UNITS = ("steps", "epochs")


@dataclass
class UpdateSchedule:
    """Topology updates every `interval` steps (or epochs) until `stop_fraction` of training.

    The drop fraction starts at `drop_fraction` and decays (`decay`) to zero at the stop step.
    """

    drop_fraction: float = 0.3  # RigL's alpha
    interval: float = 100  # RigL's Delta T
    interval_unit: str = "steps"  # "steps" or "epochs" (MEST counts epochs)
    stop_fraction: float = 0.75  # no topology change after this share of training
    decay: str = "cosine"  # how the drop fraction decays

    def validate(self) -> None:
        name = getattr(self, "name", "method")
        require_range(name, "drop_fraction", self.drop_fraction, 0.0, 1.0)
        require_range(name, "stop_fraction", self.stop_fraction, 0.0, 1.0)
        require_range(name, "interval", self.interval, 0, float("inf"), above_lo=True)
        require_choice(name, "decay", self.decay, DECAYS)
        require_choice(name, "interval_unit", self.interval_unit, UNITS)
        if self.interval_unit == "steps" and self.interval != int(self.interval):
            raise BidstError(f"option 'interval' of method {name!r} counts steps (interval_unit: steps), so it must "
                             f"be a whole number, got {self.interval}")

    def stop_step(self, sp: Sparsifier) -> int:
        return int(self.stop_fraction * sp.total_steps)

    def is_update(self, step: int, sp: Sparsifier) -> bool:
        """Whether the topology is revised after optimizer step `step`."""
        return is_update_step(step, sp.steps(self.interval, self.interval_unit), self.stop_step(sp))

    def fraction(self, step: int, sp: Sparsifier) -> float:
        """The drop fraction at `step`."""
        end = self.stop_step(sp)
        if self.decay == "cosine":
            return cosine_decay(step, self.drop_fraction, end)
        if self.decay == "linear":
            return linear_decay(step, self.drop_fraction, end)
        return self.drop_fraction
