"""Crash safety and bad input: SIGKILL at random moments, SIGTERM/SIGINT, NaN loss, full disk, foreign checkpoints."""

from __future__ import annotations

import errno
import io
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from _runs import assert_same_run, checkpoints, tiny_args

from bidst import checkpoint as checkpoint_module
from bidst import recipe as recipe_module
from bidst.checkpoint import DELAY_ENV, load_checkpoint
from bidst.cli import main
from bidst.data.tensor import TensorImageDataset
from bidst.errors import DataError

pytestmark = pytest.mark.usefixtures("tiny_runs")  # datasets built once, thread count restored

# 4 epochs of 8 steps, a checkpoint every 2 steps, only the newest 2 kept (the deletion path is exercised too)
LONG = tiny_args("rigl", "epochs=4", "checkpoint_every=2", "keep_checkpoints=2")


@pytest.fixture(scope="module")
def reference(scratch: Path) -> Path:
    """The uninterrupted run every interrupted one must reproduce (made in this process with threads=1, as theirs)."""
    run = scratch / "reference"
    assert main(["train", *LONG, "--run-dir", str(run)]) == 0
    return run


def _cli(argv: list[str], env: dict[str, str], output: Path) -> None:
    """The body of a training process: `bidst train argv` with its stdout and stderr in `output`."""
    os.environ.update(env)
    with open(output, "w", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        sys.exit(main(argv))


class Training:
    """`bidst train` in a forked process (the same code as `python -m bidst`, without its 2-second start-up)."""

    def __init__(self, run: Path, resume: bool, env: dict[str, str] | None = None) -> None:
        argv = ["train", "--run-dir", str(run), "--resume"] if resume else ["train", *LONG, "--run-dir", str(run)]
        self.output = run.with_name(run.name + ".out")
        self.process = multiprocessing.get_context("fork").Process(target=_cli, args=(argv, env or {}, self.output))
        self.process.start()

    def wait_for(self, path: Path, timeout: float = 120.0) -> bool:
        """Poll every millisecond until `path` exists (True) or the process has ended (False)."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.process.is_alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def signal(self, signum: int) -> None:
        """Send `signum` to the training process, unless it has already ended (its output then says why)."""
        if self.process.is_alive():
            os.kill(self.process.pid, signum)

    def finish(self, timeout: float = 300.0) -> tuple[int | None, str]:
        """Wait for the exit; its code and its output."""
        self.process.join(timeout)
        return self.process.exitcode, self.output.read_text()


def test_sigkill_at_10_random_moments_then_resume_equals_uninterrupted(reference, scratch):
    """Kills land inside checkpoint writes (the temporary file exists) or at a random moment after a checkpoint."""
    run = scratch / "killed"
    rng = random.Random(2024)
    kinds = []
    for i in range(10):
        done = max([int(p.stem.split("-")[1]) for p in checkpoints(run)], default=0)
        step = min(done + 2 * rng.randint(1, 3), 32)  # the checkpoint near which to kill
        inside_write = rng.random() < 0.5
        name = run / "checkpoints" / f"step-{step:08d}.pt"
        proc = Training(run, resume=i > 0, env={DELAY_ENV: "0.1"})  # temporary files live >= 0.1 s
        reached = proc.wait_for(name.with_name(name.name + ".tmp") if inside_write else name)
        if not inside_write:
            time.sleep(rng.uniform(0.0, 0.1))  # mid-step, mid-evaluation or mid-write of the next checkpoint
        proc.signal(signal.SIGKILL)
        code, output = proc.finish()
        assert reached, f"kill {i}: the run ended before the checkpoint of step {step}: {output}"
        assert not inside_write or name.with_name(name.name + ".tmp").exists()  # killed mid-write indeed
        kinds.append("in write" if inside_write else "after")
        for ckpt in checkpoints(run):  # what is left is complete: every named checkpoint loads
            load_checkpoint(ckpt)
    assert kinds.count("in write") == kinds.count("after") == 5
    code, output = Training(run, resume=True).finish()
    assert code == 0, output
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert_same_run(reference, run)


def test_sigterm_and_sigint_save_a_checkpoint_and_exit(reference, scratch):
    run = scratch / "signalled"
    # SIGINT then at once SIGTERM: a terminal's Ctrl-C reached a sweep's run and the sweep then terminated it
    rounds = (((signal.SIGTERM,), 6, False), ((signal.SIGINT, signal.SIGTERM), 14, True), ((signal.SIGINT,), 24, True))
    for signums, at_step, resume in rounds:
        proc = Training(run, resume)
        assert proc.wait_for(run / "checkpoints" / f"step-{at_step:08d}.pt")
        for signum in signums:
            proc.signal(signum)
        signum = signums[0]
        code, output = proc.finish()
        assert code == 128 + signum
        line = output.strip()
        assert len(line.splitlines()) == 1 and f"stopped by {signal.Signals(signum).name} after step" in line
        stopped_at = int(line.split("after step ")[1].split(";")[0])
        assert stopped_at >= at_step and (run / "checkpoints" / f"step-{stopped_at:08d}.pt").exists()
        assert not (run / "summary.json").exists()
    code, output = Training(run, resume=True).finish()
    assert code == 0, output
    assert_same_run(reference, run)


def test_a_stop_signal_during_evaluation_keeps_the_epoch_and_resumes_exactly(reference, scratch, monkeypatch, capsys):
    """A signal that arrived while the model was being evaluated was only noticed at the next step: the run went on
    (under a sweep, whose grace period then ran out, the epoch's training was lost with the killed process)."""
    run = scratch / "stopped-in-evaluation"
    real = recipe_module.evaluate
    calls = []

    def evaluate(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:  # the third epoch's (the tiny recipe holds no validation split)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "evaluate", evaluate)
    assert main(["train", *LONG, "--run-dir", str(run)]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 24; a checkpoint was saved" in capsys.readouterr().err
    assert load_checkpoint(checkpoints(run)[-1])["batch"] == 8  # the epoch trained, its evaluation owed
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(recipe_module, "evaluate", real)
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert_same_run(reference, run)


@pytest.mark.parametrize("failing_call", [18, 23], ids=["training", "evaluation"])
def test_an_unreadable_file_keeps_the_training_done_and_resumes_exactly(
    reference, scratch, monkeypatch, capsys, failing_call
):
    """An image that does not decode (ImageNet) stopped the run with the training since its last checkpoint lost: on
    ImageNet a whole epoch when the bad file is in the test set, found at the epoch's evaluation."""
    run = scratch / f"unreadable-{failing_call}"
    original = TensorImageDataset.get_batch
    calls = []

    def get_batch(self, indices, generator):  # type: ignore[no-untyped-def]
        calls.append(len(self))
        if len(calls) == failing_call:  # (1: the init batch; 18: epoch 2's fifth batch; 23: its evaluation's second)
            raise DataError("/data/val/n01/x.JPEG: cannot decode image (OSError: truncated)")
        return original(self, indices, generator)

    monkeypatch.setattr(TensorImageDataset, "get_batch", get_batch)
    assert main(["train", *LONG, "checkpoint_every=0", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("bidst: error: /data/val/n01/x.JPEG: cannot decode image (OSError: truncated); the run saved a "
                   "checkpoint: replace the file and continue with --resume")
    state = load_checkpoint(checkpoints(run)[-1])
    assert (state["epoch"], state["batch"]) == ((1, 4) if failing_call == 18 else (1, 8))
    assert calls[failing_call - 2] == (512 if failing_call == 18 else 2000)  # a training batch, then the test set's
    monkeypatch.setattr(TensorImageDataset, "get_batch", original)
    assert main(["train", "--run-dir", str(run), "--resume", "checkpoint_every=2"]) == 0
    assert_same_run(reference, run)


def test_an_unreadable_file_inside_a_step_saves_no_half_done_step(scratch, monkeypatch, capsys):
    """BiDST reads its held-out batches inside the step, after the optimizer's update: a checkpoint there held
    a step half done, and the resumed run differed from the uninterrupted one."""
    run = scratch / "unreadable-in-step"
    holdout = tiny_args("bidst", "holdout_size=64", "method_args.upper_data=holdout", "method_args.learn_every=1",
                        "checkpoint_every=0")
    original = TensorImageDataset.get_batch
    calls = []

    def get_batch(self, indices, generator):  # type: ignore[no-untyped-def]
        calls.append(len(self))
        if calls.count(64) == 3 and len(self) == 64:  # the held-out set's third batch, in step 3
            raise DataError("/data/train/n01/x.JPEG: cannot decode image (OSError: truncated)")
        return original(self, indices, generator)

    monkeypatch.setattr(TensorImageDataset, "get_batch", get_batch)
    assert main(["train", *holdout, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bidst: error: /data/train/n01/x.JPEG: cannot decode image (OSError: truncated)"
    assert not checkpoints(run)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "stopped" and last["reason"] == err.split("error: ")[1]


def _poison(monkeypatch: pytest.MonkeyPatch, item: int) -> None:
    """Make training item `item` (of the 512) a NaN image: bad input that the loss turns into NaN."""
    original = TensorImageDataset.get_batch

    def get_batch(self, indices, generator):  # type: ignore[no-untyped-def]
        x, y = original(self, indices, generator)
        if len(self) == 512:
            x[indices == item] = float("nan")
        return x, y

    monkeypatch.setattr(TensorImageDataset, "get_batch", get_batch)


def test_nonfinite_loss_stops_with_checkpoint_intact_or_is_skipped(monkeypatch, tmp_path, capsys):
    _poison(monkeypatch, item=100)
    run = tmp_path / "run"
    assert main(["train", *tiny_args("rigl"), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite loss (nan) at step" in err and "on_nonfinite=skip" in err
    assert "its last checkpoint is intact (continue it with --resume on_nonfinite=skip" in err
    bad_step = int(err.split("at step ")[1].split(";")[0])
    kept = checkpoints(run)
    assert int(kept[-1].stem.split("-")[1]) == bad_step - 1 and not (run / "summary.json").exists()
    state = load_checkpoint(kept[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # the run's log ends with why it stopped, which `bidst report` gives for leaving it out
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "stopped" and last["step"] == bad_step - 1 and last["reason"] == err.split("error: ")[1]
    # the user chooses to skip such steps and goes on from the intact checkpoint
    assert main(["train", "--run-dir", str(run), "--resume", "on_nonfinite=skip", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped_steps"] == 2 and summary["steps"] == 14  # the item is in one batch per epoch
    assert summary["final_test_acc"] > 50
    skipped = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"skipped"' in x]
    assert len(skipped) == 2 and '"stopped"' not in (run / "metrics.jsonl").read_text()  # cut off by the resume


def test_nonfinite_loss_before_the_first_checkpoint_does_not_claim_one(monkeypatch, tmp_path, capsys):
    _poison(monkeypatch, item=100)
    run = tmp_path / "run"
    assert main(["train", *tiny_args("rigl"), "checkpoint_every=0", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the run stopped and it had no checkpoint yet (continue it with --resume on_nonfinite=skip" in err
    assert not checkpoints(run)


def _full_disk_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """fsync of a file called `name` fails with ENOSPC, as on a full disk (other files are written normally)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name a file descriptor's file")
def test_full_disk_keeps_earlier_checkpoints_and_results(monkeypatch, tmp_path, capsys):
    args = tiny_args("rigl", "checkpoint_every=2")
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *args, "--run-dir", str(reference)]) == 0
    # the disk fills while the checkpoint of step 6 is written
    with monkeypatch.context() as m:
        _full_disk_at(m, "step-00000006.pt.tmp")
        assert main(["train", *args, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "step-00000006.pt" in err
    assert [p.name for p in checkpoints(run)] == ["step-00000002.pt", "step-00000004.pt"]
    assert not list(run.rglob("*.tmp"))
    for ckpt in checkpoints(run):
        load_checkpoint(ckpt)
    # the disk fills again while the summary is written: every checkpoint and the metrics stay
    with monkeypatch.context() as m:
        _full_disk_at(m, "summary.json.tmp")
        assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    assert "summary.json" in capsys.readouterr().err
    assert not (run / "summary.json").exists() and not list(run.rglob("*.tmp"))
    # with room again, resuming finishes the run exactly as if nothing had happened
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert_same_run(reference, run)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name a file descriptor's file")
def test_disk_full_mid_write_is_a_one_line_error_and_leaves_no_temporary_file(monkeypatch, tmp_path, capsys):
    """A write that fails after some bytes made torch's zip writer raise its own RuntimeError (a traceback, exit 1,
    the .tmp file left): the disk error is what the user sees, and the earlier checkpoints stay."""
    real_open = open

    class FillsUp(io.FileIO):
        written = 0

        def write(self, data):  # type: ignore[no-untyped-def]
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(data)

    def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(file).endswith("step-00000004.pt.tmp"):
            return FillsUp(file, "wb")
        return real_open(file, mode, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module, "open", fake_open, raising=False)
    assert main(["train", *tiny_args("rigl", "checkpoint_every=2"), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "step-00000004.pt" in err
    assert [p.name for p in checkpoints(run)] == ["step-00000002.pt"] and not list(run.rglob("*.tmp"))


def test_a_run_stopped_right_after_its_last_step_finishes_on_resume(monkeypatch, tmp_path):
    """A checkpoint taken after the last step but before the epoch ended (a stop signal there, or a match_flops
    run whose budget ends mid-epoch) left the final evaluation, epoch records and summary undone on --resume."""
    args = tiny_args("bidst", "match_flops=rigl")
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", *args, "--run-dir", str(reference)]) == 0
    last = json.loads((reference / "summary.json").read_text())["steps"]
    assert last % 8 != 0  # the budget ends mid-epoch (8 steps an epoch)
    save = recipe_module.save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(state, folder, step, keep):  # type: ignore[no-untyped-def]
        save(state, folder, step, keep)
        if step == last and state["batch"] > 0:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(recipe_module, "save_checkpoint", save_then_die)
        with pytest.raises(Killed):
            main(["train", *args, "--run-dir", str(run)])
    assert not (run / "summary.json").exists()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0
    assert_same_run(reference, run)


def test_metrics_shorter_than_the_checkpoint_says_is_refused_not_padded(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_args("rigl", "epochs=1"), "--run-dir", str(run)]) == 0
    (run / "summary.json").unlink()
    metrics = run / "metrics.jsonl"
    cut = metrics.read_bytes()[:100]
    metrics.write_bytes(cut)  # lost its unsynced tail in a power cut, say
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is shorter" in err
    assert metrics.read_bytes() == cut


def test_foreign_or_damaged_checkpoints_are_refused(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert main(["train", *tiny_args("rigl", "epochs=1", "checkpoint_every=0"), "--run-dir", str(run)]) == 0
    assert main(["train", *tiny_args("rigl", "epochs=1", "checkpoint_every=0", "seed=1"), "--run-dir", str(other)]) == 0
    (run / "summary.json").unlink()
    target = run / "checkpoints" / "step-99999999.pt"
    good = checkpoints(other)[-1].read_bytes()
    own = torch.load(checkpoints(run)[-1], weights_only=True)
    cases = [
        (good, "does not match this run: its config differs in seed"),  # same model, another run's config
        (good[: len(good) // 2], "cannot be loaded"),  # cut short (by a disk error; never by bidst's writer)
        ({"weights": torch.zeros(3)}, "is not a bidst training checkpoint"),  # some other torch file
        (5, "is not a bidst training checkpoint (it holds a int)"),
        (torch.tensor(1.0), "is not a bidst training checkpoint (it holds a Tensor)"),
        (b"hello\n", "cannot be loaded (not a complete PyTorch checkpoint)"),  # not a torch file at all
        ({**torch.load(checkpoints(other)[-1], weights_only=True), "config": None, "epoch": "x"},
         "is damaged: config, epoch of the wrong type"),
        # inner state hand-edited or damaged: it was a traceback
        ({**own, "meter": {}}, "is damaged: its cost meter state does not load (KeyError: 'flops')"),
        ({**own, "evolution": {}}, "is damaged: its mask evolution state does not load (KeyError"),
        ({**own, "running": {}}, "is damaged: its running epoch statistics lack correct, loss, seen"),
    ]
    for data, message in cases:
        if not isinstance(data, bytes):
            torch.save(data, target)
        else:
            target.write_bytes(data)
        capsys.readouterr()
        assert main(["train", "--run-dir", str(run), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_checkpoint_holds_everything_a_resume_needs(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny_args("snfs", "epochs=1"), "--run-dir", str(run)]) == 0
    state = load_checkpoint(run / "checkpoints" / "step-00000006.pt")  # mid-epoch, after the change at step 5
    assert {"model", "optimizer", "sparsifier", "scaler", "epoch", "batch", "running", "metrics_offset",
            "rng_cpu", "rng_cuda", "config", "skipped"} <= set(state)
    assert not any(k.startswith("module.") for k in state["model"])  # the bare model, never a DDP wrapper
    sp = state["sparsifier"]
    assert sp["step"] == 6 and state["batch"] == 6 and sp["topology_changes"] == 1
    assert set(sp["masks"]) == {"fc1.weight", "fc2.weight", "fc3.weight"} and sp["rng"].dtype == torch.uint8
    assert set(sp["method_state"]["buffers"]) == set(sp["masks"])  # SNFS's momentum: its mask scores
    assert state["optimizer"]["state"]  # momentum buffers


@pytest.mark.parametrize("override,message", [
    ("on_nonfinite=ignore", "config key 'on_nonfinite' must be one of stop, skip"),
    ("batch_size=0", "config key 'batch_size' must be positive"),
    ("log_every=0", "config key 'log_every' must be positive"),
    ("iou_interval=0", "config key 'iou_interval' must be positive"),
    ("lr=-0.1", "config key 'lr' must be >= 0"),
    ("momentum=-0.5", "config key 'momentum' must be >= 0"),
    ("weight_decay=-1e-4", "config key 'weight_decay' must be >= 0"),
    ("threads=-2", "config key 'threads' must be >= 0"),
    ("label_smoothing=1.5", "config key 'label_smoothing' must be in [0, 1]"),
    ("lr=.inf", "config key 'lr' must be a finite number"),
    ("sparsity=.nan", "config key 'sparsity' must be a finite number"),
])
def test_invalid_reliability_settings(override, message, tmp_path, capsys):
    assert main(["train", *tiny_args("rigl"), override, "--run-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()



def test_resuming_a_finished_run_gives_its_results_only_for_its_own_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_args("rigl", "epochs=1"), "--run-dir", str(run)]) == 0
    before = (run / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume", "sparsity=0.8"]) == 2  # another run, not this one
    assert "cannot resume" in capsys.readouterr().err and (run / "summary.json").read_bytes() == before
    assert main(["train", "--run-dir", str(run), "--resume", "threads=2", "--json"]) == 0  # a key that may differ
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(before)
    (run / "summary.json").write_bytes(before[: len(before) // 2])  # damaged (a copy cut short)
    assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "summary.json cannot be read" in err and len(err.splitlines()) == 1
