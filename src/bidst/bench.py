"""`bidst bench`: sparse-backend time over dense time, per layer shape and per whole training step, into a Markdown report.

Dense and sparse are timed alternately in one loop (interleaved repetitions, each a short block of
consecutive steps per backend) and a statistic of each compared, so machine load hits both alike.
Per layer: forward + input grad + weight grad of every distinct Conv2d/Linear shape of the MLP,
the small CNN, ResNet-32 and VGG-19 (random masks).
Whole step: forward, loss, backward, optimizer and RigL's work through a `backend="sparse"`
Sparsifier against the dense model with a plain optimizer step; update steps (dense gradient,
drop/grow, rebuild) are timed separately and amortised over RigL's default 100-step interval.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numba
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write, make_folder, nearest_folder, probe_folder
from .engine import sparsify
from .errors import BidstError
from .models import create_model
from .sparse import (
    SparseModule,
    SparseStructure,
    set_threads,
    sparse_conv2d,
    sparse_linear,
)
from .sparse._common import DENSE_ABOVE

Step = Callable[[], None]
UPDATE_INTERVAL = 100  # RigL's default topology-update interval, in steps
MARKERS = ("<!-- bench:start -->", "<!-- bench:end -->")


@dataclass(frozen=True)
class Layer:
    """One benchmarked layer shape; `count` is how often it occurs in its model."""

    name: str
    kind: str  # "linear" or "conv"
    batch: int
    cin: int
    cout: int
    size: int = 0  # input height = width (conv)
    k: int = 3
    stride: int = 1
    count: int = 1

    @property
    def padding(self) -> int:
        return self.k // 2


def mlp_1024() -> nn.Module:
    """A 1024-1024-1024-1024-10 ReLU MLP (the classifier stays dense)."""
    return nn.Sequential(
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )  # fmt: skip


# name -> (model factory, example input shape); the CNNs at batch 64, the MLP at 256
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MLP 1024x3": (mlp_1024, (256, 1024)),
    "CNN (Fashion-MNIST)": (lambda: create_model("cnn", num_classes=10, in_channels=1, image_size=28), (64, 1, 28, 28)),
    "ResNet-32": (lambda: create_model("resnet32", num_classes=10, in_channels=3, image_size=32), (64, 3, 32, 32)),
    "VGG-19": (lambda: create_model("vgg19", num_classes=10, in_channels=3, image_size=32), (64, 3, 32, 32)),
}


# short names for --models
ALIASES = {"mlp": "MLP 1024x3", "cnn": "CNN (Fashion-MNIST)", "resnet32": "ResNet-32", "vgg19": "VGG-19"}


def sparse_layer_names(model: nn.Module) -> list[str]:
    """Weights the benchmarks make sparse: every Conv2d/Linear but the first conv and the classifier."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    first_conv = [n for n in layers if isinstance(model.get_submodule(n), nn.Conv2d)][:1]
    return [f"{n}.weight" for n in layers[:-1] if n not in first_conv]


def model_layers(model_name: str) -> list[Layer]:
    """The distinct sparse layer shapes of a model, with how often each occurs, read off one forward pass."""
    factory, shape = MODELS[model_name]
    model = factory()
    wanted = {n.rpartition(".")[0] for n in sparse_layer_names(model)}
    found: dict[Layer, int] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        x = inputs[0]
        if isinstance(module, nn.Linear):
            layer = Layer("", "linear", x.shape[0], module.in_features, module.out_features)
        else:
            assert isinstance(module, nn.Conv2d)
            layer = Layer("", "conv", x.shape[0], module.in_channels, module.out_channels, x.shape[-1],
                          module.kernel_size[0], module.stride[0])  # fmt: skip
        found[layer] = found.get(layer, 0) + 1

    handles = [model.get_submodule(n).register_forward_hook(hook) for n in wanted]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in handles:
        h.remove()
    out = []
    for la, count in found.items():
        name = f"{la.cin}->{la.cout}" + (f" {la.k}x{la.k} s{la.stride} @{la.size}" if la.kind == "conv" else "")
        out.append(Layer(f"{model_name} {name}, b{la.batch}", la.kind, la.batch, la.cin, la.cout, la.size, la.k,
                         la.stride, count))  # fmt: skip
    return out


