"""`bidst sweep`: run the cartesian product of a grid of configs as resumable training runs.

A sweep file is YAML::

    base: recipes/cifar10.yaml        # training recipe, relative to the sweep file
    out: runs/sparsity-sweep          # where run folders go, relative to the sweep file
    grid: {method: [rigl, set], sparsity: [0.9, 0.95], seed: [0, 1, 2]}
    overrides: {epochs: 160}          # optional, for every run
    method_overrides: {bidst: {epochs: 158}, dense: {sparsity: 0.0}}   # optional, per method

Each run gets its own folder, ``method=rigl/sparsity=0.9/seed=0`` (method, sparsity, the other
grid keys sorted, seed) and its output in ``seed=0.log`` beside it. Finished runs
(``summary.json``) are skipped and started ones (``config.yaml`` or a checkpoint) are resumed
with ``--resume``, so rerunning an interrupted sweep only does the missing work. Settings apply
in the order ``overrides`` < ``grid`` < ``method_overrides`` (the most specific wins; each key is
passed once), and points that a method override makes identical run once: above, one dense run
per seed instead of one per sparsity.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from tqdm import tqdm

from .checkpoint import make_folder
from .config import load_config, load_yaml, yaml_value
from .errors import BidstError
from .report import flatten

_KEYS = {"base", "out", "grid", "overrides", "method_overrides"}
_REQUIRED = ("base", "out", "grid")
_POLL_S = 0.05  # how often finished children are collected
_TERMINATE_GRACE_S = 10.0  # how long a terminated child may take before it is killed
TRAIN_CMD = (sys.executable, "-m", "bidst", "train")  # what trains one run (tests pass a fake)
# what sizes a run's torch (OpenMP, MKL) and Numba thread pools when its config leaves `threads` at 0
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid: its folder and its ``key=value`` overrides."""

    name: str  # folder relative to the sweep's out, e.g. "method=rigl/sparsity=0.9/seed=0"
    run_dir: Path
    overrides: tuple[str, ...]

    @property
    def log_path(self) -> Path:
        """The run's stdout/stderr, beside its folder (`bidst train` wants a new run's folder empty)."""
        return self.run_dir.with_name(self.run_dir.name + ".log")

    def status(self) -> str:
        """"done" (summary.json), "resume" (the run was started: config or checkpoints) or "new"."""
        if (self.run_dir / "summary.json").exists():
            return "done"
        checkpoints = self.run_dir / "checkpoints"
        started = (self.run_dir / "config.yaml").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir()))
        return "resume" if started else "new"


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file: the recipe every run starts from and the expanded runs."""

    base: Path
    out: Path
    runs: tuple[SweepRun, ...]


def _folder_part(key: str, value: Any) -> str:
    """A run folder's part for one grid value; strings as they are (the override quotes them where YAML needs it)."""
    return re.sub(r"[^\w.=+-]", "_", f"{key}={value if isinstance(value, str) else yaml_value(value)}")


def _name_order(keys: Sequence[str]) -> list[str]:
    first = [k for k in ("method", "sparsity") if k in keys]
    last = ["seed"] if "seed" in keys else []
    return first + sorted(set(keys) - set(first) - set(last)) + last


