"""Helpers for the scale-out and fault tests: tiny recipe runs, stopping a run early, comparing finished runs."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

import bidst
from bidst import recipe
from bidst.config import TrainConfig, load_config

# 512 items in global batches of 64: 8 steps an epoch, 16 in all; topology changes every 5 steps until step 12.
# On the CPU even where CUDA is present: the runs are compared for exact equality, the fault tests fork them
# (a forked child cannot use CUDA once its parent has) and the DDP tests run two ranks on one machine.
TINY = ["model=mlp", "dataset=synthetic", "train_subset=512", "batch_size=64", "epochs=2", "val_size=0",
        "progress=false", "log_every=1", "threads=1", "checkpoint_every=1", "keep_checkpoints=100", "device=cpu"]


LOAD_DATA = recipe.load_data
_DATASETS: dict[tuple, tuple[Any, Any, Any, Any]] = {}


def _load_data_once(cfg: TrainConfig) -> tuple[Any, Any, Any, Any]:
    """`recipe.load_data`, remembered per dataset settings."""
    key = (cfg.dataset, cfg.data_root, cfg.train_subset, cfg.val_size, cfg.augment, cfg.holdout_size)
    if key not in _DATASETS:
        _DATASETS[key] = LOAD_DATA(cfg)
    return _DATASETS[key]


def reuse_datasets() -> None:
    """Make the recipe build each dataset once per process (the synthetic set's 10,000 images take a while)."""
    recipe.load_data = _load_data_once


class SpawnTimeout(AssertionError):
    """Spawned processes were still running at their deadline (and were killed)."""


def spawn(fn: Callable[..., None], args: tuple, nprocs: int, done: Callable[[], bool], seconds: float = 300.0) -> None:
    """torch.multiprocessing.spawn that cannot hang the suite: processes still running after `seconds` are killed.
    If `done()` then holds (every rank wrote its result, so only a gloo teardown hung), that counts as finished;
    otherwise SpawnTimeout. A process that fails raises as in mp.spawn."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
                process.join()
            if not done():
                raise SpawnTimeout(f"{nprocs} spawned processes were still running after {seconds:.0f} s")
            return


def method_args(method: str) -> list[str]:
    """Overrides that make `method` change its topology within a few steps (as conftest.fast_options)."""
    opts = bidst.method_options(method)
    fast = {"interval": 5, "interval_unit": "steps", "iterations": 5}
    return [f"method={method}"] + [f"method_args.{k}={v}" for k, v in fast.items() if k in opts]


def tiny_args(method: str, *extra: str) -> list[str]:
    """The `key=value` overrides of a tiny run of `method`."""
    return [*TINY, *method_args(method), *extra]


def tiny_config(method: str, *extra: str) -> TrainConfig:
    """The config of a tiny run of `method`."""
    return load_config(None, tiny_args(method, *extra))


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted((run / "checkpoints").glob("step-*.pt"))


def final_state(run: Path) -> dict:
    """The newest checkpoint of a run (after a finished run: the end of the last epoch)."""
    return torch.load(checkpoints(run)[-1], weights_only=True)


def change_steps(run: Path) -> list[int]:
    """Optimizer steps after which the topology changed, read from the step lines (log_every=1)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "step"]
    return [b["step"] for a, b in zip([{"topology_changes": 0}, *steps], steps)
            if b["topology_changes"] > a["topology_changes"]]


def stop_steps(run: Path) -> list[int]:
    """Where to stop a copy of `run`: just before and just after its first topology change (else mid-epoch 1, 2)."""
    changes = change_steps(run)
    return [changes[0] - 1, changes[0]] if changes else [5, 11]


def stopped_copy(run: Path, copy: Path, stop: int) -> None:
    """Make `copy` look like `run` killed right after the checkpoint of step `stop` (later files never written)."""
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", copy / "config.yaml")
    shutil.copy(run / "metrics.jsonl", copy / "metrics.jsonl")  # lines past the checkpoint are cut on resume
    for ckpt in checkpoints(run):
        if int(ckpt.stem.split("-")[1]) <= stop:
            shutil.copy(ckpt, copy / "checkpoints" / ckpt.name)


def _metrics_lines(run: Path) -> list[str]:
    """The run's metrics lines, without the measured rebuild time (the masked backend's is always 0.0)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.dumps({k: v for k, v in json.loads(line).items() if k != "rebuild_s"}) for line in lines]


def assert_same_run(a: Path, b: Path) -> None:
    """Two finished runs are equal bit for bit: weights, optimizer, masks, method state, RNGs and metrics."""
    sa, sb = final_state(a), final_state(b)
    assert sa["sparsifier"]["step"] == sb["sparsifier"]["step"]
    assert_equal_tree(sa["model"], sb["model"])
    assert_equal_tree(sa["optimizer"], sb["optimizer"])
    for state in (sa, sb):  # measured (the sparse backend's rebuild time), not computed
        assert state["sparsifier"].pop("rebuild_seconds") >= 0.0
    assert_equal_tree(sa["sparsifier"], sb["sparsifier"])
    assert torch.equal(sa["rng_cpu"], sb["rng_cpu"])
    assert _metrics_lines(a) == _metrics_lines(b)
    summary_a, summary_b = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    for key in ("wall_time_s", "time", "peak_memory_bytes", "rebuild_s"):  # measured, not computed
        summary_a.pop(key, None), summary_b.pop(key, None)
    assert summary_a == summary_b


def assert_equal_tree(a: object, b: object, path: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are equal, tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            assert_equal_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b or (a != a and b != b), path  # NaN equals NaN here