def random_mask(shape: tuple[int, ...], density: float, gen: torch.Generator) -> torch.Tensor:
    """A bool mask with exactly round(density * numel) random True entries."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=gen)[: round(density * n)]] = True
    return flat.reshape(shape)


def _batch_innermost(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` (N, ...) with the batch dimension innermost in memory, same shape and values."""
    order = (*range(1, t.dim()), 0)
    return t.detach().permute(order).contiguous().permute(t.dim() - 1, *range(t.dim() - 1))


def layer_steps(layer: Layer, density: float, gen: torch.Generator) -> tuple[Step, Step]:
    """(dense step, sparse step) closures: forward and backward for input, weight and bias of one layer.

    Each backend gets its input and output gradient in the memory layout it sees inside a model:
    contiguous for dense; batch-innermost for sparse, the layout the sparse layer before it emits
    and the dense layers between keep (`bidst.sparse.layout`; the first sparse layer of a model pays
    one transpose more, in the whole step).
    """
    if layer.kind == "linear":
        shape: tuple[int, ...] = (layer.cout, layer.cin)
        x = torch.randn(layer.batch, layer.cin, generator=gen)
    else:
        shape = (layer.cout, layer.cin, layer.k, layer.k)
        x = torch.randn(layer.batch, layer.cin, layer.size, layer.size, generator=gen)
    x.requires_grad_(True)
    xs = _batch_innermost(x).requires_grad_(True)
    mask = random_mask(shape, density, gen)
    w = (torch.randn(shape, generator=gen) * mask).requires_grad_(True)
    b = torch.zeros(layer.cout, requires_grad=True)
    structure = SparseStructure.from_mask(mask)
    values = structure.gather(w).requires_grad_(True)

    def dense_fwd() -> torch.Tensor:
        if layer.kind == "linear":
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, layer.stride, layer.padding)

    def sparse_fwd() -> torch.Tensor:
        if layer.kind == "linear":
            return sparse_linear(xs, values, structure, b)
        return sparse_conv2d(xs, values, structure, b, layer.stride, layer.padding)

    gy = torch.randn_like(dense_fwd().detach())
    gys = _batch_innermost(gy)

    def step(fwd: Callable[[], torch.Tensor], grad: torch.Tensor) -> Step:
        def run() -> None:
            x.grad = xs.grad = w.grad = b.grad = values.grad = None
            fwd().backward(grad)

        return run

    return step(dense_fwd, gy), step(sparse_fwd, gys)


