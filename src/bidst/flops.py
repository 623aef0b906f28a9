"""Cost accounting: FLOPs of sparse training steps, wall-clock per phase and peak memory.

Conventions (so that every method is counted the same way):

- One multiply-add counts as **2 FLOPs**.
- Only ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` weights are counted. Biases, batch norm, activations,
  pooling and the loss are **excluded**: they cost O(activations), not O(weights), are the same
  for every method at a given model, and so cancel in "relative to dense" (the convention of the
  RigL paper's FLOPs accounting).
- Forward of a layer with ``a`` active weights: ``2·a·P·B``, with ``P`` the layer's output
  positions per sample (``H_out·W_out`` for a 2-d conv, ``H_in·W_in`` for a transposed one, whose
  weights each meet every input position, the product of the leading dims for a ``Linear`` on a
  3-d input, 1 otherwise) and ``B`` the batch size.
- Backward: the input gradient (same as the forward, active weights only) plus the weight
  gradient at the active positions (same again): ``2×`` the forward. The first layer's input
  gradient is counted too (the usual "training = 3× forward" convention).
- A weight gradient at ``k`` positions (an SDDMM of output gradient and input): ``2·k·P·B``; the
  dense weight gradient that RigL and BiDST's gradient exploration take at update steps is the
  same with ``k`` = all weights.
- A dense momentum update (SNFS keeps dense momentum every step): ``flops_per_weight`` (default
  2: ``buf = μ·buf + g``) per weight, batch independent.
"""

from __future__ import annotations

import math
import sys
import time as _time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import BidstError
from .sampled import TRANSPOSED, batched
from .sparse import SparseConv2d, SparseLinear

Masks = Mapping[str, torch.Tensor]

COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED, SparseLinear, SparseConv2d)


@dataclass(frozen=True)
class LayerShape:
    """What the FLOPs of one Conv/Linear weight depend on, captured from a real forward pass."""

    kind: str  # "linear" or "conv"
    in_features: int  # in_channels for a conv
    out_features: int  # out_channels for a conv
    kernel: tuple[int, ...]  # () for a linear layer
    groups: int  # 1 for a linear layer
    in_size: tuple[int, ...]  # per-sample spatial size of the input (conv) or leading dims (linear)
    out_size: tuple[int, ...]  # the same for the output
    positions: int  # output (transposed conv: input) positions per sample, summed over calls if the module is reused
    batch: int  # batch size of the example input
    numel: int  # number of weights


def counted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(weight name, layer) for every Conv/Linear layer (sparse-backend twins included); a weight tied between
    layers has its first layer's name for all of them, as its mask does."""
    owners: dict[int, str] = {}
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, COUNTED):
            key = f"{name}.weight" if name else "weight"
            weight = getattr(module, "weight", None)
            layers.append((owners.setdefault(id(weight), key) if isinstance(weight, nn.Parameter) else key, module))
    return layers


def layer_shapes(model: nn.Module, example_input: Any) -> dict[str, LayerShape]:
    """Run one no-grad forward with hooks and return the shape of every Conv/Linear weight.

    Keys are qualified weight names (``"features.0.weight"``, also for the sparse backend's layers), matching mask keys
    (a weight tied between layers is one key, its first layer's, with the positions of all of them). The model is
    put in eval mode for the pass (so batch-norm statistics do not move) and restored after.
    ``example_input`` is one tensor or a tuple of positional arguments.
    """
    shapes: dict[str, LayerShape] = {}
    handles = []

    def hook_for(key: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            kernel: tuple[int, ...] = ()
            if isinstance(module, (nn.Linear, SparseLinear)):
                kind, groups = "linear", 1
                in_f, out_f = module.in_features, module.out_features
                in_size, out_size = tuple(x.shape[1:-1]), tuple(output.shape[1:-1])
            elif isinstance(module, SparseConv2d):
                kind, kernel, groups = "conv", module.structure.kernel_size, module.structure.groups
                in_f, out_f = module.structure.in_channels, module.structure.shape[0]
                in_size, out_size = tuple(x.shape[2:]), tuple(output.shape[2:])
            else:
                assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED))
                kind, kernel, groups = "conv", tuple(module.kernel_size), module.groups
                in_f, out_f = module.in_channels, module.out_channels
                x, output = batched(module, x), batched(module, output)
                in_size, out_size = tuple(x.shape[2:]), tuple(output.shape[2:])
            batch = x.shape[0] if x.dim() > 1 else 1
            met = in_size if isinstance(module, TRANSPOSED) else out_size  # the positions each weight meets
            previous = shapes.get(key)
            shapes[key] = LayerShape(
                kind=kind,
                in_features=in_f,
                out_features=out_f,
                kernel=kernel,
                groups=groups,
                in_size=previous.in_size if previous else in_size,
                out_size=previous.out_size if previous else out_size,
                positions=math.prod(met) + (previous.positions if previous else 0),
                batch=previous.batch if previous else batch,
                numel=module.structure.numel if isinstance(module, (SparseLinear, SparseConv2d)) else module.weight.numel(),
            )

        return hook

    for key, module in counted_layers(model):
        handles.append(module.register_forward_hook(hook_for(key)))
    modes = {m: m.training for m in model.modules()}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    return shapes


