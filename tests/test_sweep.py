"""bidst sweep driven by a fake trainer: expansion, validation, failure, and kill-then-rerun resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from bidst import report, sweep
from bidst.config import parse_override
from bidst.errors import BidstError

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A stand-in for `bidst train` with its folder rules (a new run needs an empty folder, a resumed
# one its config.yaml): writes config and a checkpoint, sleeps, then metrics and summary.json
# (atomically); appends "start"/"done" lines to $FAKE_COUNTER; fails for seed=666.
FAKE_TRAINER = r'''
import json, os, sys, time, pathlib, yaml
args = sys.argv[1:]
run_dir = pathlib.Path(args[args.index("--run-dir") + 1])
base = yaml.safe_load(pathlib.Path(args[args.index("--config") + 1]).read_text())
overrides = args[args.index("--config") + 2 : args.index("--run-dir")]
config = dict(base, **{k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in overrides)})
resume = "--resume" in args
with open(os.environ["FAKE_COUNTER"], "a") as f:
    f.write(f"start {run_dir} {resume}\n")
if config["seed"] == 666 or (run_dir.exists() and any(run_dir.iterdir())) != resume:
    sys.exit(3)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "checkpoints").mkdir(exist_ok=True)  # before config.yaml: leaves a folder a sweep must clear
(run_dir / "config.tmp").write_text(yaml.safe_dump(config))  # atomically, as bidst train does: a sweep stopped
os.replace(run_dir / "config.tmp", run_dir / "config.yaml")  # right after the file appears must find it whole
(run_dir / "checkpoints" / "last.pt").write_text("step 1")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.3")))
acc = round(0.5 + config["sparsity"] / 4 + config["seed"] / 100 + (config["method"] == "rigl") / 10, 6)
epochs = [{"kind": "epoch", "epoch": e, "step": e, "test_acc": acc * e / 2} for e in (1, 2)]
(run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
summary = dict(method=config["method"], sparsity=config["sparsity"], seed=config["seed"], final_test_acc=acc,
               best_val_acc=acc, epochs=config["epochs"], flops={"total": 1.0 - config["sparsity"]},
               threads=[os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")])
(run_dir / "summary.tmp").write_text(json.dumps(summary))
os.replace(run_dir / "summary.tmp", run_dir / "summary.json")
with open(os.environ["FAKE_COUNTER"], "a") as f:
    f.write(f"done {run_dir}\n")
'''

GRID = {"method": ["set", "rigl"], "sparsity": [0.5, 0.9], "seed": [0, 1]}


@pytest.fixture
def env(tmp_path, monkeypatch):
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"method": "dense", "sparsity": 0.0, "seed": 0, "epochs": 2}))
    counter = tmp_path / "counter.txt"
    counter.touch()
    monkeypatch.setenv("FAKE_COUNTER", str(counter))
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path, [sys.executable, str(trainer)], counter


def write_sweep(folder: Path, name: str, out: str, **extra) -> Path:
    spec = {"base": "recipe.yaml", "out": out, "grid": GRID, **extra}
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def events(counter: Path) -> list[list[str]]:
    return [line.split() for line in counter.read_text().splitlines()]


def test_expansion_names_and_override_precedence(env):
    folder, _, _ = env
    path = write_sweep(folder, "s.yaml", "out", overrides={"epochs": 10, "method_args": {"drop_fraction": 0.2}},
                       method_overrides={"rigl": {"epochs": 8}})
    spec = sweep.load_sweep(path)
    assert [r.name for r in spec.runs][:2] == ["method=set/sparsity=0.5/seed=0", "method=set/sparsity=0.5/seed=1"]
    rigl = next(r for r in spec.runs if r.name == "method=rigl/sparsity=0.9/seed=1")
    assert rigl.overrides == ("epochs=8", "method_args.drop_fraction=0.2", "method=rigl", "sparsity=0.9", "seed=1")
    assert len(spec.runs) == 8
    assert rigl.run_dir == folder / "out" / rigl.name
    cmd = sweep.train_command(spec, rigl, ["train"])
    assert cmd == ["train", "--config", str(folder / "recipe.yaml"), *rigl.overrides, "--run-dir", str(rigl.run_dir)]


@given(st.one_of(st.floats(allow_nan=False), st.integers(), st.booleans(), st.none(),
                 st.lists(st.integers(), max_size=3), st.text(max_size=12),
                 st.sampled_from(["2024", "a #1", "data: v2", "[x]", "yes", "off", "~", "1e3", "rigl", "/tmp/a b"])))
def test_override_values_read_back_as_yaml(value):
    """Strings too: "2024" (a data folder), "a #1" and "x: y" were written plain and read back as other values."""
    assert yaml.safe_load(f"v: {sweep.yaml_value(value)}")["v"] == value
    assert parse_override(f"key={sweep.yaml_value(value)}") == ("key", value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"out": "o", "grid": GRID}, "missing base"),
        ({"base": "recipe.yaml", "out": "o", "grid": {"seed": 3}}, "grid.seed must be a non-empty list"),
        ({"base": "nowhere.yaml", "out": "o", "grid": GRID}, "does not exist"),
        ({"base": {"epochs": 1}, "out": "o", "grid": GRID}, "base must name a recipe YAML file, got {'epochs': 1}"),
        ({"base": "recipe.yaml", "out": ["o"], "grid": GRID}, "out must name the folder of the runs, got ['o']"),
        ({"base": "recipe.yaml", "out": "o", "grid": GRID, "gird": 1}, "unknown key"),
        ({"base": "recipe.yaml", "out": "o", "grid": GRID, "method_overrides": {"snfs": {}}}, "not in grid.method"),
        ({"base": "recipe.yaml", "out": "o", "grid": {"seed": [1, 1]}}, "grid.seed repeats a value"),
        # equal values written differently: two folders, one config, trained twice
        ({"base": "recipe.yaml", "out": "o", "grid": {"seed": [0], "weight_decay": [0, 0.0]}},
         "grid.weight_decay repeats a value"),
        # each run failed on its own, after the ones before it
        ({"base": "recipe.yaml", "out": "o", "grid": {"seed": [0], "device": ["cpu", "cuda"]}},
         "device 'cuda' was asked for but no CUDA device is available"),
        # every run's config is checked before any starts
        ({"base": "recipe.yaml", "out": "o", "grid": {**GRID, "sparsity": [0.5, 1.5]}},
         "run method=set/sparsity=1.5/seed=0: sparsity must be in [0, 1)"),
        ({"base": "recipe.yaml", "out": "o", "grid": {**GRID, "method": ["rigl", "rigel"]}}, "unknown method 'rigel'"),
        ({"base": "recipe.yaml", "out": "o", "grid": GRID, "overrides": {"method_args": {"alpah": 0.3}}},
         "unknown option(s) alpah for method 'set'"),
    ],
)
def test_invalid_sweep_files_are_one_line_errors(env, capsys, spec, message):
    folder, train_cmd, _ = env
    path = folder / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(BidstError, match=re.escape(message)):
        sweep.load_sweep(path)
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_sweep_file_that_is_not_text_is_a_one_line_error(env, capsys):
    folder, train_cmd, _ = env
    path = folder / "image.yaml"
    path.write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0xB7, 0xFF]) * 20)  # was a UnicodeDecodeError traceback
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2
    err = capsys.readouterr().err
    assert f"cannot read sweep file {path}" in err and err.count("\n") == 1


def test_an_out_folder_under_a_file_is_a_one_line_error_before_any_run(env, capsys):
    folder, train_cmd, counter = env
    path = write_sweep(folder, "s.yaml", "recipe.yaml/out")
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2
    err = capsys.readouterr().err
    assert "recipe.yaml is a file" in err and err.count("\n") == 1
    assert counter.read_text() == ""  # no run started


def test_a_foreign_file_in_a_new_runs_folder_stops_the_sweep_and_is_kept(env, capsys):
    folder, train_cmd, counter = env
    path = write_sweep(folder, "s.yaml", "out")
    foreign = folder / "out/method=set/sparsity=0.5/seed=1/notes.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine")
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2
    err = capsys.readouterr().err
    assert "holds notes.txt but no run config" in err and err.count("\n") == 1
    assert foreign.read_text() == "mine" and counter.read_text() == ""  # kept, and no run started


def test_a_method_override_of_a_grid_key_collapses_its_runs(env):
    folder, _, _ = env
    spec = sweep.load_sweep(write_sweep(folder, "s.yaml", "out", grid={**GRID, "method": ["dense", "rigl"]},
                                        method_overrides={"dense": {"sparsity": 0.0}}))
    names = [r.name for r in spec.runs]
    assert names[:2] == ["method=dense/sparsity=0.0/seed=0", "method=dense/sparsity=0.0/seed=1"]
    assert len(names) == 2 + 4 and spec.runs[0].overrides == ("method=dense", "sparsity=0.0", "seed=0")


def test_failed_runs_are_reported_and_others_finish(env, capsys):
    folder, train_cmd, _ = env
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out",
                                    "grid": {"method": ["set"], "sparsity": [0.5], "seed": [0, 666]}}))
    assert sweep.main([str(path), "--jobs", "2"], train_cmd=train_cmd) == 1
    assert "method=set/sparsity=0.5/seed=666" in capsys.readouterr().err
    assert (folder / "out/method=set/sparsity=0.5/seed=0/summary.json").exists()
    assert (folder / "out/method=set/sparsity=0.5/seed=666.log").read_text().startswith("$ ")
    summary = json.loads((folder / "out/method=set/sparsity=0.5/seed=0/summary.json").read_text())
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))  # two runs at a time share the cores
    assert summary["threads"] == [os.environ.get(v, share) for v in sweep.THREAD_VARS]


def test_parallel_runs_get_a_share_of_the_cores_unless_the_environment_says(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for var in sweep.THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not set(sweep.THREAD_VARS) & set(sweep.child_env(1))  # one run at a time: its defaults, all cores
    assert [sweep.child_env(3)[v] for v in sweep.THREAD_VARS] == ["2", "2", "2"]
    assert sweep.child_env(16)["NUMBA_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert sweep.child_env(3)["OMP_NUM_THREADS"] == "4"


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def start_sweep(path: Path, train_cmd: list[str]) -> subprocess.Popen:
    code = f"import sys; from bidst.sweep import main; sys.exit(main([{str(path)!r}, '--jobs', '2'], train_cmd={train_cmd!r}))"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stderr=subprocess.PIPE, text=True)


def report_rows(out: Path) -> list[dict]:
    return report.summarize(report.find_runs([out]))[1]


@pytest.mark.parametrize("stop", ["sigkill_group", "sigterm"])
def test_interrupted_sweep_resumes_without_redoing_finished_runs(env, capsys, stop):
    folder, train_cmd, counter = env
    interrupted = write_sweep(folder, "a.yaml", "interrupted")
    proc = start_sweep(interrupted, train_cmd)
    def mid_way() -> bool:  # some runs finished and one started (its config written) but not finished
        seen = events(counter)
        done = {e[1] for e in seen if e[0] == "done"}
        running = {e[1] for e in seen if e[0] == "start"} - done
        return len(done) >= 2 and any((Path(r) / "config.yaml").exists() for r in running)

    wait_for(mid_way)
    if stop == "sigkill_group":
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running children die at once
        proc.wait()
    else:
        proc.send_signal(signal.SIGTERM)  # handled like Ctrl-C: children terminated, one-line message
        assert proc.wait(timeout=30) == 1
        assert "interrupted:" in proc.stderr.read()
    proc.stderr.close()
    time.sleep(0.5)  # no child may still be running and finish behind our back
    before = events(counter)
    run_dirs = {str(r.run_dir) for r in sweep.load_sweep(interrupted).runs}
    finished = {r for r in run_dirs if (Path(r) / "summary.json").exists()}
    started = {r for r in run_dirs - finished if (Path(r) / "config.yaml").exists()}
    assert 2 <= len(finished) < 8 and started

    assert sweep.main([str(interrupted), "--jobs", "2"], train_cmd=train_cmd) == 0
    after = [e for e in events(counter)[len(before):] if e[0] == "start"]
    assert {e[1] for e in after} == run_dirs - finished  # nothing finished is redone, the rest is
    assert all(e[2] == str(e[1] in started) for e in after)  # started runs resume, new ones start afresh
    assert all((Path(r) / "summary.json").exists() for r in run_dirs)

    straight = write_sweep(folder, "b.yaml", "straight")
    assert sweep.main([str(straight), "--jobs", "2"], train_cmd=train_cmd) == 0
    assert report_rows(folder / "interrupted") == report_rows(folder / "straight")
    assert sweep.main([str(straight), "--dry-run"], train_cmd=train_cmd) == 0
    assert capsys.readouterr().out.count("done ") == 8


def test_a_folder_left_before_the_config_was_saved_is_started_afresh(env):
    folder, train_cmd, counter = env
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out",
                                    "grid": {"method": ["set"], "sparsity": [0.5], "seed": [0]}}))
    run_dir = folder / "out/method=set/sparsity=0.5/seed=0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml.tmp").write_text("half")
    assert sweep.main([str(path)], train_cmd=train_cmd) == 0
    assert events(counter)[0][2] == "False" and (run_dir / "summary.json").exists()


def test_a_changed_sweep_file_does_not_pass_old_runs_off_as_its_own(env, capsys):
    """Rerunning a sweep after its settings changed (epochs 2 to 3) reported every old run as done: its runs are
    checked against the configs they were trained with, before anything starts, and the finished ones are kept."""
    folder, train_cmd, _ = env
    path = folder / "s.yaml"
    grid = {"method": ["set"], "sparsity": [0.5], "seed": [0]}
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out", "grid": grid}))
    assert sweep.main([str(path)], train_cmd=train_cmd) == 0
    summary = folder / "out/method=set/sparsity=0.5/seed=0/summary.json"
    before = summary.read_bytes()
    capsys.readouterr()
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out", "grid": grid, "overrides": {"epochs": 3}}))
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2
    err = capsys.readouterr().err.strip()
    assert "method=set/sparsity=0.5/seed=0" in err and "epochs" in err and len(err.splitlines()) == 1
    assert summary.read_bytes() == before
    # a finished run's saved config damaged (by hand, say): a one-line error naming that file, not a YAML traceback
    saved = summary.with_name("config.yaml")
    for damage in ("model: [unclosed\n", "epochs: many\n"):
        saved.write_text(damage)
        assert sweep.main([str(path)], train_cmd=train_cmd) == 2
        err = capsys.readouterr().err.strip()
        assert f"{saved} is damaged" in err and len(err.splitlines()) == 1


def test_a_changed_sweep_file_is_refused_before_resuming_a_half_done_run(env, capsys):
    """After an interrupt and a change, the new runs trained with the new settings and the half-done one then
    failed to resume, on every rerun, leaving a mixed folder: it is refused before any run starts."""
    folder, train_cmd, counter = env
    path = folder / "s.yaml"
    grid = {"method": ["set"], "sparsity": [0.5], "seed": [0]}
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out", "grid": grid}))
    assert sweep.main([str(path)], train_cmd=train_cmd) == 0
    (folder / "out/method=set/sparsity=0.5/seed=0/summary.json").unlink()  # as if interrupted: config, no summary
    started = counter.read_text()
    capsys.readouterr()
    grid["seed"] = [0, 1]
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out", "grid": grid, "overrides": {"epochs": 3}}))
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2
    err = capsys.readouterr().err.strip()
    assert "seed=0 was started with other settings (epochs differ)" in err and len(err.splitlines()) == 1
    assert counter.read_text() == started  # seed 1 did not start either
    # a started run without its config (checkpoints only) is left to its own resume, which says what is wrong:
    # it does not stop the others
    (folder / "out/method=set/sparsity=0.5/seed=0/config.yaml").unlink()
    (folder / "out/method=set/sparsity=0.5/seed=0/checkpoints").mkdir(exist_ok=True)
    (folder / "out/method=set/sparsity=0.5/seed=0/checkpoints/step-1.pt").write_bytes(b"x")
    assert [run.status() for run in sweep.load_sweep(path).runs] == ["resume", "new"]


def test_string_grid_values_keep_their_folder_names():
    """Folder names of finished sweeps must not move: an empty string (match_flops= turns matching off) is
    match_flops=, not the quoted match_flops=__ of its override text."""
    assert sweep._folder_part("match_flops", "") == "match_flops="
    assert sweep._folder_part("data_root", "a #1") == "data_root=a__1"
    assert sweep._folder_part("sparsity", 0.9) == "sparsity=0.9"


def test_a_file_where_a_run_goes_stops_the_sweep_and_is_kept(env, capsys):
    folder, train_cmd, _ = env
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out",
                                    "grid": {"method": ["set"], "sparsity": [0.5], "seed": [0]}}))
    (folder / "out/method=set/sparsity=0.5").mkdir(parents=True)
    (folder / "out/method=set/sparsity=0.5/seed=0").write_text("notes")
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2  # was a NotADirectoryError traceback
    err = capsys.readouterr().err.strip()
    assert "seed=0 is a file where the sweep keeps a run" in err and len(err.splitlines()) == 1
    assert (folder / "out/method=set/sparsity=0.5/seed=0").read_text() == "notes"


def test_a_run_that_would_go_inside_an_earlier_sweeps_run_is_refused(env, capsys):
    """A grid key added after a sweep ran (seed, below a finished method=set/sparsity=0.5) put the new runs inside the
    old run's folder, where `bidst report` does not look."""
    folder, train_cmd, counter = env
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out", "grid": {"method": ["set"], "sparsity": [0.5]}}))
    assert sweep.main([str(path)], train_cmd=train_cmd) == 0
    started = counter.read_text()
    capsys.readouterr()
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out",
                                    "grid": {"method": ["set"], "sparsity": [0.5], "seed": [0, 1]}}))
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2
    err = capsys.readouterr().err.strip()
    assert "would go inside the run in" in err and len(err.splitlines()) == 1
    assert counter.read_text() == started