@dataclass
class Timer:
    """How steps are timed: the clock, the statistic over repetitions, their number, and steps per block.

    Each repetition times a block of `block` consecutive dense steps, then as many sparse ones, and
    takes the mean step of each block. Training runs one model's steps back to back, so a block
    measures what a training loop sees; with block 1 every sparse step follows a dense one and pays
    for the caches and memory pages the dense step left behind (most visible where the sparse step
    is short).
    """

    clock: Callable[[], float] = time.perf_counter
    stat: Callable[[list[float]], float] = statistics.median
    reps: int = 7
    block: int = 3

    @property
    def steps(self) -> int:
        """How many times `interleaved` calls each step, warm-up included."""
        return 1 + self.reps * self.block

    def interleaved(self, dense: Step, sparse: Step) -> tuple[float, float]:
        """Seconds per step (the statistic over repetitions) of dense and sparse, measured in alternating
        blocks after one warm-up each."""
        dense()
        sparse()
        td, ts = [], []
        for _ in range(self.reps):
            t0 = self.clock()
            for _ in range(self.block):
                dense()
            t1 = self.clock()
            for _ in range(self.block):
                sparse()
            t2 = self.clock()
            td.append((t1 - t0) / self.block)
            ts.append((t2 - t1) / self.block)
        return self.stat(td), self.stat(ts)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, optimizer tensors (momentum buffers, moments) and sparse layers' index arrays."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    indices = sum(m.structure.nbytes() for m in model.modules() if isinstance(m, SparseModule))
    return params + indices + sum(
        v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


def training_steps(
    model_name: str,
    density: float,
    interval: int,
    gen: torch.Generator,
    clock: Callable[[], float],
    batch: int | None = None,
) -> tuple[Step, Step, Callable[[], float], Callable[[], tuple[float, float]]]:
    """(dense step, sparse step, seconds rebuilding so far, sparse / dense bytes of parameters + optimizer state
    + index arrays, without and with the Sparsifier's bool masks).

    The sparse step runs RigL through a `backend="sparse"` Sparsifier with topology updates every
    `interval` steps (uniform masks at `density`, first conv and classifier dense); `clock` times its rebuilds.
    `batch` replaces the model's benchmark batch size.
    """
    factory, shape = MODELS[model_name]
    shape = shape if batch is None else (batch, *shape[1:])
    dense = factory()
    x = torch.randn(shape, generator=gen)
    target = torch.randint(0, 10, (shape[0],), generator=gen)
    sparse = copy.deepcopy(dense)
    keep = set(sparse_layer_names(sparse))
    sparse_opt = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9)
    sp = sparsify(sparse, sparse_opt, "rigl", 1.0 - density, total_steps=10**7, distribution="uniform",
                  filter_fn=lambda m, n: isinstance(m, (nn.Linear, nn.Conv2d)) and f"{n}.weight" in keep,
                  backend="sparse", interval=interval)  # fmt: skip
    sp.clock = clock
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)

    def dense_step() -> None:
        dense_opt.zero_grad(set_to_none=True)
        F.cross_entropy(dense(x), target).backward()
        dense_opt.step()

    def sparse_step() -> None:
        sparse_opt.zero_grad(set_to_none=True)
        F.cross_entropy(sparse(x), target).backward()
        sp.step()

    def memory() -> tuple[float, float]:
        dense_bytes, held = state_bytes(dense, dense_opt), state_bytes(sparse, sparse_opt)
        masks = sum(m.numel() * m.element_size() for m in sp.masks.values())
        return held / dense_bytes, (held + masks) / dense_bytes

    return dense_step, sparse_step, lambda: sp.rebuild_seconds, memory


def percent(sparsity: float) -> str:
    """A sparsity as a percentage with the digits it needs (97.5%, not 98%)."""
    return f"{100 * sparsity:.10g}%"


def ratio_row(results: dict[str, dict[str, float]], sparsities: list[float], key: str = "ratio") -> str:
    return " | ".join(f"{results[str(s)][key]:.2f}" for s in sparsities)


