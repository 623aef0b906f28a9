"""What fusing the ReLU into sparse Linear layers saves: the MLP's training step with and without it, against dense.

`bidst bench` measures one sparse variant at a time against dense, and on a shared VM its ratios
move by about ±0.02 between runs, as much as this change is worth. Here the dense model, the sparse
model with separate ReLU modules and the same sparse model with the ReLU fused (`fuse_relu`, what the
sparse backend does) take turns in one process, in blocks of consecutive steps, so the comparison of
the two sparse variants sees the same machine state. Steps are plain training steps (forward, loss,
backward, SGD with momentum) on `bidst bench`'s 1024-1024-1024-1024-10 MLP at batch 256, uniform random
masks, classifier dense; no DST work.

    python benchmarks/relu_fusion.py                    # 90, 95, 98% sparsity, 2 threads
    python benchmarks/relu_fusion.py --sparsities 0.98 --reps 41
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numba
import torch
import torch.nn.functional as F
from torch import nn

from bidst.bench import mlp_1024, random_mask, sparse_layer_names
from bidst.sparse import fuse_relu, to_sparse_modules
from bidst.sparse.layout import use_batch_innermost


def step_fn(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """One training step of `model` on a fixed batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()

    return step


def models(density: float, gen: torch.Generator) -> dict[str, nn.Module]:
    """The dense MLP and two sparse copies at `density` (same masks and weights), one with its ReLUs fused."""
    dense = mlp_1024()
    masks = {n: random_mask(dense.get_parameter(n).shape, density, gen) for n in sparse_layer_names(dense)}
    out = {"dense": dense}
    for name in ("separate ReLU", "fused ReLU"):
        sparse = mlp_1024()
        sparse.load_state_dict(dense.state_dict())
        to_sparse_modules(sparse, masks)
        use_batch_innermost(sparse)
        if name == "fused ReLU":
            assert fuse_relu(sparse), "nothing fused"
        out[name] = sparse
    return out


def time_round_robin(
    steps: dict[str, Callable[[], None]], reps: int, block: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds per step of each step function, timed in turns of `block` consecutive steps."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        step()
    for _ in range(reps):
        for name, step in steps.items():
            t0 = clock()
            for _ in range(block):
                step()
            times[name].append((clock() - t0) / block)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--block", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time (one thread only)")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1 (process time adds up the threads)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=gen)
    target = torch.randint(0, 10, (256,), generator=gen)
    print(f"MLP 1024x3, batch 256, {args.threads} thread(s), median of {args.reps} turns of {args.block} steps, "
          f"{'CPU time' if args.clock == 'cpu' else 'wall clock'}")  # fmt: skip
    print("\n| sparsity | dense ms | separate ReLU / dense | fused ReLU / dense | fused / separate |")
    print("| --- | --- | --- | --- | --- |")
    for s in (float(v) for v in args.sparsities.split(",")):
        t = time_round_robin({k: step_fn(m, x, target) for k, m in models(1.0 - s, gen).items()}, args.reps, args.block, clock)
        sep, fused = t["separate ReLU"], t["fused ReLU"]
        print(f"| {s:.0%} | {t['dense'] * 1e3:.1f} | {sep / t['dense']:.3f} | {fused / t['dense']:.3f} | {fused / sep:.3f} |")


if __name__ == "__main__":
    main()
