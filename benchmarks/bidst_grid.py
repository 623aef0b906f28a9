"""The BiDST evidence grid: baselines and BiDST on Fashion-MNIST at 90/95/98% sparsity, 3 seeds, matched FLOPs.

Not a test. It trains about 110 short runs (LeNet-300-100 `mlp`, 3 epochs, full training split)
through the `bidst train` CLI, skips every run that already has a summary.json (stop and restart at
will), and rewrites the generated part of docs/results.md (between its grid markers) with accuracy
mean ± std, training FLOPs relative to dense, topology changes and the ablations at 95%.

    python benchmarks/bidst_grid.py --out runs/bidst-grid --jobs 2       # about an hour on 2 CPU cores
    python benchmarks/bidst_grid.py --out runs/bidst-grid --report-only  # tables from what has finished
    python benchmarks/bidst_grid.py --only bidst,bidst-control --jobs 1  # train these labels, leave the docs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bidst.budget import layer_rows, planned_flops
from bidst.config import load_config
from bidst.engine import sparsify
from bidst.models import create_model

RECIPE = "configs/fashion-mnist.yaml"
COMMON = ["model=mlp", "epochs=3", "distribution=erk", "threads=1", "progress=false", "log_every=1000"]
SPARSITIES = (0.9, 0.95, 0.98)
SEEDS = (0, 1, 2)
TRAIN_ITEMS = 60000  # Fashion-MNIST's training split, before the validation carve-out
MARKERS = ("<!-- grid:start -->", "<!-- grid:end -->")
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
class Run:
    """One training run of the grid: a label, its CLI overrides and where it writes."""

    label: str
    sparsity: float
    seed: int
    overrides: tuple[str, ...]

    def folder(self, out: Path) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.label)
        return out / "runs" / f"{safe}-sp{round(self.sparsity * 100)}-s{self.seed}"

    def command(self, out: Path) -> list[str]:
        args = [*COMMON, *self.overrides, f"sparsity={self.sparsity}", f"seed={self.seed}"]
        return [sys.executable, "-m", "bidst", "train", "--config", RECIPE, *args, "--run-dir", str(self.folder(out))]


def grid() -> list[Run]:
    """The main grid (dense once per seed), then the ablations at 95%, in the order they are run."""
    runs = [Run("dense", 0.0, s, tuple(METHODS["dense"])) for s in SEEDS]
    for sparsity in (0.98, 0.95, 0.9):
        for label, overrides in METHODS.items():
            if label != "dense":
                runs += [Run(label, sparsity, s, tuple(overrides)) for s in SEEDS]
    for label, overrides in ABLATIONS.items():
        runs += [Run(label, 0.95, s, tuple(overrides)) for s in SEEDS]
    return runs


def train(run: Run, out: Path) -> None:
    """Train `run` unless it finished before; a half-written folder is replaced."""
    folder = run.folder(out)
    if (folder / "summary.json").exists():
        return
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as f:  # the code of this checkout, even where another one is pip-installed
        done = subprocess.run(run.command(out), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    print(f"{'ok ' if done.returncode == 0 else 'ERR'} {folder.name}", flush=True)


def run_flops(folder: Path, summary: dict) -> dict[str, float]:
    """Planned training FLOPs of a finished run by phase, plus 'dense' (a dense run of the full epochs)."""
    cfg = load_config(folder / "config.yaml")
    model = create_model(cfg.model, num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps_per_epoch = (cfg.train_subset or TRAIN_ITEMS - cfg.val_size) // cfg.batch_size
    sp = sparsify(model, opt, cfg.method, cfg.sparsity, total_steps=summary["steps"], distribution=cfg.distribution,
                  steps_per_epoch=steps_per_epoch, seed=cfg.seed, **cfg.method_args)
    rows = layer_rows(model, sp.modules, torch.zeros(cfg.batch_size, 1, 28, 28))
    plan = planned_flops(sp, sp.method, rows, summary["steps"])
    plan["dense"] = cfg.epochs * steps_per_epoch * sum(6.0 * sp.numel[n] * rows[n] for n in sp.params)
    return plan


def collect(out: Path) -> dict[tuple[str, float], list[dict]]:
    """Finished runs grouped by (label, sparsity), each summary with its planned 'flops'."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for run in grid():
        path = run.folder(out) / "summary.json"
        if path.exists():
            summary = json.loads(path.read_text())
            summary["flops"] = run_flops(run.folder(out), summary)
            groups.setdefault((run.label, run.sparsity), []).append(summary)
    return groups


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    partial = "" if len(values) == len(SEEDS) else f" (n={len(values)})"
    return f"{statistics.mean(values):.2f} ± {spread:.2f}{partial}"


def costs(runs: list[dict]) -> tuple[float, float, float]:
    """Mean training FLOPs relative to dense, mask-learning share of them, topology changes."""
    total = [sum(v for k, v in r["flops"].items() if k != "dense") for r in runs]
    rel = statistics.mean(t / r["flops"]["dense"] for t, r in zip(total, runs))
    share = statistics.mean(r["flops"].get("mask_learning", 0.0) / t for t, r in zip(total, runs))
    return rel, share, statistics.mean(r["topology_changes"] for r in runs)