def run(models: list[str], sparsities: list[float], timer: Timer, layers: bool, out: list[str]) -> None:
    """Measure and append Markdown tables to `out` (printed as they come)."""

    def emit(line: str) -> None:
        out.append(line)
        print(line, flush=True)

    gen = torch.Generator().manual_seed(0)
    head = "| " + " | ".join(percent(s) for s in sparsities) + " |"
    emit("\n### Whole training step, sparse / dense time (forward, loss, backward, optimizer, RigL)\n")
    emit(f"Amortised over RigL's {UPDATE_INTERVAL}-step update interval; `update` is one update step alone (dense "
         "gradient, drop/grow, rebuild) over a dense step timed beside it; `rebuild` is the share of training time "
         "spent rebuilding sparse structures (the kernels' index orderings too, built on the next step) and optimizer "
         "state at the default interval; `memory` is the bytes of parameters, optimizer state (momentum) and, for "
         "sparse, the index arrays, after a regular step, sparse over dense; `+ masks` adds the Sparsifier's bool "
         "masks (one byte per weight of the sparsified layers).\n")
    emit("| model | | " + head[2:])
    emit("|" + " --- |" * (len(sparsities) + 2))
    for name in models:
        rows: dict[str, dict[str, float]] = {}
        for s in sparsities:
            dense_r, sparse_r, _, memory = training_steps(name, 1.0 - s, 10**9, gen, timer.clock)
            td, ts = timer.interleaved(dense_r, sparse_r)
            held, with_masks = memory()  # after regular steps: the kernels' orderings are built
            dense_u, sparse_u, rebuilt, _ = training_steps(name, 1.0 - s, 1, gen, timer.clock)
            sparse_u()  # the first update of a process loads compiled kernels: a one-time cost, left out
            before = rebuilt()
            tdu, tu = timer.interleaved(dense_u, sparse_u)
            per_update = (rebuilt() - before) / timer.steps
            # each sparse time over the dense time measured beside it, amortised over the update interval
            ratio = ts / td + (tu / tdu - ts / td) / UPDATE_INTERVAL
            rows[str(s)] = {"ratio": ratio, "regular": ts / td, "update": tu / tdu,
                            "rebuild": per_update / (UPDATE_INTERVAL * ratio * td), "dense_ms": td * 1e3,
                            "memory": held, "masks": with_masks}
        emit(f"| {name} | step | {ratio_row(rows, sparsities)} |")
        emit(f"| | update | {ratio_row(rows, sparsities, 'update')} |")
        emit("| | rebuild | " + " | ".join(f"{100 * rows[str(s)]['rebuild']:.3f}%" for s in sparsities) + " |")
        emit("| | dense ms | " + " | ".join(f"{rows[str(s)]['dense_ms']:.1f}" for s in sparsities) + " |")
        emit(f"| | memory | {ratio_row(rows, sparsities, 'memory')} |")
        emit(f"| | + masks | {ratio_row(rows, sparsities, 'masks')} |")
    computed_densely = [percent(s) for s in sparsities if 1.0 - s > DENSE_ABOVE + 1e-9]  # 0.7: exactly 0.3 dense
    if computed_densely:
        emit(f"\nAt {', '.join(computed_densely)} the layers are more than {DENSE_ABOVE:.0%} dense, where the sparse "
             "backend computes them with dense kernels on masked weights: those columns are not sparse compute.")
    if not layers:
        return
    emit("\n### Per layer shape, sparse / dense time (forward + input grad + weight grad)\n")
    emit("| layer | count | " + head[2:])
    emit("|" + " --- |" * (len(sparsities) + 2))
    for name in models:
        for layer in model_layers(name):
            cells = []
            for s in sparsities:
                td, ts = timer.interleaved(*layer_steps(layer, 1.0 - s, gen))
                cells.append(f"{ts / td:.2f}")
            emit(f"| {layer.name} | {layer.count} | " + " | ".join(cells) + " |")


def profile(models: list[str], sparsities: list[float], out: list[str], steps: int = 10, top: int = 8) -> None:
    """Append, per model and sparsity, where a regular sparse training step spends its time (torch.profiler).

    Numba kernels run inside the sparse autograd functions, so their time is those rows' self time.
    """
    gen = torch.Generator().manual_seed(0)
    first = len(out)
    out.append("\n### Where a sparse step's time goes (torch.profiler, self time per step)\n")
    for name in models:
        for s in sparsities:
            step = training_steps(name, 1.0 - s, 10**9, gen, time.perf_counter)[1]
            for _ in range(3):
                step()
            with torch.profiler.profile() as prof:
                for _ in range(steps):
                    step()
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events)
            out.append(f"{name} at {percent(s)}: {total / steps / 1e3:.2f} ms per step under the profiler\n")
            out.append("| operation | calls per step | ms per step | share |")
            out.append("| --- | --- | --- | --- |")
            for e in events[:top]:
                out.append(f"| `{e.key}` | {e.count / steps:g} | {e.self_cpu_time_total / steps / 1e3:.2f} | "
                           f"{100 * e.self_cpu_time_total / total:.1f}% |")  # fmt: skip
            out.append("")
    print("\n".join(out[first:]), flush=True)


def marked_part(path: Path) -> tuple[str, str] | None:
    """The text before and after the bench markers' contents in an existing `path` (None for a new file); a file
    without both markers in order is refused, so prose a user wrote is never replaced."""
    if not path.exists():
        return None
    old = path.read_bytes().decode(errors="surrogateescape")  # text in another encoding is written back unchanged
    start, end = MARKERS
    i = old.find(start)
    j = old.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0 or old.count(start) != 1 or old.count(end) != 1:
        raise BidstError(f"{path} exists and does not hold one {start} ... {end} pair: give a new file, or add the "
                         "markers where the tables go")
    return old[: i + len(start)], old[j:]


