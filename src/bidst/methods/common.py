"""Building blocks the DST methods share: one prune-and-grow round and scheduled budgets."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import torch

from ..density import layer_budgets, layer_densities
from ..schedules import cubic_sparsity
from ..scores import drop_lowest, grow_highest, magnitude, random_scores

if TYPE_CHECKING:
    from ..engine import Sparsifier

DropFn = Callable[[str, int], torch.Tensor]
GrowFn = Callable[[str, torch.Tensor, int], torch.Tensor]


def prune_and_grow(
    sp: Sparsifier, fraction: float, drop_fn: DropFn, grow_fn: GrowFn, skip: Collection[str] = ()
) -> bool:
    """In every sparse layer but those in `skip` swap round(fraction * active) weights: drop by `drop_fn`,
    grow by `grow_fn`.

    Growth is restricted to positions inactive before the round, so a weight just dropped is not
    regrown in the same round. Returns True if any position changed.
    """
    changed = False
    for name in sp.sparse_names():
        if name in skip:
            continue
        active = sp.budgets[name]
        k = min(int(round(fraction * active)), sp.numel[name] - active, active - 1)
        if k <= 0:
            continue
        eligible = ~sp.masks[name]
        drop = drop_fn(name, k)
        grow = grow_fn(name, eligible, k)
        sp.change(name, drop, grow)
        changed = True
    return changed


def scheduled_budgets(
    sp: Sparsifier, initial_density: float, step: int, start_step: int, end_step: int
) -> dict[str, int]:
    """Per-layer budgets on Zhu & Gupta's cubic schedule from `initial_density` to the targets."""
    start = layer_densities(sp.shapes, initial_density, sp.distribution, sp.dense_names)
    densities = {
        n: 1.0 - cubic_sparsity(step, 1.0 - start[n], 1.0 - sp.target_densities[n], start_step, end_step)
        for n in sp.shapes
    }
    return layer_budgets(sp.numel, densities)


def allocate(total: int, shares: dict[str, float], caps: dict[str, int]) -> dict[str, int]:
    """Split `total` integer units over layers in proportion to `shares`, never above `caps`.

    Largest-remainder rounding; what a capped layer cannot take is redistributed to the others.
    """
    alloc = {n: 0 for n in shares}
    remaining = min(total, sum(caps.values()))
    open_ = [n for n in shares if caps[n] > 0]
    while remaining > 0 and open_:
        weight = sum(max(shares[n], 0.0) for n in open_)
        exact = {
            n: remaining * (max(shares[n], 0.0) / weight if weight > 0 else 1.0 / len(open_))
            for n in open_
        }
        give = {n: min(int(exact[n]), caps[n] - alloc[n]) for n in open_}
        leftover = remaining - sum(give.values())
        for n in sorted(open_, key=lambda n: (-(exact[n] - int(exact[n])), n)):
            if leftover == 0:
                break
            if alloc[n] + give[n] < caps[n]:
                give[n] += 1
                leftover -= 1
        for n in open_:
            alloc[n] += give[n]
        remaining = leftover
        open_ = [n for n in open_ if alloc[n] < caps[n]]
        if not any(give.values()):
            break
    return alloc


def magnitude_drop(sp: Sparsifier) -> DropFn:
    """Drop the k smallest-magnitude active weights of a layer (ranked among the active weights only; ties by
    position, as over the dense weight)."""

    def drop(name: str, k: int) -> torch.Tensor:
        positions, values = sp.active_weights(name)
        return positions[drop_lowest(magnitude(values), torch.ones_like(positions, dtype=torch.bool), k)]

    return drop


def silent(dense_grads: dict[str, torch.Tensor]) -> set[str]:
    """Layers whose dense gradient is zero everywhere (a branch this step's loss did not use): growth by
    gradient has nothing to rank there (it would fill the lowest positions), so such a layer keeps its
    topology this round."""
    return {name for name, grad in dense_grads.items() if not bool(grad.any())}


def gradient_grow(dense_grads: dict[str, torch.Tensor]) -> GrowFn:
    """Grow the k eligible positions with the largest dense-gradient magnitude (RigL)."""
    return lambda name, eligible, k: grow_highest(dense_grads[name].abs(), eligible, k)


def random_grow(sp: Sparsifier) -> GrowFn:
    """Grow k eligible positions uniformly at random from the engine's mask generator."""
    return lambda name, eligible, k: grow_highest(
        random_scores(eligible.shape, sp.rng, eligible.device), eligible, k
    )
