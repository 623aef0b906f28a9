"""Check that everything runs on CUDA, for a lent GPU machine; prints a Markdown table.

It runs every method, BiDST's options, mixed precision, the sparse backend's fallback, DDP under torchrun,
and an exact resume after SIGTERM.

    python scripts/gpu_check.py --data-root .fmnist/fashion-mnist --out runs/gpu-check --jobs 8

Each run is a short `bidst train` (the CNN on 4,096 Fashion-MNIST images, 2 epochs, topology updates every
5 steps) on `device=cuda`; a row fails when the run exits non-zero, reaches a non-finite or chance-level
accuracy, or (for a DST method) never changes its topology. Exits 1 if any row failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

BASE = ["model=cnn", "epochs=2", "train_subset=4096", "val_size=1000", "progress=false", "log_every=1000",
        "threads=1"]  # fmt: skip
FAST = "method_args.interval=5"  # RigL-style schedules: a topology update every 5 steps
CHECKS: dict[str, list[str]] = {
    "dense": ["method=dense"],
    "static": ["method=static"],
    "snip": ["method=snip"],
    "grasp": ["method=grasp"],
    "synflow": ["method=synflow"],
    "set": ["method=set", FAST],
    "rigl": ["method=rigl", FAST],
    "snfs": ["method=snfs", FAST],
    "mest": ["method=mest", "method_args.interval=1"],  # counted in epochs
    "gmp": ["method=gmp", FAST],
    "granet": ["method=granet", FAST],
    "bidst": ["method=bidst", "method_args.mask_interval=5", "match_flops=rigl"],
    "bidst implicit_diag": ["method=bidst", "method_args.mask_interval=5", "method_args.hypergradient=implicit_diag"],
    "bidst unrolled": ["method=bidst", "method_args.mask_interval=5", "method_args.hypergradient=unrolled"],
    "bidst explore=random, rank=psi": ["method=bidst", "method_args.mask_interval=5", "method_args.explore=random",
                                       "method_args.rank=psi"],
    "bidst grow_init=shadow, mask_rows=0.1 grad_norm": [
        "method=bidst", "method_args.mask_interval=5", "method_args.grow_init=shadow", "method_args.mask_rows=0.1",
        "method_args.row_sampling=grad_norm"],
    "rigl bf16": ["method=rigl", FAST, "precision=bf16"],
    "rigl fp16": ["method=rigl", FAST, "precision=fp16"],
    "bidst bf16": ["method=bidst", "method_args.mask_interval=5", "precision=bf16"],
    "rigl backend=sparse (masked fallback on CUDA)": ["method=rigl", FAST, "backend=sparse"],
    "bidst backend=sparse": ["method=bidst", "method_args.mask_interval=5", "backend=sparse"],
}  # fmt: skip
STATIC = {"dense", "static", "snip", "grasp", "synflow"}
RESUME = ["method=rigl", FAST, "model=mlp", "checkpoint_every=10"]  # MLP: no cuDNN autotuning, so bitwise comparable


def train(argv: list[str], run: Path, launcher: list[str] | None = None) -> tuple[int, dict, str]:
    """Run `bidst train` into `run`; (exit code, summary or {}, the output's last line)."""
    cmd = [*(launcher or [sys.executable, "-m"]), "bidst", "train", *argv, "--run-dir", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    summary = run / "summary.json"
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, json.loads(summary.read_text()) if summary.exists() else {}, tail[-1] if tail else ""


def verdict(name: str, code: int, summary: dict, tail: str) -> tuple[bool, str]:
    """Whether a check passed, and what to show for it."""
    if code != 0 or not summary:
        return False, f"exit {code}: {tail}"
    acc, changes = summary["final_test_acc"], summary["topology_changes"]
    ok = acc == acc and acc > 20.0 and (changes > 0 or name.split()[0] in STATIC)
    return ok, f"test {acc:.2f}%, {changes} topology changes, sparsity {summary['measured_sparsity']:.3f}"


def resume_check(base: list[str], out: Path) -> tuple[bool, str]:
    """Stop a run with SIGTERM after its first checkpoint, resume it, and compare its final weights with an uninterrupted run's."""
    argv = [*base, *RESUME]
    code, _, tail = train(argv, out / "resume-reference")
    if code != 0:
        return False, f"reference run: exit {code}: {tail}"
    run = out / "resume-interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "bidst", "train", *argv, "--run-dir", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not list((run / "checkpoints").glob("step-*.pt")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stopped = proc.wait()
    code, _, tail = train(["--resume"], run)
    if code != 0:
        return False, f"resume: exit {code}: {tail}"
    last = lambda r: sorted((r / "checkpoints").glob("step-*.pt"))[-1]  # noqa: E731
    a = torch.load(last(out / "resume-reference"), map_location="cpu", weights_only=False)["model"]
    b = torch.load(last(run), map_location="cpu", weights_only=False)["model"]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return same, f"stopped with exit {stopped}, resumed; final weights {'identical' if same else 'DIFFER'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    ap.add_argument("--jobs", type=int, default=8, help="runs at a time on the one GPU")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    if not Path(args.data_root).is_dir():
        print(f"gpu_check: --data-root {args.data_root}: no such folder", file=sys.stderr)
        return 2
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"gpu_check: {args.out} exists and is not an empty folder; choose another --out", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    from bidst.config import yaml_value  # the folder as written (a name such as 2024 stays a string)

    base = [*BASE, f"device={args.device}", f"data_root={yaml_value(args.data_root)}"]
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = {name: pool.submit(train, [*base, *extra], args.out / name.replace(" ", "_").replace(",", ""))
                for name, extra in CHECKS.items()}  # fmt: skip
        ddp = pool.submit(train, [*base, "method=rigl", FAST], args.out / "ddp",
                          ["torchrun", "--standalone", "--nproc-per-node=1", "-m"])  # fmt: skip
        resumed = pool.submit(resume_check, base, args.out)
        rows = [(name, *verdict(name, *future.result())) for name, future in runs.items()]
        rows.append(("rigl under torchrun (DDP, nccl, 1 process)", *verdict("rigl", *ddp.result())))
        rows.append(("rigl on the MLP: SIGTERM after a checkpoint, --resume", *resumed.result()))
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{device}, torch {torch.__version__}, {time.monotonic() - start:.0f} s\n")
    print("| check | result | |\n| --- | --- | --- |")
    for name, ok, text in rows:
        print(f"| {name} | {'ok' if ok else 'FAILED'} | {text} |")
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
