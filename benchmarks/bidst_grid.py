"""The BiDST evidence grid: baselines and BiDST on Fashion-MNIST at 90/95/98% sparsity, 3 seeds, matched FLOPs.

Not a test. It trains about 110 short runs (LeNet-300-100 `mlp`, 3 epochs, full training split)
through the `bidst train` CLI, skips every run that already has a summary.json (stop and restart at
will), and rewrites the generated part of docs/results.md (between its grid markers) with accuracy
mean ± std, training FLOPs relative to dense, topology changes and the ablations at 95%.

    python benchmarks/bidst_grid.py --out runs/bidst-grid --jobs 2       # about an hour on 2 CPU cores
    python benchmarks/bidst_grid.py --out runs/bidst-grid --report-only  # tables from what has finished
    python benchmarks/bidst_grid.py --only bidst,bidst-control --jobs 1  # train these labels, leave the docs

`--methods`, `--sparsities` and `--seeds` narrow or widen the grid (the tables follow), for example
more seeds for the contested cells of a grid that has run:

    python benchmarks/bidst_grid.py --model cnn --no-ablations --methods bidst,bidst-control,rigl \
        --seeds 0,1,2,3,4,5 --section cnn-seeds --out runs/cnn-grid

The same grid longer, on a GPU, into its own section of docs/results.md (main grid only, every run
stopped at the deadline; `--set` adds any `bidst train` override to every run):

    python benchmarks/bidst_grid.py --model resnet20 --epochs 8 --no-ablations --jobs 14 --deadline 420 \
        --section gpu-grid --out runs/gpu-grid --set device=cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bidst.budget import model_rows, planned_flops
from bidst.config import load_config
from bidst.engine import sparsify
from bidst.models import create_model

RECIPE = "configs/fashion-mnist.yaml"
SPARSITIES = (0.9, 0.95, 0.98)
SEEDS = (0, 1, 2)
TRAIN_ITEMS = 60000  # Fashion-MNIST's training split, before the validation carve-out
BIDST = ["method=bidst", "match_flops=rigl"]
METHODS: dict[str, list[str]] = {  # every schedule revises the topology every 100 steps (about 9 times per run)
    "dense": ["method=dense"],
    "static": ["method=static"],
    "set": ["method=set"],
    "rigl": ["method=rigl"],
    "rigl drop_fraction=0.7": ["method=rigl", "method_args.drop_fraction=0.7"],  # BiDST's default α, for fairness
    "snfs": ["method=snfs"],
    "mest": ["method=mest", "method_args.interval=100", "method_args.interval_unit=steps"],
    "bidst": BIDST,
    "bidst-control": [*BIDST, "method_args.mask_lr=0"],
}
ABLATIONS: dict[str, list[str]] = {  # at 95% sparsity; 'bidst', 'bidst-control' and 'rigl' come from the grid
    "hypergradient=implicit_diag": [*BIDST, "method_args.hypergradient=implicit_diag"],
    "hypergradient=unrolled": [*BIDST, "method_args.hypergradient=unrolled"],
    "hypergradient=unrolled, same steps (FLOPs not matched)": ["method=bidst", "method_args.hypergradient=unrolled"],
    "hypergradient=second_order_diag": [*BIDST, "method_args.hypergradient=second_order_diag"],
    "explore_ratio=0.2": [*BIDST, "method_args.explore_ratio=0.2"],
    "explore_ratio=1.0": [*BIDST, "method_args.explore_ratio=1.0"],
    "explore=random": [*BIDST, "method_args.explore=random"],
    "min_swap_fraction=0": [*BIDST, "method_args.min_swap_fraction=0.0"],
    "min_swap_fraction=0.1": [*BIDST, "method_args.min_swap_fraction=0.1"],
    "swap=capped": [*BIDST, "method_args.swap=capped"],
    "bidst weight_decay=1e-4": [*BIDST, "weight_decay=0.0001"],
    "bidst weight_decay=1e-3": [*BIDST, "weight_decay=0.001"],
    "rigl weight_decay=1e-4": ["method=rigl", "weight_decay=0.0001"],
    "rigl weight_decay=1e-3": ["method=rigl", "weight_decay=0.001"],
}


@dataclass(frozen=True)
class Setup:
    """What every run of a grid shares: the model, the epochs and extra `bidst train` overrides."""

    model: str = "mlp"
    epochs: int = 3
    extra: tuple[str, ...] = ()
    ablations: bool = True
    seeds: tuple[int, ...] = SEEDS
    sparsities: tuple[float, ...] = SPARSITIES
    methods: tuple[str, ...] = tuple(METHODS)

    def common(self) -> list[str]:
        return [f"model={self.model}", f"epochs={self.epochs}", "distribution=erk", "threads=1", "progress=false",
                "log_every=1000", *self.extra]


@dataclass(frozen=True)
class Run:
    """One training run of the grid: a label, its CLI overrides and where it writes."""

    label: str
    sparsity: float
    seed: int
    overrides: tuple[str, ...]
    setup: Setup = Setup()

    def folder(self, out: Path) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)
        return out / "runs" / f"{safe}-sp{round(self.sparsity * 100)}-s{self.seed}"

    def command(self, out: Path) -> list[str]:
        args = [*self.setup.common(), *self.overrides, f"sparsity={self.sparsity}", f"seed={self.seed}"]
        return [sys.executable, "-m", "bidst", "train", "--config", RECIPE, *args, "--run-dir", str(self.folder(out))]


def grid(setup: Setup = Setup()) -> list[Run]:
    """The main grid (dense once per seed), then the ablations at 95%, seed by seed in the order they
    are run, so that a grid stopped early holds whole seeds."""
    runs = []
    for s in setup.seeds:
        if "dense" in setup.methods:
            runs.append(Run("dense", 0.0, s, tuple(METHODS["dense"]), setup))
        for sparsity in sorted(setup.sparsities, reverse=True):
            runs += [Run(label, sparsity, s, tuple(METHODS[label]), setup) for label in setup.methods if label != "dense"]
    if setup.ablations:
        runs += [Run(label, 0.95, s, tuple(args), setup) for s in setup.seeds for label, args in ABLATIONS.items()]
    return runs


def train(run: Run, out: Path, stop_at: float = float("inf")) -> None:
    """Train `run` unless it finished before; a half-written folder is replaced. At `stop_at`
    (time.monotonic()) a run still going is killed and one not started is skipped."""
    folder = run.folder(out)
    if (folder / "summary.json").exists():
        return
    if time.monotonic() >= stop_at:
        print(f"skip {folder.name} (deadline)", flush=True)
        return
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{folder.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:  # the code of this checkout, even where another one is pip-installed
        child = subprocess.Popen(run.command(out), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            code = child.wait(timeout=None if stop_at == float("inf") else max(0.0, stop_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            print(f"cut {folder.name} (deadline)", flush=True)
            return
    print(f"{'ok ' if code == 0 else 'ERR'} {folder.name}", flush=True)


def run_flops(folder: Path, summary: dict) -> dict[str, float]:
    """Planned training FLOPs of a finished run by phase, plus 'dense' (a dense run of the full epochs)."""
    cfg = load_config(folder / "config.yaml")
    model = create_model(cfg.model, num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps_per_epoch = (cfg.train_subset or TRAIN_ITEMS - cfg.val_size) // cfg.batch_size
    sp = sparsify(model, opt, cfg.method, cfg.sparsity, total_steps=summary["steps"], distribution=cfg.distribution,
                  steps_per_epoch=steps_per_epoch, seed=cfg.seed, **cfg.method_args)
    rows = model_rows(model, torch.zeros(cfg.batch_size, 1, 28, 28))
    plan = planned_flops(sp, sp.method, rows, summary["steps"])
    plan["dense"] = cfg.epochs * steps_per_epoch * sum(6.0 * sp.numel[n] * rows[n] for n in sp.params)
    return plan


def collect(out: Path, setup: Setup) -> dict[tuple[str, float], list[dict]]:
    """Finished runs grouped by (label, sparsity), each summary with its planned 'flops'."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in grid(setup):
        path = run.folder(out) / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            summary["flops"] = run_flops(run.folder(out), summary)
            groups.setdefault((run.label, run.sparsity), []).append(summary)
    return groups