def test_an_error_of_the_sweeps_own_files_stops_the_running_runs_in_one_line(env, capsys):
    """An OSError while starting a run (its log path a folder) was a traceback that left the runs already started
    training without their sweep."""
    folder, train_cmd, counter = env
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out",
                                    "grid": {"method": ["set"], "sparsity": [0.5], "seed": [0, 1]}}))
    log = folder / "out/method=set/sparsity=0.5/seed=1.log"
    log.mkdir(parents=True)
    assert sweep.main([str(path)], train_cmd=train_cmd) == 2  # checked before any run starts
    assert "seed=1.log is a folder" in capsys.readouterr().err and counter.read_text() == ""
    log.rmdir()
    real_start = sweep._start

    def start(spec, run, cmd, env):
        if run.name.endswith("seed=1"):
            raise OSError(28, "No space left on device", str(run.log_path))
        return real_start(spec, run, cmd, env)

    import unittest.mock

    with unittest.mock.patch.object(sweep, "_start", start):
        assert sweep.main([str(path), "--jobs", "2"], train_cmd=train_cmd) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the running runs were stopped" in err
    assert "Traceback" not in err
    time.sleep(1.0)  # longer than the fake run takes
    assert "done" not in [e[0] for e in events(counter)]  # seed=0 was stopped, not left training


