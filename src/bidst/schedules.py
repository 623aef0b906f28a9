"""Schedules as pure functions of the global optimizer step (1-based: the step just taken)."""

from __future__ import annotations

import math


def is_update_step(step: int, interval: int, stop_step: int, start_step: int = 0) -> bool:
    """True when the topology may change after optimizer step `step` (every `interval` steps)."""
    return interval > 0 and start_step < step <= stop_step and (step - start_step) % interval == 0


def cosine_decay(step: int, initial: float, end_step: int) -> float:
    """RigL's drop fraction: `initial` decayed to zero by a half cosine over `end_step` steps."""
    if end_step <= 0:
        return 0.0
    progress = min(max(step / end_step, 0.0), 1.0)
    return 0.5 * initial * (1.0 + math.cos(math.pi * progress))


def linear_decay(step: int, initial: float, end_step: int) -> float:
    """`initial` decayed linearly to zero by `end_step`."""
    if end_step <= 0:
        return 0.0
    return initial * max(0.0, 1.0 - step / end_step)


def cubic_sparsity(step: int, initial: float, final: float, start_step: int, end_step: int) -> float:
    """Zhu & Gupta's gradual pruning: sparsity from `initial` to `final` on a cubic curve."""
    if step <= start_step:
        return initial
    if step >= end_step or end_step <= start_step:
        return final
    remaining = 1.0 - (step - start_step) / (end_step - start_step)
    return final + (initial - final) * remaining**3

