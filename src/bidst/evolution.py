"""Mask evolution analytics: IoU between masks, the ITOP rate, swaps and per-layer density.

These are the quantities the BiDST paper (Figure 4: IoU of the masks at the start and end of
each 5-epoch interval) and its reviewers (ITOP rate: share of all weights ever active) use to
show how a method explores. Every result is a JSON-able dict keyed by layer name, plus
``"__all__"`` computed over the layers together (all, or those named `pooled`; not a mean of layers).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch

from .errors import BidstError

Masks = Mapping[str, torch.Tensor]

ALL = "__all__"


def _check_same(a: Masks, b: Masks) -> None:
    if a.keys() != b.keys():
        raise BidstError(f"masks name different layers: {sorted(set(a) ^ set(b))}")
    for name in a:
        if a[name].shape != b[name].shape:
            raise BidstError(f"mask {name!r} changed shape: {tuple(a[name].shape)} vs {tuple(b[name].shape)}")


def _counts(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    a, b = a.bool(), b.to(device=a.device, dtype=torch.bool)
    return int((a & b).count_nonzero()), int((a | b).count_nonzero())


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∧ b| / |a ∨ b|; two empty masks are identical, so their IoU is 1.0."""
    inter, union = _counts(a, b)
    return inter / union if union else 1.0


def model_iou(masks_a: Masks, masks_b: Masks, pooled: Collection[str] | None = None) -> dict[str, float]:
    """IoU per layer and over the concatenation of the `pooled` layers (default: all; key ``"__all__"``)."""
    _check_same(masks_a, masks_b)
    out: dict[str, float] = {}
    inter_all = union_all = 0
    for name in masks_a:
        inter, union = _counts(masks_a[name], masks_b[name])
        out[name] = inter / union if union else 1.0
        if pooled is None or name in pooled:
            inter_all, union_all = inter_all + inter, union_all + union
    out[ALL] = inter_all / union_all if union_all else 1.0
    return out


def _ratio_per_layer(
    active: Mapping[str, int], total: Mapping[str, int], pooled: Collection[str] | None = None
) -> dict[str, float]:
    out = {n: active[n] / total[n] if total[n] else 0.0 for n in total}
    names = [n for n in total if pooled is None or n in pooled]
    everything = sum(total[n] for n in names)
    out[ALL] = sum(active[n] for n in names) / everything if everything else 0.0
    return out


def density(masks: Masks) -> dict[str, float]:
    """Share of active weights per layer and overall."""
    return _ratio_per_layer(
        {n: int(m.count_nonzero()) for n, m in masks.items()}, {n: m.numel() for n, m in masks.items()}
    )


def swaps(old: Masks, new: Masks) -> dict[str, int]:
    """Positions that became active between `old` and `new`, per layer and overall."""
    _check_same(old, new)
    out = {n: int((new[n].bool() & ~old[n].to(new[n].device, torch.bool)).count_nonzero()) for n in new}
    out[ALL] = sum(out.values())
    return out


def _cpu_masks(masks: Masks) -> dict[str, torch.Tensor]:
    return {n: m.detach().to("cpu", torch.bool).clone() for n, m in masks.items()}


class ItopTracker:
    """Keeps, per layer, which weights were ever active; the ITOP rate is their share."""

    def __init__(self) -> None:
        self.ever: dict[str, torch.Tensor] = {}

    def update(self, masks: Masks) -> None:
        """Mark the active weights of `masks` as explored (on the masks' device)."""
        for name, mask in masks.items():
            seen = self.ever.get(name)
            mask = mask.detach().bool()
            self.ever[name] = mask.clone() if seen is None else seen.to(mask.device) | mask

    def rate(self, pooled: Collection[str] | None = None) -> dict[str, float]:
        """Share of weights ever active, per layer and over the `pooled` layers (default: all)."""
        return _ratio_per_layer(
            {n: int(e.count_nonzero()) for n, e in self.ever.items()},
            {n: e.numel() for n, e in self.ever.items()},
            pooled,
        )

    def state_dict(self) -> dict[str, Any]:
        """Bool CPU tensors only (loadable with torch.load(weights_only=True))."""
        return {"ever": _cpu_masks(self.ever)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved; tensors move to the masks' device on the next update."""
        self.ever = _cpu_masks(state["ever"])


class MaskEvolution:
    """Tracks a run's masks and returns the ``{"kind": "mask", ...}`` records the loop logs.

    Call `update(masks, epoch)` once before training with ``epoch=0`` and at the end of every
    epoch with the number of completed epochs, and `topology_change(old, new)` at every commit
    (with a copy of the mask taken before the change). The first `update` is the reference of
    the first IoU interval; an interval closes when `interval` epochs have passed since it began.
    `pooled` names the layers whose weights the overall ITOP rate and IoU pool (default: all): the
    sparsified ones, since a layer kept dense is all explored and unchanged from the start.
    """

    def __init__(self, interval: int = 5, pooled: Collection[str] | None = None) -> None:
        if interval < 1:
            raise BidstError(f"mask IoU interval must be at least 1 epoch, got {interval}")
        self.interval = interval
        self.pooled = None if pooled is None else set(pooled)
        self.itop = ItopTracker()
        self._reference: dict[str, torch.Tensor] | None = None
        self._reference_epoch = 0
        self._swaps: dict[str, int] = {}
        self._changes = 0

    def topology_change(self, old: Masks, new: Masks) -> dict[str, int]:
        """Count the swaps of one topology change, update the ITOP rate, and return the swaps."""
        return self.commit(swaps(old, new), new)

    def commit(self, grown: Mapping[str, int], new: Masks) -> dict[str, int]:
        """Record a topology change whose grown positions per layer are already known."""
        counted = {n: int(k) for n, k in grown.items() if n != ALL}
        counted[ALL] = sum(counted.values())
        for name, n in counted.items():
            self._swaps[name] = self._swaps.get(name, 0) + n
        self._changes += 1
        self.itop.update(new)
        return counted

    def update(self, masks: Masks, epoch: int) -> dict[str, Any]:
        """The mask record for `epoch`: density, ITOP rate, topology changes (``commits``) and
        ``swaps`` since the last record, and the IoU of the interval (``iou``,
        ``iou_interval`` = [start, end]) when one closes here."""
        self.itop.update(masks)
        record: dict[str, Any] = {
            "kind": "mask",
            "epoch": epoch,
            "density": density(masks),
            "itop": self.itop.rate(self.pooled),
            "commits": self._changes,
            "swaps": self._swaps or {ALL: 0},
        }
        self._swaps, self._changes = {}, 0
        if self._reference is None:
            self._reference, self._reference_epoch = _cpu_masks(masks), epoch
        elif epoch - self._reference_epoch >= self.interval:
            current = _cpu_masks(masks)
            record["iou"] = model_iou(self._reference, current, self.pooled)
            record["iou_interval"] = [self._reference_epoch, epoch]
            self._reference, self._reference_epoch = current, epoch
        return record

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and bool CPU tensors, for checkpoints."""
        return {
            "interval": self.interval,
            "itop": self.itop.state_dict(),
            "reference": self._reference,
            "reference_epoch": self._reference_epoch,
            "swaps": dict(self._swaps),
            "changes": self._changes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.interval = int(state["interval"])
        self.itop.load_state_dict(state["itop"])
        reference = state["reference"]
        self._reference = None if reference is None else _cpu_masks(reference)
        self._reference_epoch = int(state["reference_epoch"])
        self._swaps = {str(k): int(v) for k, v in state["swaps"].items()}
        self._changes = int(state["changes"])