def test_two_sweeps_on_one_out_folder_do_not_both_train(env, capsys):
    folder, train_cmd, counter = env
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out",
                                    "grid": {"method": ["set"], "sparsity": [0.5], "seed": [0]}}))
    (folder / "out").mkdir()
    with sweep.locked(folder / "out"):  # as another sweep holds it
        assert sweep.main([str(path)], train_cmd=train_cmd) == 2
        assert "another bidst sweep is training runs in" in capsys.readouterr().err
    assert counter.read_text() == ""
    assert sweep.main([str(path)], train_cmd=train_cmd) == 0


def test_a_method_override_that_makes_runs_alike_is_not_refused_and_a_lockless_folder_only_warns(env, capsys,
                                                                                                 monkeypatch):
    """A grid over a method option with the option cleared for dense gives two equal dense runs, as before; a file
    system without flock (ENOSYS) stopped every sweep with a traceback."""
    folder, train_cmd, _ = env
    path = folder / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out",
                                    "grid": {"method": ["rigl", "dense"], "method_args.interval": [5, 10], "seed": [0]},
                                    "method_overrides": {"dense": {"method_args": {}}}}))
    assert len(sweep.load_sweep(path).runs) == 4

    def no_locks(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(sweep.fcntl, "flock", no_locks)
    path.write_text(yaml.safe_dump({"base": "recipe.yaml", "out": "out",
                                    "grid": {"method": ["set"], "sparsity": [0.5], "seed": [0]}}))
    assert sweep.main([str(path)], train_cmd=train_cmd) == 0
    assert "cannot lock" in capsys.readouterr().err
