"""Where a training step's wall time goes: forward + backward against `Sparsifier.step`, per method.

FLOPs say what mask learning costs in arithmetic; this says what it costs in time on this machine.
For each model and method it trains `--steps` steps of the Fashion-MNIST shapes (batch 128, random
data: the time does not depend on the values) inside the learning phase, and prints the mean
milliseconds per step of the forward + backward and of `Sparsifier.step` (optimizer step plus the
method's work: for BiDST its mask learning, for RigL its updates, both amortised over the topology
updates the steps include), and what `step` adds to forward + backward. Methods alternate in blocks
of `--block` steps, so drifting machine load hits each alike.

    python benchmarks/step_split.py                               # MLP and CNN, RigL and BiDST, 95%, 1 thread
    python benchmarks/step_split.py --models mlp --steps 400 --sparsity 0.98
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bidst
from bidst.models import create_model
from bidst.sparse import set_threads

TOTAL_STEPS = 1287  # the grid's 3 epochs of batch 128 (sets the schedules; the steps timed come first)


def build(model_name: str, method: str, sparsity: float, seed: int) -> tuple:
    """A seeded model, SGD and Sparsifier as the grid's runs have them (ERK, topology every 100 steps)."""
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = bidst.sparsify(model, opt, method, sparsity, total_steps=TOTAL_STEPS, distribution="erk", seed=seed)
    return model, opt, sp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated model names")
    parser.add_argument("--methods", default="rigl,bidst", help="comma-separated methods")
    parser.add_argument("--sparsity", type=float, default=0.95)
    parser.add_argument("--steps", type=int, default=300, help="steps timed per method (after 5 untimed)")
    parser.add_argument("--block", type=int, default=20, help="consecutive steps of one method")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not 0.0 <= args.sparsity < 1.0 or min(args.steps, args.block, args.threads) < 1:
        parser.error("need 0 <= --sparsity < 1 and positive --steps, --block and --threads")
    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"{args.threads} thread(s), sparsity {args.sparsity:g}, batch 128, mean ms per step over {args.steps} steps")
    print("| model | method | forward + backward | Sparsifier.step | step / (forward + backward) | topology changes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model_name in args.models.split(","):
        x = torch.randn(128, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
        runs = {m: build(model_name, m, args.sparsity, 0) for m in args.methods.split(",")}
        times: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in runs}
        blocks = [(5, False)] + [(min(args.block, args.steps - done), True) for done in range(0, args.steps, args.block)]
        for count, timed in blocks:  # the first block of each method warms up, untimed
            for method, (model, opt, sp) in runs.items():
                for _ in range(count):
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    t1 = time.perf_counter()
                    sp.step(batch=(x, y))
                    t2 = time.perf_counter()
                    if timed:
                        times[method][0].append(t1 - t0)
                        times[method][1].append(t2 - t1)
        for method, (fb, st) in times.items():
            fb_ms, st_ms = 1e3 * statistics.fmean(fb), 1e3 * statistics.fmean(st)
            print(f"| {model_name} | {method} | {fb_ms:.2f} ms | {st_ms:.2f} ms | {st_ms / fb_ms:.1%} | "
                  f"{runs[method][2].topology_changes} |")


if __name__ == "__main__":
    main()
