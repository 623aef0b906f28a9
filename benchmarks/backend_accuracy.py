"""Does `backend: sparse` train to the same accuracy as `masked`? On Fashion-MNIST, 3 seeds each.

Not a test. Short runs (LeNet-300-100 `mlp`, 3 epochs, ERK, one thread, one run at a time) through
the `bidst train` CLI; finished runs (with a summary.json) are skipped. Prints a Markdown table of
test accuracy (mean ± std) and training seconds per run for both backends, the one
docs/performance.md quotes (RigL at 90 and 98%; BiDST, at RigL's FLOPs, with `--methods bidst
--sparsities 0.98` for docs/bidst.md).

    python benchmarks/backend_accuracy.py --out runs/backend-accuracy   # about 3 minutes on an idle core
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--config", "configs/fashion-mnist.yaml", "model=mlp", "epochs=3", "distribution=erk", "threads=1",
          "progress=false", "log_every=1000"]  # fmt: skip
METHOD_ARGS = {"rigl": ["method=rigl"], "bidst": ["method=bidst", "match_flops=rigl"]}
SEEDS = (0, 1, 2)
BACKENDS = ("masked", "sparse")


def train(out: Path, method: str, backend: str, sparsity: float, seed: int) -> dict:
    """Run one cell unless it has finished; return its summary."""
    run = out / f"{method}-{backend}-sp{round(sparsity * 100)}-s{seed}"
    if not (run / "summary.json").exists():
        subprocess.run(["rm", "-rf", str(run)], check=True)
        cmd = [sys.executable, "-m", "bidst", "train", *COMMON, *METHOD_ARGS[method], f"sparsity={sparsity}", f"seed={seed}",
               f"backend={backend}", "--run-dir", str(run)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run / "summary.json").read_text())


def mean_std(values: list[float], digits: int = 2) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/backend-accuracy", help="folder of the runs")
    ap.add_argument("--methods", default="rigl", help=f"comma-separated, of: {', '.join(METHOD_ARGS)}")
    ap.add_argument("--sparsities", default="0.9,0.98")
    args = ap.parse_args()
    out = Path(args.out).resolve()  # the runs train with the repository as working folder
    methods = args.methods.split(",")
    if any(m not in METHOD_ARGS for m in methods):
        ap.error(f"--methods must name some of {', '.join(METHOD_ARGS)}")
    print("| method | sparsity | backend | test accuracy | training s per run |")
    print("| --- | --- | --- | --- | --- |")
    for method in methods:
        for sparsity in (float(x) for x in args.sparsities.split(",")):
            for backend in BACKENDS:
                runs = [train(out, method, backend, sparsity, seed) for seed in SEEDS]
                acc = [r["final_test_acc"] for r in runs]
                secs = [r["time"]["total"] for r in runs]  # forward, backward and optimizer/method phases
                print(f"| {method} | {sparsity:.0%} | {backend} | {mean_std(acc)} | {mean_std(secs, 1)} |", flush=True)


if __name__ == "__main__":
    main()