def mean_std(values: list[float], expected: int) -> str:
    """'mean ± std', marked with n where fewer than the `expected` seeds finished."""
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    partial = "" if len(values) == expected else f" (n={len(values)})"
    return f"{statistics.mean(values):.2f} ± {spread:.2f}{partial}"


def costs(runs: list[dict]) -> tuple[float, float, float]:
    """Mean training FLOPs relative to dense, mask-learning share of them, topology changes."""
    total = [sum(v for k, v in r["flops"].items() if k != "dense") for r in runs]
    rel = statistics.mean(t / r["flops"]["dense"] for t, r in zip(total, runs))
    share = statistics.mean(r["flops"].get("mask_learning", 0.0) / t for t, r in zip(total, runs))
    return rel, share, statistics.mean(r["topology_changes"] for r in runs)


def sparsity_table(groups: dict[tuple[str, float], list[dict]], setup: Setup, columns: tuple[str, ...],
                   cells: Any) -> list[str]:
    """Markdown rows: one per method, `columns` per sparsity filled by `cells(runs)` (dense repeats its runs)."""
    header = " | ".join(f"{round(s * 100)}% {columns[0]} | " + " | ".join(columns[1:]) for s in setup.sparsities)
    lines = [f"| method | {header} |", "|" + " --- |" * (1 + len(columns) * len(setup.sparsities))]
    for label in setup.methods:
        row = []
        for s in setup.sparsities:
            runs = groups.get(("dense", 0.0) if label == "dense" else (label, s), [])
            row += cells(runs) if runs else ["–"] * len(columns)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def report(out: Path, setup: Setup = Setup(), command: str = "python benchmarks/bidst_grid.py --jobs 2", jobs: int = 2) -> str:
    """The generated Markdown: main table, target checks, ablations, and how to regenerate them."""
    groups = collect(out, setup)
    finished = sum(len(v) for v in groups.values())
    planned = len(grid(setup))
    lines = [f"Generated by `{command}` (runs in `{out.name}`) "
             f"({finished} of {planned} runs finished" + ("" if finished == planned else ": **PARTIAL**") + ").",
             "", (f"Test accuracy (%) mean ± std over seeds {', '.join(map(str, setup.seeds))}; "
                  "FLOPs = training FLOPs (forward, backward, dense gradients, mask learning, unrolled passes) "
                  f"relative to dense training for {setup.epochs} epochs; changes = topology changes."), ""]
    n = len(setup.seeds)
    lines += sparsity_table(groups, setup, ("test", "FLOPs", "changes"), lambda runs: [
        mean_std([r["final_test_acc"] for r in runs], n), f"{costs(runs)[0]:.3f}x", f"{costs(runs)[2]:.0f}"])
    lines += ["", ("Validation accuracy, steps trained, mask learning as a share of the training FLOPs, and wall-clock "
                   f"seconds per run (training and evaluation, with up to {jobs} runs sharing the machine: only roughly comparable):"), ""]
    lines += sparsity_table(groups, setup, ("val", "steps", "mask learning", "wall s"), lambda runs: [
        mean_std([r["final_val_acc"] for r in runs], n), f"{statistics.mean(r['steps'] for r in runs):.0f}",
        f"{100 * costs(runs)[1]:.1f}%", f"{statistics.mean(r['wall_time_s'] for r in runs):.0f}"])
    lines += ["", "Targets of the issue (on test means):", ""]
    for s in setup.sparsities:
        acc = {k: [r["final_test_acc"] for r in groups.get((k, s), [])] for k in setup.methods if k != "dense"}
        if not acc.get("bidst"):
            continue
        baselines = {k: statistics.mean(v) for k, v in acc.items() if v and not k.startswith("bidst")}
        budget = 1.05 * costs(groups[("bidst", s)])[0]  # baselines within 5% of BiDST's training FLOPs
        matched = {k: v for k, v in baselines.items() if costs(groups[(k, s)])[0] <= budget}
        b = statistics.mean(acc["bidst"])
        control = acc.get("bidst-control", [])
        c = statistics.mean(control) if control else float("nan")
        spread = max((statistics.stdev(v) for v in (acc["bidst"], control) if len(v) > 1), default=0.0)
        line = f"- {round(s * 100)}%: BiDST {b:.2f}"
        for kind, pool in (("at matched FLOPs", matched), ("at any cost", baselines)):
            if pool:
                best = max(pool, key=pool.__getitem__)
                line += f"; best baseline {kind}: {best} {pool[best]:.2f} ({'met' if b >= pool[best] else 'not met'})"
        if "rigl" in baselines:
            line += f"; BiDST − RigL {b - baselines['rigl']:+.2f}"
        if s == 0.98 and "rigl" in baselines:
            line += " (target ≥ +0.5: " + ("met" if b - baselines["rigl"] >= 0.5 else "not met") + ")"
        line += f"; BiDST − control {b - c:+.2f} against a seed spread of {spread:.2f}"
        line += " (met)" if b - c > spread else " (not met)"
        lines.append(line)
    shares = [costs(groups[("bidst", s)])[1] for s in setup.sparsities if groups.get(("bidst", s))]
    if shares:
        lines.append(f"- mask learning {100 * max(shares):.2f}% of training FLOPs at most (target ≤ 3%: "
                     f"{'met' if max(shares) <= 0.03 else 'not met'})")
    if setup.ablations:
        lines += ["", "Ablations at 95% sparsity (BiDST rows run with `match_flops=rigl` unless said otherwise):", "",
                  "| variant | test | val | FLOPs | steps | mask learning | changes |", "|" + " --- |" * 7]
        for label in ["bidst", "bidst-control", "rigl", *ABLATIONS]:
            runs = groups.get((label, 0.95), [])
            if runs:
                rel, share, changes = costs(runs)
                test, val = mean_std([r["final_test_acc"] for r in runs], n), mean_std([r["final_val_acc"] for r in runs], n)
                steps = statistics.mean(r["steps"] for r in runs)
                lines.append(f"| {label} | {test} | {val} | {rel:.3f}x | {steps:.0f} | {100 * share:.1f}% | {changes:.0f} |")
    example = Run("bidst", max(setup.sparsities), setup.seeds[0], tuple(METHODS["bidst"]), setup)
    lines += ["", (f"One run by hand (what the script runs for each cell, here BiDST at {round(example.sparsity * 100)}%, "
                   f"seed {example.seed}):"), "", "```",
              " ".join(["python", *example.command(Path("runs") / out.name)[1:]]), "```"]
    return "\n".join(lines)


