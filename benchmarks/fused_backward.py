"""A sparse Linear layer's backward: the fused kernel against the two kernels it replaced, in one process.

The backward needs the input gradient (an SpMM over the weight's slots grouped by input) and the
weight gradient at the active positions (an SDDMM over its rows). `spmm_sddmm_t` computes both in
one sweep over the by-input slots, so each gathered row of the output gradient serves both;
`spmm_t` + `sddmm_t` is the pair the backward called before. For each sparsity the two are
called in turns on the same random layer and data, each call after a pass over a buffer larger
than the caches (as in a training step, where the layers in between evict the activations), and
the median time of each is printed with their ratio. Results are also checked to agree.

    python benchmarks/fused_backward.py                       # 1024->1024, batch 256, 2 threads
    python benchmarks/fused_backward.py --sparsities 0.9,0.98 --reps 51
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np
import torch

from bidst.sparse import _kernels_linear as KL
from bidst.sparse.linear import _tiled, rows_per_thread
from bidst.sparse.structure import SparseStructure


def timed(fn: Callable[[], None], evict: np.ndarray) -> float:
    """Seconds one call of `fn` takes right after a pass over `evict`."""
    evict += 1.0
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sparsities(text: str) -> list[float]:
    """Comma-separated sparsities, each in [0, 1)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsities must be comma-separated numbers, got {text!r}") from None
    if not all(0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"every sparsity must be in [0, 1), got {text!r}")
    return values


def positive(text: str) -> int:
    """A positive integer."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=positive, default=1024, help="input and output features")
    parser.add_argument("--batch", type=positive, default=256)
    parser.add_argument("--sparsities", type=sparsities, default="0.8,0.9,0.95,0.98")
    parser.add_argument("--reps", type=positive, default=31, help="calls of each, in turns")
    parser.add_argument("--threads", type=positive, default=2)
    args = parser.parse_args()
    if args.threads > numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads {args.threads} is more than the {numba.config.NUMBA_NUM_THREADS} Numba can use here")
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, batch = args.features, args.batch
    evict = np.zeros(8 * 1024 * 1024, np.float32)  # 32 MB
    print(f"Linear {n}->{n}, batch {batch}, {args.threads} thread(s), median of {args.reps} calls, wall clock, ms")
    print("| sparsity | pair (spmm_t + sddmm_t) | fused (spmm_sddmm_t) | fused / pair |")
    print("| --- | --- | --- | --- |")
    for sparsity in args.sparsities:
        s = SparseStructure.from_mask(torch.from_numpy(rng.random((n, n)) >= sparsity))
        values = rng.standard_normal(s.nnz).astype(np.float32)
        dyt, xt = (rng.standard_normal((n, batch)).astype(np.float32) for _ in range(2))
        idx = s.by_input()
        by_input, by_row = _tiled(s, True, batch), _tiled(s, False, batch)
        zeros = np.zeros(n, np.float32)
        pair_dx, pair_dv = np.empty((n, batch), np.float32), np.empty(s.nnz, np.float32)
        fused_dx, fused_dv = np.empty((n, batch), np.float32), np.empty(s.nnz, np.float32)
        per = rows_per_thread(n)

        def pair() -> None:
            KL.spmm_t(*by_input, idx.tcols, values[idx.perm], zeros, dyt, pair_dx)
            KL.sddmm_t(*by_row, s.cols, dyt, xt, pair_dv)

        def fused() -> None:
            KL.spmm_sddmm_t(idx.ptr, per, idx.tcols, idx.perm, values, dyt, xt, fused_dx, fused_dv)

        pair(), fused()
        np.testing.assert_allclose(fused_dx, pair_dx, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fused_dv, pair_dv, rtol=1e-4, atol=1e-4)
        times: dict[str, list[float]] = {"pair": [], "fused": []}
        for _ in range(args.reps):
            times["pair"].append(timed(pair, evict))
            times["fused"].append(timed(fused, evict))
        p, f = (statistics.median(times[k]) * 1e3 for k in ("pair", "fused"))
        print(f"| {sparsity:.0%} | {p:.3f} | {f:.3f} | {f / p:.2f} |")


if __name__ == "__main__":
    main()