def forward_flops(shape: LayerShape, active: int, batch: int | None = None) -> float:
    """Forward FLOPs of one layer with `active` weights: 2·active·positions·batch."""
    return 2.0 * active * shape.positions * (shape.batch if batch is None else batch)


def weight_grad_flops(shape: LayerShape, k: int, batch: int | None = None) -> float:
    """FLOPs of the weight gradient at `k` positions (SDDMM; k = numel is the dense gradient)."""
    return forward_flops(shape, k, batch)


def backward_flops(shape: LayerShape, active: int, batch: int | None = None) -> float:
    """Backward FLOPs with `active` weights: input gradient plus weight gradient at the actives."""
    return forward_flops(shape, active, batch) + weight_grad_flops(shape, active, batch)


def active_counts(shapes: Mapping[str, LayerShape], masks: Masks | None = None) -> dict[str, int]:
    """Active weights per layer: the mask's count, or all weights for a layer without a mask.

    A mask for a weight that `shapes` does not know (not Conv/Linear) raises BidstError, so a
    naming mismatch never silently counts a sparse model as dense.
    """
    masks = masks or {}
    unknown = sorted(set(masks) - set(shapes))
    if unknown:
        raise BidstError(f"no FLOPs shape for masked weight(s) {', '.join(unknown)}: only Conv/Linear are counted")
    counts = {}
    for name, shape in shapes.items():
        mask = masks.get(name)
        counts[name] = shape.numel if mask is None else int(mask.count_nonzero())
    return counts


def train_step_flops(
    shapes: Mapping[str, LayerShape], masks: Masks | None = None, batch: int | None = None
) -> dict[str, float]:
    """Forward and backward FLOPs of one sparse training step: {"forward": .., "backward": ..}."""
    counts = active_counts(shapes, masks)
    return {
        "forward": sum(forward_flops(s, counts[n], batch) for n, s in shapes.items()),
        "backward": sum(backward_flops(s, counts[n], batch) for n, s in shapes.items()),
    }


def dense_train_step_flops(shapes: Mapping[str, LayerShape], batch: int | None = None) -> float:
    """FLOPs of one dense training step (forward + backward): the reference of "× dense"."""
    return sum(train_step_flops(shapes, None, batch).values())


def dense_grad_flops(shapes: Mapping[str, LayerShape], batch: int | None = None, masks: Masks | None = None) -> float:
    """FLOPs of the dense weight gradient of every layer in `shapes` (RigL / gradient exploration); with `masks`,
    of those with inactive weights only: a layer at density 1 has it from the ordinary backward already."""
    counts = active_counts(shapes, masks) if masks is not None else {n: 0 for n in shapes}
    return sum(weight_grad_flops(s, s.numel, batch) for n, s in shapes.items() if counts[n] < s.numel)


def sampled_grad_flops(
    shapes: Mapping[str, LayerShape], k: Mapping[str, int], batch: int | None = None
) -> float:
    """FLOPs of weight gradients at `k[name]` extra positions per layer (BiDST's candidates)."""
    return sum(weight_grad_flops(shapes[n], kn, batch) for n, kn in k.items())


def momentum_flops(shapes: Mapping[str, LayerShape], flops_per_weight: float = 2.0) -> float:
    """FLOPs of a dense momentum update of every weight (SNFS, every step)."""
    return flops_per_weight * sum(s.numel for s in shapes.values())


def inference_flops(shapes: Mapping[str, LayerShape], masks: Masks | None = None) -> float:
    """Forward FLOPs of the (masked) model for one sample."""
    counts = active_counts(shapes, masks)
    return sum(forward_flops(s, counts[n], 1) for n, s in shapes.items())


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Peak memory so far: CUDA max allocated on a CUDA device, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # Windows has no getrusage
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB elsewhere