def write_report(path: Path, lines: list[str]) -> None:
    """Write the report to a new `path`, or only between the markers of an existing one (its prose and title kept:
    the report's title line is left out there)."""
    around = marked_part(path)
    has_title = lines[0].startswith("# ") and not lines[1]
    body = lines[2:] if has_title else lines
    if around is None:  # a new file gets the markers too, so the same command can rewrite it
        around = ("\n".join(lines[:2]) + "\n" if has_title else "") + MARKERS[0], MARKERS[1] + "\n"
    text = around[0] + "\n" + "\n".join(body) + "\n" + around[1]
    make_folder(path.parent)
    atomic_write(path, lambda f: f.write(text.encode(errors="surrogateescape")))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `bidst bench`; returns the exit code."""
    ap = argparse.ArgumentParser(prog="bidst bench", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, of: {', '.join(MODELS)} (or {', '.join(ALIASES)})")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions per measurement")
    ap.add_argument("--block", type=int, default=3, help="consecutive steps of one backend per repetition")
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    ap.add_argument("--stat", choices=["median", "min"], default="min", help="min resists a busy machine")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu", help="cpu: process time (one thread only)")
    ap.add_argument("--no-layers", action="store_true", help="whole steps only")
    ap.add_argument("--profile", action="store_true", help="also profile a regular sparse step per model and sparsity")
    ap.add_argument("--out", help="write the Markdown report to a new file, or between the bench markers of an existing one")
    args = ap.parse_args(argv)
    named = {**{name.lower(): name for name in MODELS}, **ALIASES}
    models = [named.get(m.strip().lower(), m.strip()) for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)} (or {', '.join(ALIASES)})")
    try:
        sparsities = [float(x) for x in args.sparsities.split(",")]
    except ValueError:
        ap.error(f"--sparsities must be comma-separated numbers, got {args.sparsities!r}")
    if not all(0.0 < x < 1.0 for x in sparsities):
        ap.error(f"--sparsities must lie in (0, 1), got {args.sparsities}")
    if args.reps < 1 or args.block < 1:
        ap.error(f"--reps and --block must be at least 1, got {args.reps} and {args.block}")
    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads must be 1 to {numba.config.NUMBA_NUM_THREADS} (what Numba can use here), got {args.threads}")
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures one thread only")
    if args.out:  # before the measurements, which take minutes
        if Path(args.out).is_dir():
            ap.error(f"--out {args.out} is a folder; give a Markdown file")
        try:
            probe_folder(nearest_folder(Path(args.out).parent))  # missing folders are made when the report is written
            marked_part(Path(args.out))
        except BidstError as e:
            ap.error(f"--out {args.out}: {e}")
    set_threads(args.threads)
    timer = Timer(time.process_time if args.clock == "cpu" else time.perf_counter,
                  min if args.stat == "min" else statistics.median, args.reps, args.block)  # fmt: skip
    out = [
        "# Performance: the sparse backend against dense",
        "",
        f"Command: `bidst bench {shlex.join(argv if argv is not None else sys.argv[2:])}`".rstrip() + "  ",
        (f"Machine: {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} logical CPUs, "
         f"{torch.get_num_threads()} thread(s) used, "
         f"torch {torch.__version__}, numba {numba.__version__}, Python {platform.python_version()}  "),
        (f"Timing: {args.stat} of {args.reps} interleaved repetitions of {args.block} consecutive steps per backend, "
         f"{args.clock} clock. Ratios below 1 mean the sparse backend is faster."),
    ]
    for line in out:
        print(line)
    run(models, sparsities, timer, not args.no_layers, out)
    if args.profile:
        profile(models, sparsities, out)
    if args.out:
        try:
            write_report(Path(args.out), out)
        except BidstError as e:  # the measurements are on stdout above
            print(f"bidst bench: error: {e}", file=sys.stderr)
            return 2
    return 0