def write_results(text: str, path: Path, section: str = "grid") -> None:
    """Replace the text between the `section` markers of `path` (appending them if missing)."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    else:
        new = old + f"\n{start}\n{text}\n{end}\n"
    path.write_text(new)


def parse_list(kind: Any) -> Any:
    """An argparse type: a comma-separated list of `kind` values, as a tuple."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {kind.__name__}: {text!r}") from err
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bidst-grid")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each uses one thread)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the tables from finished runs")
    parser.add_argument("--limit", type=int, default=0, help="train only the first N runs of the grid (0: all)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--section", default="grid", help="the results file's <!-- NAME:start/end --> markers to rewrite")
    parser.add_argument("--only", default="", help="comma-separated labels: train only these, rewrite no tables")
    parser.add_argument("--model", default="mlp", help="the model of every run (`bidst models`)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the dense and baseline runs")
    parser.add_argument("--no-ablations", action="store_true", help="the main grid only")
    parser.add_argument("--seeds", type=parse_list(int), default=SEEDS, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--sparsities", type=parse_list(float), default=SPARSITIES,
                        help="comma-separated sparsities (default 0.9,0.95,0.98)")
    parser.add_argument("--methods", type=parse_list(str), default=tuple(METHODS),
                        help="comma-separated method labels of the main grid (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds from now at which runs still going are killed and the rest skipped (0: none)")
    args = parser.parse_args()
    if bad := [item for item in args.set if "=" not in item]:
        parser.error(f"--set needs KEY=VALUE, got {bad[0]!r}")
    if unknown := [label for label in args.methods if label not in METHODS]:
        parser.error(f"unknown label(s) for --methods: {', '.join(unknown)} (labels: {', '.join(METHODS)})")
    if bad := [s for s in args.sparsities if not 0.0 < s < 1.0]:
        parser.error(f"--sparsities must lie strictly between 0 and 1, got {bad[0]}")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    for name in ("seeds", "sparsities", "methods"):  # a repeated value would train one run folder twice at once
        values = getattr(args, name)
        if len(set(values)) < len(values):
            parser.error(f"--{name} lists a value twice: {','.join(map(str, values))}")
    setup = Setup(args.model, args.epochs, tuple(args.set), not args.no_ablations, args.seeds, args.sparsities, args.methods)
    only = [label for label in args.only.split(",") if label]
    labels = {run.label for run in grid(setup)}
    if unknown := [label for label in only if label not in labels]:
        parser.error(f"unknown label(s) for --only: {', '.join(unknown)} (labels: {', '.join(sorted(labels))})")
    if not args.report_only:
        stop_at = time.monotonic() + args.deadline if args.deadline > 0 else float("inf")
        runs = [run for run in grid(setup)[: args.limit or None] if not only or run.label in only]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: train(run, args.out, stop_at), runs))
    if only:  # the tables need every run of the grid; a partial set would overwrite them with gaps
        print(f"trained {', '.join(only)} in {args.out}; tables not rewritten")
        return
    flags = [f"--{k} {v}" for k, v, default in (("model", args.model, "mlp"), ("epochs", args.epochs, 3)) if v != default]
    flags += ["--no-ablations"] * args.no_ablations + [f"--set {item}" for item in args.set]
    for name, values, default in (("seeds", args.seeds, SEEDS), ("sparsities", args.sparsities, SPARSITIES),
                                  ("methods", args.methods, tuple(METHODS))):
        if tuple(values) != tuple(default):
            joined = ",".join(map(str, values))
            flags.append(f"--{name} '{joined}'" if " " in joined else f"--{name} {joined}")
    flags += [f"--deadline {args.deadline:g}"] * (args.deadline > 0) + [f"--section {args.section}"] * (args.section != "grid")
    command = " ".join(["python benchmarks/bidst_grid.py", *flags, f"--jobs {args.jobs}"])
    write_results(report(args.out, setup, command, args.jobs), args.results, args.section)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
