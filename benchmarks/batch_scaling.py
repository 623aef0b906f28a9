"""A whole training step, sparse over dense, as the batch grows: how much of the sparse step does not shrink.

`bidst bench` times each model at one batch size (the MLP at 256). Part of a sparse step costs the
same at any batch (Python, autograd, the optimizer, kernel launches), part grows with it (the
kernels, ReLU, the dense classifier). This script times the same steps as `bidst bench` (RigL
through a `backend="sparse"` Sparsifier against the dense model, no topology update, dense and
sparse in interleaved blocks) at several batch sizes and prints ms per step and their ratio, so
the per-step cost that does not scale with the batch can be read off the small batches.

For the MLP it also times the sparse step with its Numba kernels replaced by fills of their outputs
(`no kernels`, against dense in its own interleaved blocks): everything the step does besides the
sparse arithmetic. The fills write 0.01, so what follows sees ordinary floats.

    python benchmarks/batch_scaling.py                        # MLP 1024x3 at 98%, 2 threads
    python benchmarks/batch_scaling.py --sparsity 0.95 --batches 16,256,1024 --reps 15
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bidst.bench import MODELS, Timer, training_steps
from bidst.sparse import _kernels_linear as KL
from bidst.sparse import set_threads

# the sparse Linear kernels and the positions of the arrays each one writes
OUTPUTS = {"spmm_t": (7,), "sddmm_t": (6,), "spmm_sddmm_t": (7, 8), "transpose": (1,), "sampled_dot_t": (4,)}


@contextlib.contextmanager
def kernels_as_fills() -> Iterator[None]:
    """Within the block, each sparse Linear kernel only fills its outputs with 0.01."""

    def fill(positions: tuple[int, ...]) -> Callable[..., None]:
        def kernel(*arrays: Any) -> None:
            for i in positions:
                arrays[i].fill(0.01)

        return kernel

    saved = {name: getattr(KL, name) for name in OUTPUTS}
    for name, positions in OUTPUTS.items():
        setattr(KL, name, fill(positions))
    try:
        yield
    finally:
        for name, kernel in saved.items():
            setattr(KL, name, kernel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="MLP 1024x3", choices=list(MODELS))
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--batches", default="8,32,64,128,256,512")
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions of 3 steps each")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not 0.0 <= args.sparsity < 1.0 or min(batches) < 1 or args.reps < 1 or args.threads < 1:
        parser.error("need 0 <= --sparsity < 1 and positive --batches, --reps and --threads")
    numba_threads = set_threads(args.threads)
    timer = Timer(time.perf_counter, statistics.median, args.reps, 3)
    gen = torch.Generator().manual_seed(0)
    print(f"{args.model} at {args.sparsity:.0%}, {args.threads} torch / {numba_threads} Numba thread(s), "
          f"median of {args.reps} x 3 steps, wall clock")
    linear = args.model.startswith("MLP")
    extra = " no kernels ms | no kernels / dense |" if linear else ""
    print("| batch | dense ms | sparse ms | sparse / dense |" + extra)
    print("| --- | --- | --- | --- |" + " --- | --- |" * linear)
    for batch in batches:
        dense, sparse, _, _ = training_steps(args.model, 1.0 - args.sparsity, 10**9, gen, timer.clock, batch)
        td, ts = timer.interleaved(dense, sparse)
        row = f"| {batch} | {td * 1e3:.2f} | {ts * 1e3:.2f} | {ts / td:.3f} |"
        if linear:
            dense, sparse, _, _ = training_steps(args.model, 1.0 - args.sparsity, 10**9, gen, timer.clock, batch)

            def without_kernels(step: Callable[[], None] = sparse) -> None:
                with kernels_as_fills():
                    step()

            td0, tn = timer.interleaved(dense, without_kernels)
            row += f" {tn * 1e3:.2f} | {tn / td0:.3f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
