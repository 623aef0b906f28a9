"""Exact resume for every method, single process and 2-process DDP (gloo), and DDP against one process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _runs import (
    LOAD_DATA,
    SpawnTimeout,
    assert_same_run,
    change_steps,
    checkpoints,
    final_state,
    reuse_datasets,
    spawn,
    stop_steps,
    stopped_copy,
    tiny_args,
    tiny_config,
)
from conftest import Branchy
from torch import nn

import bidst
from bidst.backend import supports
from bidst.data.tensor import TensorImageDataset
from bidst.engine import Sparsifier
from bidst.errors import BidstError
from bidst.methods.base import METHODS as METHOD_CLASSES
from bidst.recipe import evaluate, train
from bidst.signals import RunInterrupted
from bidst.sparse import to_dense_modules

pytestmark = pytest.mark.usefixtures("tiny_runs")  # datasets built once, thread count restored
METHODS = bidst.list_methods()
SPARSE = [m for m in METHODS if supports(METHOD_CLASSES.get(m), "sparse")]  # with backend: sparse too
DYNAMIC = {"set", "rigl", "snfs", "mest", "granet", "gmp"}  # these must change topology in a tiny run
# BiDST learning its scores on 64 held-out items, committing every 3 steps
HOLDOUT = ("holdout_size=64", "holdout_batch=16", "method_args.upper_data=holdout", "method_args.mask_interval=3",
           "method_args.learn_every=2")


@pytest.fixture(scope="module")
def single(scratch: Path) -> dict[str, Path]:
    """One uninterrupted single-process run per method (made on first use)."""
    root = scratch / "single"

    class Runs(dict):
        def __missing__(self, key: str) -> Path:  # "rigl", or "rigl/sparse" for backend: sparse
            run = root / key.replace("/", "-")
            method, _, backend = key.partition("/")
            train(tiny_config(method, *([f"backend={backend}"] if backend else [])), run)
            self[key] = run
            return run

    return Runs()


@pytest.mark.parametrize("method", METHODS)
def test_resume_single_process_matches_uninterrupted(method, single, scratch):
    full = single[method]
    if method in DYNAMIC:
        assert change_steps(full), f"{method} never changed its topology"
    for stop in stop_steps(full):  # just before and just after a topology change
        part = scratch / f"{method}-stop{stop}"
        stopped_copy(full, part, stop)
        train(tiny_config(method), part, resume=True)
        assert_same_run(full, part)


def test_resume_with_held_out_upper_level_matches_uninterrupted(scratch):
    """BiDST learning its scores on held-out items (holdout_size, upper_data: holdout) resumes exactly."""
    full = scratch / "bidst-holdout"
    summary = train(tiny_config("bidst", *HOLDOUT), full)
    assert change_steps(full) and summary["flops"]["mask_learning"] > 0
    assert final_state(full)["sparsifier"]["method_state"]["holdout_draws"] > 0
    for stop in stop_steps(full):
        part = scratch / f"bidst-holdout-stop{stop}"
        stopped_copy(full, part, stop)
        train(tiny_config("bidst", *HOLDOUT), part, resume=True)
        assert_same_run(full, part)


# -- 2-process DDP ----------------------------------------------------------------------------------------------


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of named tensors' bytes, to compare what two ranks hold."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _own_loop(method: str, backend: str = "masked") -> list[str]:
    """A user's own DDP loop through the Python API, on per-rank data: mask digests after every change, then the weights.

    Masked: the model in DDP. Sparse: the bare model, seeded apart on each rank (the Sparsifier
    starts every rank from rank 0's weights and averages the gradients).
    """
    torch.manual_seed(0 if backend == "masked" else dist.get_rank())
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = nn.parallel.DistributedDataParallel(net) if backend == "masked" else net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + dist.get_rank())  # every rank draws different data
    x, y = torch.randn(240, 16, generator=g), torch.randint(0, 4, (240,), generator=g)
    sp = bidst.sparsify(model, optimizer, method, 0.8, total_steps=30, init_batch=(x[:24], y[:24]), backend=backend,
                        **{k: v for k, v in {"interval": 5, "interval_unit": "steps", "iterations": 5}.items()
                           if k in bidst.method_options(method)})
    digests = [_digest(sp.masks)]
    for i in range(30):
        loss = nn.functional.cross_entropy(model(x[8 * i : 8 * i + 8]), y[8 * i : 8 * i + 8])
        optimizer.zero_grad()
        loss.backward()
        if sp.step():
            digests.append(_digest(sp.masks))
    return digests + [_digest(net.state_dict())]


def _rank0_or_odd(call: int) -> bool:
    """Branchy's middle layer on rank 0 always, on the other ranks at odd calls only."""
    return dist.get_rank() == 0 or call % 2 == 1


def _uneven_loop(method: str, backend: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """A user's DDP loop over Branchy whose middle layer rank 1 skips at even calls (masked: DDP with
    find_unused_parameters): mask digests after every change, and the final weights as dense tensors."""
    torch.manual_seed(0)
    net = Branchy(uses_middle=_rank0_or_odd)
    model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True) if backend == "masked" else net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    options = {"mask_interval": 3, "learn_every": 1} if method == "bidst" else {"interval": 3}
    sp = bidst.sparsify(model, optimizer, method, 0.8, total_steps=12, backend=backend, **options)
    g = torch.Generator().manual_seed(dist.get_rank())
    digests = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 16, generator=g)), torch.randint(0, 4, (8,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        if sp.step():
            digests.append(_digest(sp.masks))
    if backend == "sparse":
        to_dense_modules(net)
    return digests, {k: v.detach().clone() for k, v in net.state_dict().items()}


def _worker(rank: int, world: int, root: str, methods: list[str]) -> None:
    """One DDP rank: for each method a full run, a resumed copy and an own-loop run; records what each rank saw."""
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    reuse_datasets()
    seen: dict[str, list] = {}
    current: list = []
    sigterm_after: list[int] = []  # rank 1 sends itself SIGTERM after this step
    original = Sparsifier.step

    def recording_step(
        self: Sparsifier, scaler: torch.amp.GradScaler | None = None, batch: tuple[torch.Tensor, ...] | None = None
    ) -> bool:
        changed = original(self, scaler, batch)
        if changed:
            current.append([self.step_count, _digest(self.masks)])
        net = getattr(self.model, "module", self.model)  # DDP's, or the bare model of a sparse run
        current[:] = [c for c in current if c[0] != "final"] + [["final", _digest(net.state_dict())]]
        if rank == 1 and [self.step_count] == sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return changed

    Sparsifier.step = recording_step  # type: ignore[method-assign]
    out = Path(root)
    for method in methods:
        for backend in ("masked", "sparse") if method in SPARSE else ("masked",):  # sparse: no DDP wrapper
            key, folder, loop = _names(method, backend)
            cfg = tiny_config(method, f"backend={backend}")
            current = seen[key] = []
            full = out / f"{folder}-full"
            train(cfg, full)
            dist.barrier()  # rank 0 has written the whole run folder
            if rank == 0:
                stopped_copy(full, out / f"{folder}-part", stop_steps(full)[0])
            dist.barrier()
            current = []  # the resumed run's changes are checked through its files
            train(cfg, out / f"{folder}-part", resume=True)
            seen[loop] = _own_loop(method, backend)
    # BiDST's upper level on held-out items: each rank draws its share of every held-out batch
    current = seen["bidst/holdout"] = []
    train(tiny_config("bidst", *HOLDOUT), out / "bidst-holdout-full")
    current = []  # the runs below are checked by their results
    # SIGTERM reaches rank 1 alone: both ranks checkpoint after the same step and stop; the resumed run is the full one
    sigterm_after.append(6)
    with pytest.raises(RunInterrupted) as stopped:
        train(tiny_config("rigl"), out / "sigterm")
    sigterm_after.clear()
    seen["sigterm"] = [str(stopped.value), stopped.value.exit_code]
    train(tiny_config("rigl"), out / "sigterm", resume=True)
    seen["errors"] = [_error(lambda: train(tiny_config("rigl", "batch_size=63"), out / "odd-batch")),
                      _error(lambda: _sparsify_seeded(rank))]
    with pytest.raises(BidstError) as bad_config:  # the same on every rank: only rank 0 prints it (SharedError)
        train(tiny_config("rigl", "sparsity=1.5"), out / "bad-config")
    seen["bad-config"] = type(bad_config.value).__name__
    # the run folder not on shared storage: rank 0 finds a checkpoint, rank 1 none; they trained a mixed step, then
    # their collectives crossed at the first topology change
    if rank == 0:
        stopped_copy(out / "rigl-full", out / "split-0", stop_steps(out / "rigl-full")[0])
    dist.barrier()
    with pytest.raises(BidstError) as split:
        train(tiny_config("rigl"), out / f"split-{rank}", resume=True)
    seen["split-resume"] = [type(split.value).__name__, str(split.value)]
    # a NaN image on one rank's shard: both ranks stop at the same step, then both skip it on resume
    get_batch = TensorImageDataset.get_batch
    TensorImageDataset.get_batch = lambda self, i, g: _nan_at(get_batch(self, i, g), i, 100, len(self) == 512)
    seen["errors"].append(_error(lambda: train(tiny_config("rigl"), out / "nan")))
    seen["odd-eval"] = _sharded_eval()
    seen["nan-skip"] = [train(tiny_config("rigl", "on_nonfinite=skip"), out / "nan", resume=True)["skipped_steps"]]
    # a layer one rank skips at some steps: the sparse backend averages as DDP with find_unused_parameters does
    (masks, masked), (sparse_masks, sparse) = _uneven_loop("rigl", "masked"), _uneven_loop("rigl", "sparse")
    seen["uneven"] = [masks, sparse_masks, max(float((masked[k] - sparse[k]).abs().max()) for k in masked)]
    seen["uneven-bidst"] = _error(lambda: _uneven_loop("bidst", "sparse"))
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()  # as bidst.distributed.launch does: tearing down gloo while the other rank still uses it can abort
    dist.destroy_process_group()


def _error(fn: Callable[[], object]) -> str:
    """The message of the BidstError `fn` raises."""
    with pytest.raises(BidstError) as info:
        fn()
    return str(info.value)


def _sharded_eval() -> list[float]:
    """Accuracy on 1001 items (an odd split) by sharded `evaluate`, and by one plain pass over all of them."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    test_set = TensorImageDataset.subset(LOAD_DATA(tiny_config("dense"))[3], torch.arange(1001))
    x, y = test_set.get_batch(torch.arange(1001), None)
    with torch.no_grad():
        plain = 100.0 * int((net(x).argmax(1) == y).sum()) / 1001
    return [evaluate(net, test_set, torch.device("cpu"), tiny_config("dense"))[0], plain]


def _sparsify_seeded(seed: int) -> Sparsifier:
    """A sparsifier whose mask generator is seeded with `seed` (the rank: a user error under DDP)."""
    model = nn.Linear(8, 8)
    return bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.5, total_steps=1, seed=seed)


def _nan_at(batch: tuple[torch.Tensor, torch.Tensor], indices: torch.Tensor, item: int, active: bool) -> tuple:
    """`batch` with the image of `item` made NaN (if `active`)."""
    if active:
        batch[0][indices == item] = float("nan")
    return batch


@pytest.fixture(scope="module")
def ddp(scratch: Path) -> Path:
    """Every method run by 2 gloo processes (one spawn for all, to keep start-up costs down).

    Gloo can abort a process as it exits ("terminate called without an active exception", about one
    spawn in twenty on the CI machine class, after the barrier before teardown). A rank that wrote its
    record has finished its work, so such an abort (or a hang, killed at the deadline) after both records
    counts as done; one before them is retried once, from scratch. A real failure fails both tries.
    """
    for attempt in (1, 2):
        root = scratch / f"ddp{attempt}"
        root.mkdir()
        recorded = lambda root=root: all((root / f"rank{r}.json").exists() for r in (0, 1))
        try:
            spawn(_worker, (2, str(root), METHODS), 2, recorded)
            return root
        except mp.ProcessExitedException as error:
            if error.signal_name == "SIGABRT" and recorded():
                return root
            if attempt == 2:
                raise
        except SpawnTimeout:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _seen(ddp: Path, rank: int) -> dict[str, list]:
    """What rank `rank` recorded in the DDP fixture."""
    return json.loads((ddp / f"rank{rank}.json").read_text())


# every method with the masked backend (in DDP), and every one that supports it with the sparse backend (no wrapper)
RUNS = [(m, "masked") for m in METHODS] + [(m, "sparse") for m in SPARSE]


def _names(method: str, backend: str) -> tuple[str, str, str]:
    """(record key and single-run key, run folder prefix, own-loop record key) of a method on a backend in the DDP fixture."""
    if backend == "masked":
        return method, method, f"{method}/own-loop"
    return f"{method}/sparse", f"{method}-sparse", f"{method}/sparse-own-loop"


@pytest.mark.parametrize(("method", "backend"), RUNS)
def test_ddp_masks_identical_on_every_rank(method, backend, ddp):
    key, folder, loop = _names(method, backend)
    r0, r1 = _seen(ddp, 0), _seen(ddp, 1)
    assert r0[key] == r1[key]  # mask digests after every topology change, and the final weights
    changes = [step for step, _ in r0[key] if step != "final"]
    assert changes == change_steps(ddp / f"{folder}-full")
    if method in DYNAMIC:
        assert changes
    own = r0[loop]
    assert own == r1[loop]  # masks after each change and the final weights (sparse: seeded apart)
    if method in DYNAMIC:
        assert len(set(own[:-1])) > 1  # the masks did change, identically on both ranks


def test_ddp_held_out_scores_agree_on_every_rank_and_with_one_process(ddp, scratch):
    """Ranks score on different shares of each held-out batch; the averaged score gradients keep masks identical."""
    r0, r1 = _seen(ddp, 0), _seen(ddp, 1)
    assert r0["bidst/holdout"] == r1["bidst/holdout"]
    changes = [step for step, _ in r0["bidst/holdout"] if step != "final"]
    assert changes and changes == change_steps(ddp / "bidst-holdout-full")
    one = scratch / "bidst-holdout-one"
    train(tiny_config("bidst", *HOLDOUT), one)
    a, b = final_state(one), final_state(ddp / "bidst-holdout-full")
    assert a["sparsifier"]["method_state"]["holdout_draws"] == b["sparsifier"]["method_state"]["holdout_draws"] > 0
    for key in a["sparsifier"]["masks"]:
        assert torch.equal(a["sparsifier"]["masks"][key], b["sparsifier"]["masks"][key]), key
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-5)
    flops = [json.loads((run / "summary.json").read_text())["flops"] for run in (one, ddp / "bidst-holdout-full")]
    assert flops[0]["mask_learning"] > 0  # summed over ranks, as one process counts it
    assert flops[1]["mask_learning"] == pytest.approx(flops[0]["mask_learning"], rel=1e-9)


@pytest.mark.parametrize(("method", "backend"), RUNS)
def test_ddp_matches_single_process_with_the_same_global_batch(method, backend, ddp, single):
    """Tolerance: weights within 1e-5, masks identical, losses within 1e-5 relative (only float rounding differs)."""
    key, folder, _ = _names(method, backend)
    one_run, two_run = single[key], ddp / f"{folder}-full"
    a, b = final_state(one_run), final_state(two_run)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-5)
    for key in a["sparsifier"]["masks"]:
        assert torch.equal(a["sparsifier"]["masks"][key], b["sparsifier"]["masks"][key]), key
    lines = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
             for run in (one_run, two_run)]
    assert len(lines[0]) == len(lines[1])
    for x, y in zip(*lines):
        for key in ("loss", "train_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5)
        if "test_acc" in x:
            assert abs(x["test_acc"] - y["test_acc"]) <= 0.1  # at most 2 of 2000 predictions flip
    # the FLOPs of the global batch, as one process counts them: the forward and backward, and a method's own work
    # (BiDST's sampled products on each rank's share summed over ranks, SNFS's momentum done on every rank once)
    one, two = (json.loads((run / "summary.json").read_text()) for run in (one_run, two_run))
    assert two["inference_flops"] == one["inference_flops"]
    assert {"forward", "backward", "dense_reference"} <= set(one["flops"]) and set(two["flops"]) == set(one["flops"])
    for phase in one["flops"]:
        assert two["flops"][phase] == pytest.approx(one["flops"][phase], rel=1e-9), phase


@pytest.mark.parametrize(("method", "backend"), RUNS)
def test_ddp_resume_matches_uninterrupted(method, backend, ddp):
    folder = _names(method, backend)[1]
    assert_same_run(ddp / f"{folder}-full", ddp / f"{folder}-part")


def test_ddp_layer_skipped_on_one_rank(ddp):
    """The sparse backend all-reduced only the gradients each rank had: a layer one rank's forward skipped made
    the ranks' all-reduces differ (gloo aborted the processes). It now counts as a zero gradient there, as DDP's
    find_unused_parameters does; BiDST, which learns scores from each rank's forwards, refuses on every rank."""
    r0, r1 = _seen(ddp, 0), _seen(ddp, 1)
    masks, sparse_masks, diff = r0["uneven"]
    assert len(masks) == 2 and masks == sparse_masks == r1["uneven"][0] == r1["uneven"][1]
    assert diff < 1e-5
    message = "layer 'b' ran on some ranks and not on others this step"
    assert message in r0["uneven-bidst"] and r0["uneven-bidst"] == r1["uneven-bidst"]


def test_ddp_sigterm_on_one_rank_stops_all_at_the_same_step(ddp):
    assert _seen(ddp, 0)["sigterm"] == _seen(ddp, 1)["sigterm"] == [
        "stopped by SIGTERM after step 7; a checkpoint was saved, continue with --resume", 143]
    assert_same_run(ddp / "rigl-full", ddp / "sigterm")


def test_ddp_only_rank0_writes_and_faults_stop_every_rank(ddp):
    full = ddp / "rigl-full"
    assert sorted(p.name for p in full.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "summary.json"]
    assert json.loads((full / "summary.json").read_text())["processes"] == 2
    assert len(checkpoints(full)) == 16
    errors = _seen(ddp, 0)["errors"]
    assert errors == _seen(ddp, 1)["errors"]  # every rank stops, with the same message
    odd_batch, seeded_apart, nan_loss = errors
    assert "batch_size 63 (the global batch) must be divisible by the 2 processes" in odd_batch
    assert not (ddp / "odd-batch").exists()
    assert "DDP ranks disagree on weight" in seeded_apart and "after the initial masks" in seeded_apart
    assert "non-finite loss (nan) at step" in nan_loss
    assert _seen(ddp, 0)["bad-config"] == _seen(ddp, 1)["bad-config"] == "SharedError"  # was printed by every rank
    kind, message = _seen(ddp, 0)["split-resume"]
    assert _seen(ddp, 1)["split-resume"] == [kind, message] and kind == "SharedError"
    assert message.startswith("the processes resumed from different checkpoints")
    assert _seen(ddp, 0)["nan-skip"] == _seen(ddp, 1)["nan-skip"] == [2]
    sharded, plain = _seen(ddp, 0)["odd-eval"]
    assert sharded == plain and _seen(ddp, 1)["odd-eval"] == [sharded, plain]  # no padded item counted twice


def test_resuming_on_another_process_count_warns(ddp, tmp_path, capsys):
    """A 2-process run continued by one process was silent, unlike a changed thread count: its results then differ
    from the uninterrupted run's in rounding."""
    part = tmp_path / "part"
    stopped_copy(ddp / "rigl-full", part, 8)
    summary = train(tiny_config("rigl"), part, resume=True)
    assert summary["processes"] == 1
    assert "the run ran on 2 process(es) and continues on 1" in capsys.readouterr().err


def test_torchrun_two_nodes_equals_spawned_ddp(ddp, tmp_path):
    """The README's multi-node `torchrun -m bidst train`, as two 1-process "nodes" on this machine: the same run.

    A launch that fails inside torchrun's own rendezvous (about 1 in 30 here: a freshly found free
    port taken again, or the store's host agent leaving first) is retried, up to twice, on a new port.
    """
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(bidst.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}

    def launch() -> tuple[list[int], list[tuple[str, str]]]:
        with socket.socket() as sock:  # a free port for node 0's store
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                     "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                     "-m", "bidst", "train", *tiny_args("rigl"), "--run-dir", str(run), "--json"]
                    for node in range(2)]  # fmt: skip
        nodes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
        outputs = [node.communicate(timeout=300) for node in nodes]
        return [node.returncode for node in nodes], outputs

    codes, outputs = launch()
    for _ in range(2):
        if codes == [0, 0] or (run / "summary.json").exists() or "torch.distributed" not in outputs[0][1] + outputs[1][1]:
            break
        shutil.rmtree(run, ignore_errors=True)
        codes, outputs = launch()
    assert codes == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    summaries = [line for out, _ in outputs for line in out.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    assert_same_run(ddp / "rigl-full", run)


def test_threads_setting_holds_after_torch_has_run(tmp_path):
    """`threads: 1` in a process whose torch already ran parallel ops: Numba's pool starting must not reset torch's
    thread count to all cores (a fresh process, so Numba's pool is not started yet)."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "torch.ones(1 << 20).sum()\n"
        "from _runs import tiny_config\n"
        "from bidst.recipe import train\n"
        "train(tiny_config('rigl', 'epochs=1'), sys.argv[2])\n"
        "print(torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, check=True)  # fmt: skip
    assert out.stdout.split()[-1] == "1"
