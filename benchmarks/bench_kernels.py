"""Per-layer wall-clock ratios sparse/dense for one training step (forward + input grad + weight grad).

Dense and sparse steps are timed alternately in the same loop (interleaved repetitions) and the
medians compared, so machine load affects both alike. Not a test: it prints a Markdown table and
optionally writes JSON.

    PYTHONPATH=src python benchmarks/bench_kernels.py [--reps 9] [--json out.json] [--quick] [--models]
        [--threads 1 --clock cpu --stat min]   # the robust variant on a busy machine
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import numba
import torch
import torch.nn.functional as F
from torch import nn

from bidst.bench import Layer, random_mask
from bidst.bench import layer_steps as make_steps
from bidst.bench import mlp_1024 as mlp
from bidst.models import create_model
from bidst.sparse import SparseStructure, to_sparse_modules

LAYERS = [
    Layer("Linear 1024x1024, b256", "linear", 256, 1024, 1024),
    Layer("Conv 64->64 3x3 @8x8, b64", "conv", 64, 64, 64, 8),
    Layer("Conv 16->16 3x3 @32x32, b64", "conv", 64, 16, 16, 32),
]
# The convolutions of the CIFAR ResNet-32 in bidst.models (stem and classifier stay dense), batch 64.
RESNET32 = [
    Layer("R32 16->16 3x3 @32", "conv", 64, 16, 16, 32, count=10),
    Layer("R32 16->32 3x3 s2 @32", "conv", 64, 16, 32, 32, stride=2),
    Layer("R32 16->32 1x1 s2 @32", "conv", 64, 16, 32, 32, k=1, stride=2),
    Layer("R32 32->32 3x3 @16", "conv", 64, 32, 32, 16, count=9),
    Layer("R32 32->64 3x3 s2 @16", "conv", 64, 32, 64, 16, stride=2),
    Layer("R32 32->64 1x1 s2 @16", "conv", 64, 32, 64, 16, k=1, stride=2),
    Layer("R32 64->64 3x3 @8", "conv", 64, 64, 64, 8, count=9),
]


STAT: Callable[[list[float]], float] = statistics.median
CLOCK: Callable[[], float] = time.perf_counter


def interleaved(dense: Callable[[], None], sparse: Callable[[], None], reps: int) -> tuple[float, float]:
    """STAT (median by default) seconds of dense and sparse, measured alternately after one warm-up each."""
    dense()
    sparse()
    td, ts = [], []
    for _ in range(reps):
        t0 = CLOCK()
        dense()
        t1 = CLOCK()
        sparse()
        t2 = CLOCK()
        td.append(t1 - t0)
        ts.append(t2 - t1)
    return STAT(td), STAT(ts)


def topology_update_times(density: float, swap: float, gen: torch.Generator) -> dict[str, float]:
    """Seconds for an incremental update of the 1024x1024 structure vs rebuilding it from a dense mask."""
    mask = random_mask((1024, 1024), density, gen)
    s = SparseStructure.from_mask(mask)
    k = int(swap * s.nnz)
    active = torch.from_numpy(s.flat)
    inactive = (~mask).reshape(-1).nonzero().reshape(-1)
    drop = active[torch.randperm(active.numel(), generator=gen)[:k]]
    grow = inactive[torch.randperm(inactive.numel(), generator=gen)[:k]]
    values = torch.randn(s.nnz)

    def incremental() -> None:
        new, delta = s.updated(drop, grow)
        delta.remap(values)
        new.by_input()

    def rebuild() -> None:
        m = mask.clone().reshape(-1)
        m[drop] = False
        m[grow] = True
        new = SparseStructure.from_mask(m.reshape(1024, 1024))
        new.gather(torch.randn(1024, 1024))
        new.by_input()

    t_rebuild, t_incr = interleaved(rebuild, incremental, 7)
    return {"incremental_ms": t_incr * 1e3, "rebuild_ms": t_rebuild * 1e3}


def model_steps(name: str, density: float, gen: torch.Generator) -> tuple[Callable[[], None], Callable[[], None]]:
    """(dense step, sparse step): forward, cross-entropy, backward and an SGD-momentum step of a whole model.

    The sparse model has every Conv2d / Linear except the first conv and the classifier swapped for
    its sparse twin at `density` (random masks); the dense model is the unmasked original.
    """
    if name == "mlp":
        dense = mlp()
        x = torch.randn(256, 1024, generator=gen)
    else:
        dense = create_model("resnet32", num_classes=10, in_channels=3, image_size=32)
        x = torch.randn(64, 3, 32, 32, generator=gen)
    target = torch.randint(0, 10, (x.shape[0],), generator=gen)
    layers = [(n, m) for n, m in dense.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    skip = {layers[-1][0]} | ({layers[0][0]} if name != "mlp" else set())
    masks = {f"{n}.weight": random_mask(tuple(m.weight.shape), density, gen) for n, m in layers if n not in skip}
    sparse = copy.deepcopy(dense)
    to_sparse_modules(sparse, masks)

    def step(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            opt.step()

        return run

    return step(dense), step(sparse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9, help="interleaved repetitions per measurement")
    ap.add_argument("--threads", type=int, default=2, help="torch and numba threads")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--quick", action="store_true", help="skip the ResNet-32 layer set")
    ap.add_argument("--stat", choices=["median", "min"], default="median", help="min resists a busy machine")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time (with --threads 1 only)")
    ap.add_argument("--models", action="store_true", help="also time whole training steps of an MLP and ResNet-32")
    ap.add_argument("--only", help="run only layers whose name contains this text")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    global STAT, CLOCK
    STAT = min if args.stat == "min" else statistics.median
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures one thread only")
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    gen = torch.Generator().manual_seed(0)
    layers = [la for la in LAYERS + ([] if args.quick else RESNET32) if not args.only or args.only in la.name]

    results: dict[str, dict[str, dict[str, float]]] = {}
    for layer in layers:
        results[layer.name] = {}
        for sp in sparsities:
            td, ts = interleaved(*make_steps(layer, 1.0 - sp, gen), args.reps)
            results[layer.name][str(sp)] = {"dense_ms": td * 1e3, "sparse_ms": ts * 1e3, "ratio": ts / td}
    if not args.quick and not args.only:
        total = {}
        for sp in sparsities:
            d = sum(r.count * results[r.name][str(sp)]["dense_ms"] for r in RESNET32)
            s = sum(r.count * results[r.name][str(sp)]["sparse_ms"] for r in RESNET32)
            total[str(sp)] = {"dense_ms": d, "sparse_ms": s, "ratio": s / d}
        results["ResNet-32 convs (weighted sum)"] = total
    if args.models:
        for name, label in (("mlp", "MLP 1024x3 training step, b256"), ("resnet32", "ResNet-32 training step, b64")):
            results[label] = {}
            for sp in sparsities:
                td, ts = interleaved(*model_steps(name, 1.0 - sp, gen), args.reps)
                results[label][str(sp)] = {"dense_ms": td * 1e3, "sparse_ms": ts * 1e3, "ratio": ts / td}
    updates = {str(sp): topology_update_times(1.0 - sp, 0.3, gen) for sp in sparsities}

    head = "| layer | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
    print(
        f"sparse/dense time ({args.stat} of {args.reps} interleaved runs), forward + input grad + weight grad; "
        f"{args.threads} threads; {platform.processor() or platform.machine()}"
    )
    print(head)
    print("|" + " --- |" * (len(sparsities) + 1))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[str(s)]['ratio']:.2f}" for s in sparsities) + " |")
    print("\ntopology update of Linear 1024x1024, 30% swapped (ms): incremental / rebuild from dense mask")
    for sp, t in updates.items():
        print(f"  {float(sp):.0%}: {t['incremental_ms']:.2f} / {t['rebuild_ms']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            meta = {"threads": args.threads, "clock": args.clock, "stat": args.stat, "reps": args.reps}
            json.dump({**meta, "layers": results, "topology_update": updates}, f, indent=1)


if __name__ == "__main__":
    main()
