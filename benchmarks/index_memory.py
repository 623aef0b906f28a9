"""Bytes per active weight of the sparse backend's index arrays, array by array, for Linear and conv layers.

The figures behind performance.md's "Memory" paragraph: `bidst bench`'s `memory` rows give the
total; this splits it. A model of `bidst bench` is sparsified as the bench does (RigL, uniform
masks, first conv and classifier dense, `backend="sparse"`), trained one step so the kernels'
orderings exist, and each array's bytes are divided by the active weights of its layer kind.
A dense weight costs 8 bytes (float32 value and SGD momentum); a sparse one 8 plus these.

    python benchmarks/index_memory.py                              # ResNet-32 and the MLP at 90%
    python benchmarks/index_memory.py --models VGG-19 --sparsity 0.98
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from bidst import sparsify
from bidst.bench import MODELS, sparse_layer_names
from bidst.sparse import SparseConv2d, SparseModule


def breakdown(model_name: str, sparsity: float) -> dict[str, dict[str, float]]:
    """{layer kind: {array name: bytes per active weight of that kind}} after one training step."""
    factory, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = factory()
    x, target = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    keep = set(sparse_layer_names(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = sparsify(model, opt, "rigl", sparsity, total_steps=10**7, distribution="uniform", backend="sparse",
                  filter_fn=lambda m, n: isinstance(m, (nn.Linear, nn.Conv2d)) and f"{n}.weight" in keep)  # fmt: skip
    opt.zero_grad()
    F.cross_entropy(model(x), target).backward()
    sp.step()
    totals: dict[str, dict[str, float]] = {}
    active: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, SparseModule):
            kind = "conv" if isinstance(module, SparseConv2d) else "linear"
            active[kind] = active.get(kind, 0) + module.structure.nnz
            for name, array in module.structure.arrays().items():
                totals.setdefault(kind, {})[name] = totals.get(kind, {}).get(name, 0) + array.nbytes
    return {kind: {n: b / active[kind] for n, b in arrays.items()} for kind, arrays in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ResNet-32,MLP 1024x3", help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    models = args.models.split(",")
    if any(m not in MODELS for m in models) or not 0.0 < args.sparsity < 1.0:
        ap.error(f"--models must name some of {', '.join(MODELS)} and --sparsity lie in (0, 1)")
    for name in models:
        for kind, arrays in breakdown(name, args.sparsity).items():
            print(f"\n{name}, {kind} layers at {args.sparsity:g} sparsity: bytes per active weight\n")
            print("| array | bytes |\n| --- | --- |")
            for array, size in sorted(arrays.items(), key=lambda item: -item[1]):
                print(f"| {array} | {size:.2f} |")
            print(f"| **index total** | **{sum(arrays.values()):.1f}** |")


if __name__ == "__main__":
    main()
