"""`bidst bench`: a tiny run writes its tables, keeps the prose around its markers, and rejects bad input."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import numba
import pytest
import torch

import bidst.bench as bench
from bidst.bench import MARKERS, Timer, main, percent, run, training_steps


def test_bench_writes_between_markers_and_keeps_the_prose(tmp_path, one_thread):
    """A tiny run (the MLP by its short name) rewrites only the part between the markers."""
    threads = numba.get_num_threads()
    report = tmp_path / "performance.md"
    report.write_text(f"# Title\n\nprose before\n\n{MARKERS[0]}\nold table\n{MARKERS[1]}\n\nprose after\n")
    assert main(["--models", "mlp", "--sparsities", "0.9", "--no-layers", "--reps", "1", "--block", "1", "--profile",
                 "--out", str(report)]) == 0  # fmt: skip
    text = report.read_text()
    assert text.startswith("# Title\n\nprose before\n") and text.endswith(f"{MARKERS[1]}\n\nprose after\n")
    assert "old table" not in text
    assert [line for line in text.splitlines() if line.startswith("# ")] == ["# Title"]  # the file's own title only
    assert text.split(MARKERS[0])[1].startswith("\nCommand: `bidst bench")
    step_row = next(line for line in text.splitlines() if line.startswith("| MLP 1024x3 | step |"))
    assert 0.0 < float(step_row.split("|")[3]) < 10.0
    assert "| `_SparseLinearFn" in text  # the profile names the sparse kernels' autograd functions
    numba.set_num_threads(threads)


@pytest.mark.parametrize("args", [["--sparsities", "0.9,x"], ["--sparsities", "1.0"], ["--sparsities", "0"],
                                  ["--models", "AlexNet"],
                                  ["--threads", "2", "--clock", "cpu"], ["--block", "0"], ["--reps", "0"],
                                  ["--threads", "0"], ["--threads", "1000"]])  # fmt: skip
def test_bench_bad_input_is_a_usage_error(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_timer_runs_blocks_of_consecutive_steps_and_reports_the_mean_step():
    calls: list[str] = []
    ticks = iter(range(1000))
    timer = Timer(clock=lambda: float(next(ticks)), stat=min, reps=2, block=3)
    dense = lambda: calls.append("d")
    sparse = lambda: calls.append("s")
    td, ts = timer.interleaved(dense, sparse)
    assert "".join(calls) == "ds" + "dddsss" * 2  # one warm-up each, then alternating blocks
    assert calls.count("s") == timer.steps == 7
    assert td == ts == 1 / 3  # each block spans one clock tick over three steps


def test_bench_unusable_out_is_refused_before_measuring(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    # a folder; a path under a file; a folder that takes no files (procfs, for root too)
    for out in (tmp_path, afile / "performance.md", Path("/proc/performance.md")):
        with pytest.raises(SystemExit) as exc:
            main(["--out", str(out), "--models", "MLP 1024x3"])
        assert exc.value.code == 2
        err = capsys.readouterr()
        assert "--out" in err.err and "Whole training step" not in err.out  # nothing was measured
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize("text", ["prose, no markers\n", f"prose\n{MARKERS[0]}\ntable, end marker lost\n",
                                  f"{MARKERS[1]} quoted in prose\n{MARKERS[0]}\ntable\n",
                                  f"{MARKERS[0]}\na\n{MARKERS[1]}\n{MARKERS[0]}\nb\n{MARKERS[1]}\n"])  # fmt: skip
def test_bench_out_without_one_pair_of_markers_is_refused_and_kept(tmp_path, text, capsys):
    """An existing file is only ever rewritten between one start and one later end marker: anything else would
    replace or duplicate the prose a user wrote."""
    report = tmp_path / "notes.md"
    report.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(report), "--models", "MLP 1024x3"])
    assert exc.value.code == 2 and "does not hold one" in capsys.readouterr().err
    assert report.read_text() == text


def test_a_report_bench_wrote_can_be_rewritten_and_foreign_bytes_around_it_are_kept(tmp_path):
    """A new --out file had no markers, so the same command refused it the next time; bytes outside the markers
    in another encoding were replaced by U+FFFD."""
    from bidst.bench import write_report

    report = tmp_path / "perf.md"
    write_report(report, ["# Performance", "", "first table"])
    write_report(report, ["# Performance", "", "second table"])
    text = report.read_text()
    assert text.startswith("# Performance\n") and "second table" in text and "first table" not in text
    report.write_bytes(b"Caf\xe9 notes\n" + MARKERS[0].encode() + b"\nold\n" + MARKERS[1].encode() + b"\n")
    write_report(report, ["# Performance", "", "third table"])
    assert report.read_bytes().startswith(b"Caf\xe9 notes\n") and b"third table" in report.read_bytes()


def test_sparsities_are_labelled_with_the_digits_they_need():
    """Headers were rounded to whole percent: 97.5% and 98% both read "98%"."""
    assert [percent(s) for s in (0.8, 0.975, 0.98, 0.999)] == ["80%", "97.5%", "98%", "99.9%"]


class PresetTimer:
    """Runs each step twice and returns preset (dense, sparse) seconds per call of `interleaved`, in order."""

    def __init__(self, results):
        self.results, self.clock, self.steps = list(results), time.perf_counter, 2

    def interleaved(self, dense, sparse):
        for _ in range(self.steps):
            dense()
            sparse()
        return self.results.pop(0)


def test_whole_step_ratios_divide_by_the_dense_time_measured_beside_them_and_memory_is_taken_at_steady_state(
    one_thread,
):
    """The update step's ratio divided by the regular loop's dense time (another loop, under other load); memory was
    read right after a rebuild, before the kernels' index orderings that every regular step holds were built."""
    out: list[str] = []
    run(["MLP 1024x3"], [0.9], PresetTimer([(1.0, 0.5), (2.0, 4.0)]), False, out)
    rows = {line.split("|")[2].strip(): line.split("|")[3].strip() for line in out if line.startswith("| ")}
    assert rows["update"] == "2.00"  # 4.0 / 2.0, not 4.0 / 1.0
    assert rows["step"] == "0.52"  # 0.5 + (2.0 - 0.5) / 100
    gen = torch.Generator().manual_seed(0)
    dense, regular, _, memory = training_steps("MLP 1024x3", 0.1, 10**9, gen, time.perf_counter)
    dense()  # its momentum buffers exist from its first step on
    regular()
    steady, with_masks = memory()
    dense, update, _, memory = training_steps("MLP 1024x3", 0.1, 1, gen, time.perf_counter)
    dense()
    update()
    assert memory()[0] < steady - 0.05  # right after a rebuild the orderings are missing
    assert rows["memory"] == f"{steady:.2f}" and rows["+ masks"] == f"{with_masks:.2f}"
    assert with_masks > steady + 0.1  # one byte per weight against eight (a float32 weight and its momentum)


def test_low_sparsities_say_that_the_sparse_backend_computes_them_densely(one_thread):
    out: list[str] = []
    run(["MLP 1024x3"], [0.5, 0.9], PresetTimer([(1.0, 1.0)] * 4), False, out)
    note = next(line for line in out if "dense kernels" in line)
    assert "50%" in note and "90%" not in note


def test_the_recorded_command_can_be_pasted_into_a_shell_and_no_folder_is_made_before_measuring(tmp_path, monkeypatch):
    report = tmp_path / "new" / "perf.md"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["--models", "MLP 1024x3", "--sparsities", "0.9", "--out", str(report)])
    assert not report.parent.exists()
    monkeypatch.setattr(bench, "run", lambda *args: None)
    assert main(["--models", "MLP 1024x3", "--sparsities", "0.9", "--out", str(report)]) == 0
    command = next(line for line in report.read_text().splitlines() if line.startswith("Command:"))
    assert shlex.split(command.split("`")[1])[2:4] == ["--models", "MLP 1024x3"]