def _mapping(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BidstError(f"{what} must be a mapping, got {type(data).__name__}")
    return data


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file and expand its grid; problems raise a one-line BidstError."""
    path = Path(path)
    try:
        spec = _mapping(load_yaml(path.read_text()), f"sweep file {path}")
    except OSError as e:
        raise BidstError(f"cannot read sweep file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # not a text file
        raise BidstError(f"cannot read sweep file {path}: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        raise BidstError(f"sweep file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    missing = [k for k in _REQUIRED if k not in spec]
    unknown = sorted(set(spec) - _KEYS)
    if missing or unknown:
        raise BidstError(
            f"sweep file {path}: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})"] if unknown else [])
            )
        )
    if not isinstance(spec["base"], str):
        raise BidstError(f"sweep file {path}: base must name a recipe YAML file, got {spec['base']!r} "
                         "(config keys go under overrides)")
    if not isinstance(spec["out"], str) or not spec["out"]:
        raise BidstError(f"sweep file {path}: out must name the folder of the runs, got {spec['out']!r}")
    base = path.parent / spec["base"]
    if not base.is_file():
        raise BidstError(f"sweep file {path}: base recipe {base} does not exist")
    grid = _mapping(spec["grid"], "grid")
    if not grid:
        raise BidstError("grid must name at least one key")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise BidstError(f"grid.{key} must be a non-empty list, got {values!r}")
    overrides = flatten(_mapping(spec.get("overrides") or {}, "overrides"))
    per_method = _mapping(spec.get("method_overrides") or {}, "method_overrides")
    stray = sorted(set(per_method) - set(map(str, grid.get("method", []))))
    if stray:
        raise BidstError(f"method_overrides names methods not in grid.method: {', '.join(stray)}")
    for key, values in grid.items():
        parts = [_folder_part(key, v) for v in values]
        equal = any(a == b and type(a) is not bool for i, a in enumerate(values) for b in values[i + 1 :])  # 0, 0.0
        if equal or len(set(parts)) != len(parts):
            raise BidstError(f"grid.{key} repeats a value (or two values give the same folder name)")
    out = path.parent / spec["out"]
    order = _name_order(list(grid))
    runs: dict[str, SweepRun] = {}
    for values in itertools.product(*(grid[k] for k in order)):
        point = dict(zip(order, values))
        settings = dict(overrides)
        settings.update(point)
        settings.update(flatten(_mapping(per_method.get(str(point.get("method")), {}), "method_overrides entry")))
        name = "/".join(_folder_part(k, settings[k]) for k in order)
        runs[name] = SweepRun(name, out / name, tuple(f"{k}={yaml_value(v)}" for k, v in settings.items()))
    sweep = Sweep(base, out, tuple(runs.values()))
    check_runs(sweep)
    return sweep


def check_runs(sweep: Sweep) -> None:
    """Check every run's config as `bidst train` would before its data loads, so a bad grid value stops the
    sweep before any run starts instead of failing in each run it reaches."""
    from .recipe import (  # imports torch: only when checking
        check_config,
        resolve_device,
        saved_config_diff,
    )

    for run in sweep.runs:
        try:
            cfg = load_config(sweep.base, list(run.overrides))
            check_config(cfg)
            resolve_device(cfg.device)
        except BidstError as e:
            raise BidstError(f"run {run.name}: {e}") from None
        # finished or started earlier: with these settings? (one started without a config is left to its own resume)
        status = run.status()
        if status == "new" or (status == "resume" and not (run.run_dir / "config.yaml").exists()):
            continue
        try:
            diff = saved_config_diff(cfg, run.run_dir)
        except BidstError as e:
            raise BidstError(f"run {run.name}: {e}") from None
        if diff and status == "done":
            raise BidstError(f"run {run.name} ran with other settings ({', '.join(diff)} differ): the sweep's settings "
                             "changed since it ran: give the sweep another out (its finished runs are kept)")
        if diff:
            raise BidstError(f"run {run.name} was started with other settings ({', '.join(diff)} differ): move "
                             f"{run.run_dir} aside to start it again with these, or give the sweep another out")


def check_folders(sweep: Sweep, pending: Sequence[SweepRun]) -> None:
    """Refuse, before any run starts, run folders and logs the sweep cannot use: a file in a run's place, a new
    run's folder holding files it did not write, a run that would go inside an earlier sweep's run (a grid key was
    added since), a folder in a log's place."""
    for run in pending:  # a new run's folder is cleared before it starts: only ever one a killed run left empty
        if run.run_dir.exists() and not run.run_dir.is_dir():
            raise BidstError(f"{run.run_dir} is a file where the sweep keeps a run: move it away or give the sweep "
                             "another out")
        files = run.run_dir.rglob("*") if run.status() == "new" else ()
        stray = next((p for p in files if not p.is_dir() and p.suffix != ".tmp"), None)  # .tmp: an unfinished write
        if stray is not None:
            raise BidstError(f"{run.run_dir} holds {stray.relative_to(run.run_dir)} but no run config: not a run this "
                             "sweep started; move it away or give the sweep another out")
        outer = next((p for p in run.run_dir.parents if p != sweep.out and sweep.out in p.parents
                      and ((p / "config.yaml").exists() or (p / "summary.json").exists())), None)  # fmt: skip
        if outer is not None:
            raise BidstError(f"run {run.name} would go inside the run in {outer} (the grid gained a key since that "
                             "run): give the sweep another out")
        if run.log_path.is_dir():
            raise BidstError(f"{run.log_path} is a folder where the sweep writes run {run.name}'s log: move it away")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out` for this sweep: a second sweep on the same folder would start the same runs (or resume one that
    the first is training)."""
    lock = None
    try:
        lock = open(out / ".bidst-sweep.lock", "a")  # noqa: SIM115  (held for the whole sweep)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if lock is not None:
            lock.close()
            lock = None
        if isinstance(exc, BlockingIOError):
            raise BidstError(f"another bidst sweep is training runs in {out}: wait for it to end, or give this "
                             "sweep another out") from None
        # a file system without locks (some network mounts): the sweep goes on unguarded
        print(f"bidst sweep: warning: cannot lock {out} ({exc.strerror or exc}): nothing stops a second sweep there",
              file=sys.stderr)
    try:
        yield
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def train_command(sweep: Sweep, run: SweepRun, train_cmd: Sequence[str]) -> list[str]:
    """The command that trains (or resumes) `run`."""
    resume = ["--resume"] if run.status() == "resume" else []
    return [*train_cmd, "--config", str(sweep.base), *run.overrides, "--run-dir", str(run.run_dir), *resume]


def child_env(jobs: int) -> dict[str, str]:
    """The environment of a run: with several runs at a time, each one's thread pools get a share of the cores.

    A run whose config leaves `threads` at 0 would otherwise start one thread per core in each of
    the `jobs` runs, and spinning OpenMP threads on shared cores slow everything down. Thread counts
    the caller's environment already sets, and a run's own `threads`, take precedence.
    """
    env = dict(os.environ)
    if jobs > 1:
        share = str(max(1, len(os.sched_getaffinity(0)) // jobs))
        for var in THREAD_VARS:
            env.setdefault(var, share)
    return env


def _start(sweep: Sweep, run: SweepRun, train_cmd: Sequence[str], env: dict[str, str]) -> tuple[subprocess.Popen, IO[bytes]]:
    if run.status() == "new" and run.run_dir.exists():
        shutil.rmtree(run.run_dir)  # empty folders a run killed before it saved a config left (checked in run_sweep)
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = train_command(sweep, run, train_cmd)
    log = open(run.log_path, "ab")  # noqa: SIM115  (stays open for the child's whole life)
    log.write(f"$ {shlex.join(cmd)}\n".encode())
    log.flush()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env), log


def _stop(children: Sequence[subprocess.Popen]) -> None:
    for child in children:
        child.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_S
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class _Interrupts:
    """SIGINT/SIGTERM as KeyboardInterrupt, held back while a child starts so none is orphaned."""

    def __init__(self) -> None:
        self.holding = False
        self.pending = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.holding:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def hold(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise KeyboardInterrupt


def run_sweep(sweep: Sweep, jobs: int = 1, train_cmd: Sequence[str] | None = None) -> int:
    """Train every unfinished run, `jobs` at a time; 0 when all finished, 1 when some failed or it was interrupted.

    Each run's output is appended to ``<run folder>.log`` beside its folder. Ctrl-C or SIGTERM
    (handled when called from the main thread) terminates the running children and says so in one
    line; finished runs are kept, so rerunning the sweep continues where it stopped.
    """
    if jobs < 1:
        raise BidstError(f"--jobs must be at least 1, got {jobs}")
    make_folder(sweep.out)
    with locked(sweep.out):
        pending = [r for r in sweep.runs if r.status() != "done"]
        check_folders(sweep, pending)
        return _run_pending(sweep, pending, jobs, list(train_cmd or TRAIN_CMD))


def _run_pending(sweep: Sweep, pending: list[SweepRun], jobs: int, cmd: list[str]) -> int:
    """`run_sweep`'s loop over the runs to train."""
    env, total, failed = child_env(jobs), len(sweep.runs), []
    active: dict[subprocess.Popen, tuple[SweepRun, IO[bytes]]] = {}
    interrupts = _Interrupts()
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, interrupts) for sig in handled}
    bar = tqdm(total=total, initial=total - len(pending), desc="sweep", unit="run", file=sys.stderr)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                with interrupts.hold():
                    child, log = _start(sweep, run, cmd, env)
                    active[child] = (run, log)
            time.sleep(_POLL_S)
            for child in [c for c in active if c.poll() is not None]:
                run, log = active.pop(child)
                log.close()
                if child.returncode == 0 and run.status() == "done":
                    bar.update(1)
                else:
                    failed.append(run)
                    bar.write(f"sweep: {run.name} failed (exit {child.returncode}), see {run.log_path}")
    except KeyboardInterrupt:
        interrupts.holding = True  # a second Ctrl-C must not cut the clean-up short
        _stop(list(active))
        done = sum(r.status() == "done" for r in sweep.runs)
        print(f"bidst sweep: interrupted: {done} of {total} runs finished; run the same sweep again to continue",
              file=sys.stderr)
        return 1  # (as for failed runs: 2 is bad input)
    except OSError as exc:  # the sweep's own files (a log, a run folder) or a full disk: no child is left orphaned
        interrupts.holding = True
        _stop(list(active))
        print(f"bidst sweep: error: {exc}; the running runs were stopped (run the same sweep again to continue)",
              file=sys.stderr)
        return 1
    finally:
        for _, log in active.values():
            log.close()
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if failed:
        print(f"sweep: {len(failed)} of {total} runs failed: {', '.join(r.name for r in failed)}", file=sys.stderr)
        return 1
    print(f"sweep: all {total} runs finished in {sweep.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None, train_cmd: Sequence[str] | None = None) -> int:
    """Entry point of `bidst sweep SWEEP.yaml [--jobs N] [--dry-run]`; `train_cmd` is for tests."""
    parser = argparse.ArgumentParser(prog="bidst sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_file", help="sweep YAML (base, out, grid, overrides, method_overrides)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print each run's status and command only")
    args = parser.parse_args(argv)
    cmd = list(train_cmd or TRAIN_CMD)
    try:
        sweep = load_sweep(args.sweep_file)
        if args.dry_run:
            for run in sweep.runs:
                print(f"{run.status():6} {shlex.join(train_command(sweep, run, cmd))}")
            return 0
        return run_sweep(sweep, args.jobs, cmd)
    except BidstError as e:
        print(f"bidst sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