def sparsity_table(groups: dict[tuple[str, float], list[dict]], columns: tuple[str, ...], cells: Any) -> list[str]:
    """Markdown rows: one per method, `columns` per sparsity filled by `cells(runs)` (dense repeats its runs)."""
    header = " | ".join(f"{round(s * 100)}% {columns[0]} | " + " | ".join(columns[1:]) for s in SPARSITIES)
    lines = [f"| method | {header} |", "|" + " --- |" * (1 + len(columns) * len(SPARSITIES))]
    for label in METHODS:
        row = []
        for s in SPARSITIES:
            runs = groups.get(("dense", 0.0) if label == "dense" else (label, s), [])
            row += cells(runs) if runs else ["–"] * len(columns)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return lines


def report(out: Path) -> str:
    """The generated Markdown: main table, target checks, ablations, and how to regenerate them."""
    groups = collect(out)
    finished = sum(len(v) for v in groups.values())
    planned = len(grid())
    lines = [f"Generated by `python benchmarks/bidst_grid.py --jobs 2` (runs in `{out.name}`) "
             f"({finished} of {planned} runs finished" + ("" if finished == planned else ": **PARTIAL**") + ").",
             "", ("Test accuracy (%) mean ± std over seeds 0, 1, 2; "
                  "FLOPs = training FLOPs (forward, backward, dense gradients, mask learning, unrolled passes) "
                  "relative to dense training for 3 epochs; changes = topology changes."), ""]
    lines += sparsity_table(groups, ("test", "FLOPs", "changes"), lambda runs: [
        mean_std([r["final_test_acc"] for r in runs]), f"{costs(runs)[0]:.3f}x", f"{costs(runs)[2]:.0f}"])
    lines += ["", ("Validation accuracy, steps trained, mask learning as a share of the training FLOPs, and wall-clock "
                   "seconds per run (training and evaluation, on a shared CPU: only roughly comparable):"), ""]
    lines += sparsity_table(groups, ("val", "steps", "mask learning", "wall s"), lambda runs: [
        mean_std([r["final_val_acc"] for r in runs]), f"{statistics.mean(r['steps'] for r in runs):.0f}",
        f"{100 * costs(runs)[1]:.1f}%", f"{statistics.mean(r['wall_time_s'] for r in runs):.0f}"])
    lines += ["", "Targets of the issue (on test means):", ""]
    for s in SPARSITIES:
        acc = {k: [r["final_test_acc"] for r in groups.get((k, s), [])] for k in METHODS if k != "dense"}
        if not acc["bidst"]:
            continue
        baselines = {k: statistics.mean(v) for k, v in acc.items() if v and not k.startswith("bidst")}
        budget = 1.05 * costs(groups[("bidst", s)])[0]  # baselines within 5% of BiDST's training FLOPs
        matched = {k: v for k, v in baselines.items() if costs(groups[(k, s)])[0] <= budget}
        b = statistics.mean(acc["bidst"])
        c = statistics.mean(acc["bidst-control"]) if acc["bidst-control"] else float("nan")
        spread = max((statistics.stdev(v) for v in (acc["bidst"], acc["bidst-control"]) if len(v) > 1), default=0.0)
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
    shares = [costs(groups[("bidst", s)])[1] for s in SPARSITIES if groups.get(("bidst", s))]
    if shares:
        lines.append(f"- mask learning {100 * max(shares):.2f}% of training FLOPs at most (target ≤ 3%: "
                     f"{'met' if max(shares) <= 0.03 else 'not met'})")
    lines += ["", "Ablations at 95% sparsity (BiDST rows run with `match_flops=rigl` unless said otherwise):", "",
              "| variant | test | val | FLOPs | steps | mask learning | changes |", "|" + " --- |" * 7]
    for label in ["bidst", "bidst-control", "rigl", *ABLATIONS]:
        runs = groups.get((label, 0.95), [])
        if runs:
            rel, share, changes = costs(runs)
            test, val = mean_std([r["final_test_acc"] for r in runs]), mean_std([r["final_val_acc"] for r in runs])
            steps = statistics.mean(r["steps"] for r in runs)
            lines.append(f"| {label} | {test} | {val} | {rel:.3f}x | {steps:.0f} | {100 * share:.1f}% | {changes:.0f} |")
    example = Run("bidst", 0.98, 0, tuple(METHODS["bidst"]))
    lines += ["", "One run by hand (what the script runs for each cell, here BiDST at 98%, seed 0):", "", "```",
              " ".join(["python", *example.command(Path("runs/bidst-grid"))[1:]]), "```"]
    return "\n".join(lines)


def write_results(text: str, path: Path) -> None:
    """Replace the text between the grid markers of `path` (appending them if missing)."""
    start, end = MARKERS
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    else:
        new = old + f"\n{start}\n{text}\n{end}\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bidst-grid")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each uses one thread)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the tables from finished runs")
    parser.add_argument("--limit", type=int, default=0, help="train only the first N runs of the grid (0: all)")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--only", default="", help="comma-separated labels: train only these, rewrite no tables")
    args = parser.parse_args()
    only = [label for label in args.only.split(",") if label]
    labels = {run.label for run in grid()}
    if unknown := [label for label in only if label not in labels]:
        parser.error(f"unknown label(s) for --only: {', '.join(unknown)} (labels: {', '.join(sorted(labels))})")
    if not args.report_only:
        runs = [run for run in grid()[: args.limit or None] if not only or run.label in only]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: train(run, args.out), runs))
    if only:  # the tables need every run of the grid; a partial set would overwrite them with gaps
        print(f"trained {', '.join(only)} in {args.out}; tables not rewritten")
        return
    write_results(report(args.out), args.results)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
