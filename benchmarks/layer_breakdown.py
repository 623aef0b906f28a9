"""Where one sparse layer's training step spends its time, against dense: the profile behind a missed per-layer target.

For one Conv2d or Linear shape and each sparsity, in one process on an idle machine:

- `dense` / `sparse`: a layer step (forward + input grad + weight grad), timed as `bidst bench` does
  (alternating blocks of consecutive steps, median), and their ratio;
- `kernels`: the share of a sparse step's self time (torch.profiler) spent inside the sparse
  autograd functions (the Numba kernels and their Python glue); the rest is autograd, allocation
  and the gradient bookkeeping;
- `alone`: the three conv kernels (forward, input grad, weight grad) called directly on the same
  preallocated buffers every time (timed like `sparse`, in blocks after dense ones): no autograd,
  allocation, page faults or bias gradient. The gap to `sparse` is what a step adds around its
  kernels;
- `empty`: the sparse step with no active weight at all, i.e. the passes that do not shrink with
  density (writing the output and the input gradient) plus the fixed overhead;
- `floor`: the memory traffic no sparse step can avoid, alone: reading the input and the output gradient
  and writing the output and the input gradient (two tensor copies of those sizes, timed like `sparse`,
  after the dense steps that evict them from cache). A step that sparsity cannot make cheaper;
- `faults`: minor page faults per step, dense / sparse: glibc hands large freed blocks back to the
  OS, so fresh activations are mapped in again page by page;
- `retained`: dense, sparse and their ratio again after `mallopt` makes glibc keep freed memory
  (what jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends, also do).

    python benchmarks/layer_breakdown.py                      # ResNet-32's 16->16 3x3 @32, batch 64, 2 threads
    python benchmarks/layer_breakdown.py --layer conv:64:64:8 --sparsities 0.9,0.98
    python benchmarks/layer_breakdown.py --layer linear:1024:1024 --batch 256
"""

from __future__ import annotations

import argparse
import ctypes
import math
import resource
import statistics
import sys
import time

import numpy as np
import torch

from bidst.bench import Layer, Step, Timer, layer_steps, random_mask
from bidst.sparse import SparseStructure, set_threads
from bidst.sparse.conv import (
    ConvGeometry,
    chwn_forward,
    chwn_input_grad,
    chwn_weight_grad,
)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit


def parse_layer(spec: str, batch: int) -> Layer:
    """`conv:CIN:COUT:SIZE[:K[:STRIDE]]` or `linear:IN:OUT` as a bench Layer."""
    kind, *numbers = spec.split(":")
    try:
        values = [int(v) for v in numbers]
    except ValueError:
        raise SystemExit(f"layer_breakdown: --layer {spec!r}: sizes must be integers") from None
    if any(v < 1 for v in values):
        raise SystemExit(f"layer_breakdown: --layer {spec!r}: sizes must be at least 1")
    if kind == "conv" and 3 <= len(values) <= 5:
        cin, cout, size, *rest = values
        k, stride = (rest + [3, 1][len(rest):])[:2]
        return Layer(f"Conv {cin}->{cout} {k}x{k} s{stride} @{size}, b{batch}", "conv", batch, cin, cout, size, k, stride)
    if kind == "linear" and len(values) == 2:
        return Layer(f"Linear {values[0]}->{values[1]}, b{batch}", "linear", batch, values[0], values[1])
    raise SystemExit(f"layer_breakdown: --layer {spec!r}: expected conv:CIN:COUT:SIZE[:K[:STRIDE]] or linear:IN:OUT")


def kernels_alone(layer: Layer, density: float, gen: torch.Generator) -> Step | None:
    """A conv layer's three sparse kernels on preallocated (C, H, W, N) buffers, called directly; None for Linear."""
    if layer.kind != "conv":
        return None
    s = SparseStructure.from_mask(random_mask((layer.cout, layer.cin, layer.k, layer.k), density, gen))
    geom = ConvGeometry((layer.stride, layer.stride), (layer.padding, layer.padding))
    out = (layer.size + 2 * layer.padding - layer.k) // layer.stride + 1
    xt = torch.randn(layer.cin, layer.size, layer.size, layer.batch, generator=gen).numpy()
    dyt = torch.randn(layer.cout, out, out, layer.batch, generator=gen).numpy()
    values = torch.randn(s.nnz, generator=gen).numpy()
    bias = np.zeros(layer.cout, np.float32)
    y, dxt, dv = np.empty_like(dyt), np.empty_like(xt), np.empty_like(values)

    def run() -> None:
        chwn_forward(s, geom, values, bias, xt, y)
        chwn_input_grad(s, geom, values, dyt, dxt)
        chwn_weight_grad(s, geom, dyt, xt, dv)

    return run