class CostMeter:
    """Accumulates FLOPs and exclusive wall-clock time per phase over a run; checkpointable.

    Phases are free-form names ("forward", "backward", "dense_grad", "mask_learning",
    "momentum", "scoring", "unrolled", "rebuild", ...). Timers may nest: an inner phase's time
    is subtracted from the enclosing one, so the time total is the wall-clock spent in any timer.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._flops: dict[str, float] = {}
        self._time: dict[str, float] = {}
        self._dense_flops = 0.0
        self._peak_memory = 0
        self._stack: list[list[float]] = []  # [start, time of nested timers] per open timer

    def add(self, phase: str, flops: float) -> None:
        """Add `flops` to `phase`."""
        self._flops[phase] = self._flops.get(phase, 0.0) + float(flops)

    def add_dense_reference(self, flops: float) -> None:
        """Add what a dense model would have spent on the same step (the "× dense" reference)."""
        self._dense_flops += float(flops)

    def add_train_step(
        self, shapes: Mapping[str, LayerShape], masks: Masks | None, batch: int | None = None
    ) -> None:
        """Count one step's sparse forward/backward and the dense reference for the same batch."""
        for phase, flops in train_step_flops(shapes, masks, batch).items():
            self.add(phase, flops)
        self.add_dense_reference(dense_train_step_flops(shapes, batch))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def time(self, phase: str) -> Iterator[None]:
        """Time the body as `phase` (synchronizing CUDA at both ends so the time is real)."""
        self._sync()
        frame = [_time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._sync()
            self._stack.pop()
            elapsed = _time.perf_counter() - frame[0]
            self._time[phase] = self._time.get(phase, 0.0) + elapsed - frame[1]
            if self._stack:
                self._stack[-1][1] += elapsed

    def peak_memory(self) -> int:
        """Peak memory in bytes over the run, including before a resume."""
        self._peak_memory = max(self._peak_memory, peak_memory_bytes(self.device))
        return self._peak_memory

    def totals(self) -> dict[str, Any]:
        """{"flops": {phase.., "total"}, "time": {phase.., "total"} (seconds), "dense_flops", "peak_memory_bytes"}."""
        return {
            "flops": {**self._flops, "total": sum(self._flops.values())},
            "time": {**self._time, "total": sum(self._time.values())},
            "dense_flops": self._dense_flops,
            "peak_memory_bytes": self.peak_memory(),
        }

    def relative_to(self, dense_total: float | None = None) -> dict[str, float]:
        """FLOPs per phase and in total divided by `dense_total` (default: the dense reference)."""
        dense = self._dense_flops if dense_total is None else float(dense_total)
        if dense <= 0:
            raise BidstError("no dense reference FLOPs to compare with (count at least one step)")
        flops = self.totals()["flops"]
        return {phase: value / dense for phase, value in flops.items()}

    def summary(self, extra_flops: Mapping[str, float] | None = None, dense_total: float | None = None) -> dict[str, Any]:
        """The `flops` and `time` dicts (plus peak memory) for summary.json, see `totals`.

        `extra_flops` adds FLOPs by phase that were counted elsewhere and checkpointed there
        (the Sparsifier's ``costs``: the methods' own work), without changing this meter.
        `dense_total` replaces the accumulated dense reference (e.g. dense training of a whole
        schedule that this run was cut short of).
        """
        totals = self.totals()
        flops = dict(totals["flops"])
        for phase, value in (extra_flops or {}).items():
            flops[phase] = flops.get(phase, 0.0) + float(value)
            flops["total"] += float(value)
        dense = self._dense_flops if dense_total is None else float(dense_total)
        flops["dense_reference"] = dense
        flops["relative_to_dense"] = flops["total"] / dense if dense > 0 else None
        return {"flops": flops, "time": totals["time"], "peak_memory_bytes": totals["peak_memory_bytes"]}

    def state_dict(self) -> dict[str, Any]:
        """Plain floats only, so a checkpoint can hold it and load it with weights_only=True."""
        return {
            "flops": dict(self._flops),
            "time": dict(self._time),
            "dense_flops": self._dense_flops,
            "peak_memory_bytes": self.peak_memory(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore totals saved by `state_dict` (timers are not open across a checkpoint)."""
        self._flops = {str(k): float(v) for k, v in state["flops"].items()}
        self._time = {str(k): float(v) for k, v in state["time"].items()}
        self._dense_flops = float(state["dense_flops"])
        self._peak_memory = max(self._peak_memory, int(state["peak_memory_bytes"]))