def memory_floor(layer: Layer, gen: torch.Generator) -> Step:
    """Two copies that move the bytes every sparse layer step moves at least: input and output gradient read,
    output and input gradient written (fp32)."""
    out = (layer.size + 2 * layer.padding - layer.k) // layer.stride + 1 if layer.kind == "conv" else 1
    x = torch.randn(layer.batch * layer.cin * (layer.size**2 if layer.kind == "conv" else 1), generator=gen)
    dy = torch.randn(layer.batch * layer.cout * out * out, generator=gen)
    y, dx = torch.empty_like(dy), torch.empty_like(x)

    def run() -> None:
        y.copy_(dy)
        dx.copy_(x)

    return run


def faults_per_step(step: Step, steps: int = 6) -> float:
    """Minor page faults per call of `step`, after one warm-up call."""
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def kernel_share(step: Step, steps: int = 10) -> float:
    """The share of `step`'s profiled self time spent in the sparse autograd functions (names ending in Fn / FnBackward)."""
    for _ in range(2):
        step()
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    own = [e for e in events if e.key.startswith("_") and e.key.endswith(("Fn", "FnBackward"))]
    return sum(e.self_cpu_time_total for e in own) / sum(e.self_cpu_time_total for e in events)


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS; False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    never_trim = ctypes.c_int(2**31 - 1)  # mallopt takes a C int: a larger Python int would be truncated (1 << 40 to 0: trim always)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, never_trim))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="conv:16:16:32", help="conv:CIN:COUT:SIZE[:K[:STRIDE]] or linear:IN:OUT")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sparsities", default="0.9,0.95,0.98")
    ap.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    ap.add_argument("--reps", type=int, default=9, help="interleaved repetitions per measurement")
    ap.add_argument("--block", type=int, default=3, help="consecutive steps of one backend per repetition")
    args = ap.parse_args(argv)
    layer = parse_layer(args.layer, args.batch)
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        ap.error(f"--sparsities must be comma-separated numbers, got {args.sparsities!r}")
    if not all(0.0 <= s < 1.0 for s in sparsities) or min(args.reps, args.block, args.batch, args.threads) < 1:
        ap.error("sparsities must lie in [0, 1); --reps, --block, --batch and --threads must be at least 1")
    numba_threads = set_threads(args.threads)
    timer = Timer(time.perf_counter, statistics.median, args.reps, args.block)
    gen = torch.Generator().manual_seed(0)
    steps = {s: layer_steps(layer, 1.0 - s, gen) for s in sparsities}
    _, empty = layer_steps(layer, 0.0, gen)
    rows = []
    for s in sparsities:
        dense, sparse = steps[s]
        td, ts = timer.interleaved(dense, sparse)
        _, te = timer.interleaved(dense, empty)
        _, tf = timer.interleaved(dense, memory_floor(layer, gen))
        alone = kernels_alone(layer, 1.0 - s, gen)
        ta = timer.interleaved(dense, alone)[1] if alone else float("nan")
        rows.append([s, td, ts, kernel_share(sparse), ta, te, tf, faults_per_step(dense), faults_per_step(sparse)])
    retained = retain_freed_memory()
    for row in rows:
        td, ts = timer.interleaved(*steps[row[0]]) if retained else (float("nan"), float("nan"))
        row += [td, ts]
    command = " ".join(["python benchmarks/layer_breakdown.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"{layer.name}: `{command}`")
    print(f"{args.threads} torch / {numba_threads} Numba thread(s), median of {args.reps} repetitions of {args.block} steps, wall clock, ms per step\n")
    print("| sparsity | dense | sparse | ratio | kernels | alone | empty | floor (ratio) | faults dense / sparse "
          "| retained: dense | sparse | ratio |")
    print("|" + " --- |" * 12)
    for s, td, ts, tk, ta, te, tf, fd, fs, rd, rs in rows:
        alone = "-" if math.isnan(ta) else f"{ta * 1e3:.2f}"  # conv layers only
        print(f"| {s:.0%} | {td * 1e3:.2f} | {ts * 1e3:.2f} | {ts / td:.3f} | {tk:.0%} | {alone} | {te * 1e3:.2f} "
              f"| {tf * 1e3:.2f} ({tf / td:.3f}) | {fd:.0f} / {fs:.0f} | {rd * 1e3:.2f} | {rs * 1e3:.2f} | {rs / rd:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
