"""The command line: listings, a tiny training run, and one-line errors for bad input (resume: test_scale_out.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bidst.cli import main
from bidst.config import load_config
from bidst.errors import BidstError
from bidst.methods import create_method
from bidst.recipe import config_diff

TINY = ["model=mlp", "dataset=synthetic", "epochs=2", "batch_size=256", "val_size=200", "progress=false",
        "train_subset=3000", "log_every=5",
        "lr=0.05", "method_args.interval=5"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bidst", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind,expected,says", [("methods", "rigl", "RigL at ERK"), ("models", "resnet32", "CIFAR ResNet-32"),
                                               ("datasets", "fashion-mnist", "10 classes, 1x28x28 images")])
def test_listings(kind, expected, says, capsys):
    """One line per name with what it is; --json gives the names alone."""
    assert main([kind]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if line.split()[0] == expected)
    assert says in line and all(len(line.split()) > 1 for line in lines)
    assert main([kind, "--json"]) == 0
    assert expected in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("as_json", [False, True])
def test_method_options_listing_loads_back_as_the_defaults(as_json, capsys):
    """`bidst methods NAME` prints options that paste under method_args: (YAML) or parse as JSON."""
    import yaml

    from bidst import method_options
    from bidst.methods import list_methods

    for name in list_methods():
        assert main(["methods", name, *(["--json"] if as_json else [])]) == 0
        out = capsys.readouterr().out
        options = method_options(name)
        assert (json.loads(out) if as_json else yaml.safe_load(out) if options else {}) == options
    assert main(["methods", "bidst"]) == 0
    allocate = [line for line in capsys.readouterr().out.splitlines() if line.startswith("allocate:")]
    assert len(allocate) == 1 and allocate[0].startswith("allocate: layer  # grows per layer")  # its source comment
    assert main(["methods", "dense"]) == 0
    assert capsys.readouterr().out.strip() == "dense has no options"
    assert main(["methods", "no-such-method"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown method 'no-such-method'" in err


def test_output_into_a_closed_pipe_stops_quietly():
    """`bidst methods bidst | head -1`: a reader that went away is no traceback, just the exit status of SIGPIPE."""
    import os

    read, write = os.pipe()
    os.close(read)  # every write to the pipe now fails
    try:
        done = subprocess.run([sys.executable, "-m", "bidst", "methods", "bidst"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 141 and "Traceback" not in done.stderr, done.stderr


def test_print_config_is_a_recipe_of_the_run_and_trains_nothing(tmp_path, capsys, monkeypatch):
    """--print-config resolves recipe + overrides + the method's defaults into YAML that loads back to itself."""
    import yaml

    from bidst import method_options

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: bidst\nsparsity: 0.9\nmethod_args: {mask_lr: 0.0}\n")
    assert main(["train", "--config", str(recipe), "sparsity=0.95", "--print-config"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["sparsity"] == 0.95 and data["distribution"] == "erk"  # the override, the method's default
    assert data["method_args"] == {**method_options("bidst"), "mask_lr": 0.0}
    (tmp_path / "full.yaml").write_text(printed)
    assert main(["train", "--config", str(tmp_path / "full.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    assert not (tmp_path / "runs").exists()
    assert main(["train", "method=bidst", "method_args.allocate=bogus", "--print-config"]) == 2
    assert "option 'allocate' of method 'bidst' must be one of" in capsys.readouterr().err


def test_overrides_may_come_on_both_sides_of_the_options(capsys):
    """argparse's positionals stop at the first option: `sparsity=0.95 --seed 3 epochs=2` used to fail on epochs=2."""
    import yaml

    assert main(["train", "sparsity=0.95", "--seed", "3", "epochs=2", "--print-config", "model=mlp"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert (data["sparsity"], data["seed"], data["epochs"], data["model"]) == (0.95, 3, 2, "mlp")
    assert main(["train", "sparsity=0.95", "--print-config", "epochs"]) == 2
    assert "override 'epochs' is not of the form key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["train", "sparsity=0.95", "--print-config", "--bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["models", "extra"])
    assert "unrecognized arguments: extra" in capsys.readouterr().err


def test_train_writes_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["measured_sparsity"] == pytest.approx(0.9, abs=0.002)
    assert summary["topology_changes"] > 0
    assert summary["final_test_acc"] > 50  # 10 learnable classes; chance is 10%
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"train_acc", "test_acc", "val_acc", "sparsity", "topology_changes"} <= set(epochs[0])
    assert any(r["kind"] == "step" and "lr" in r and "loss" in r for r in lines)
    assert (run / "config.yaml").exists() and list((run / "checkpoints").glob("step-*.pt"))
    # an existing run folder is never overwritten
    assert main(["train", *TINY, "--run-dir", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err


PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

import torch

from bidst.methods.base import METHODS, Stateless


@METHODS.register("magrand")
@dataclass
class MagRand(Stateless):
    """Magnitude drop, random regrowth."""

    name: ClassVar[str] = "magrand"
    default_distribution: ClassVar[str] = "erk"
    backends: ClassVar[tuple[str, ...]] = ("masked", "sparse")
    interval: int = 4  # steps between topology changes
    fraction: float = 0.2  # share of a layer's active weights swapped

    def setup(self, sp):
        sp.random_masks()

    def wants_dense_grad(self, step, sp):
        return False

    def update(self, sp, step, dense_grads):
        if step % self.interval:
            return False
        for name in sp.sparse_names():
            mask = sp.masks[name].view(-1)
            k = min(int(self.fraction * int(mask.sum())), int((~mask).sum())){drift}
            positions, values = sp.active_weights(name)
            free = (~mask).nonzero().squeeze(1)
            grow = free[torch.randperm(free.numel(), generator=sp.rng)[:k]]
            sp.change(name, positions[values.abs().argsort()[:k]], grow)
        return True
'''


@pytest.mark.parametrize("drift", [False, True])
def test_a_users_method_from_bidst_import_trains_from_the_cli(tmp_path, capsys, monkeypatch, drift):
    """A method of the user's, in a module named in $BIDST_IMPORT, is listed and trained by the CLI (sweeps' runs
    inherit the variable); one that drops more weights than it grows is stopped at once (its budgets drifted)."""
    from bidst.methods.base import METHODS

    module = f"user_methods_{drift}"
    (tmp_path / f"{module}.py").write_text(PLUGIN.format(drift="\n            k = k + 1" if drift else ""))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("BIDST_IMPORT", f" {module} ,")
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # the registration ends with the test
    monkeypatch.delitem(sys.modules, module, raising=False)
    assert main(["methods"]) == 0 and "magrand  Magnitude drop, random regrowth." in capsys.readouterr().out
    args = ["train", *TINY, "method=magrand", "method_args={}", "--run-dir", str(tmp_path / "run")]
    if drift:
        with pytest.raises(RuntimeError, match="method 'magrand' changed the layer's budget from .* grow as many"):
            main(args)
        return
    assert main([*args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "magrand" and summary["topology_changes"] > 0
    assert summary["measured_sparsity"] == pytest.approx(0.9, abs=0.002)
    monkeypatch.setenv("BIDST_IMPORT", "no_such_module_here")
    assert main(["methods"]) == 2
    assert capsys.readouterr().err == "bidst: error: BIDST_IMPORT: no module named 'no_such_module_here' on the Python path (PYTHONPATH)\n"
    monkeypatch.setenv("BIDST_IMPORT", f"{module}.py")
    assert main(["methods"]) == 2 and "names modules, not files" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["sparsity=1.5"], "sparsity must be in [0, 1)"),
        (["method=rigel"], "unknown method 'rigel'; known:"),
        (["match_flops=rigel"], "match_flops: unknown method 'rigel'; known:"),
        (["match_flops=rigl", "match_flops_args.intervl=1600"], "match_flops_args: unknown option(s) intervl for method 'rigl'"),
        (["match_flops=rigl", "match_flops_args=3"], "config key 'match_flops_args' must be a mapping, got 3"),
        (["sparsity.x=3"], "config key 'sparsity.x': only method_args and match_flops_args have sub-keys"),
        (["model=resnet33"], "unknown model 'resnet33'"),
        (["dataset=cifar11"], "unknown dataset 'cifar11'"),
        (["epohcs=3"], "unknown config key 'epohcs'; did you mean 'epochs'?"),
        (["lr=fast"], "config key 'lr' must be a number"),
        (["epochs=abc"], "config key 'epochs' must be an integer"),
        (["method_args.drop_frac=0.1"], "unknown option(s) drop_frac for method 'rigl'"),
        (["method_args.interval=0"], "option 'interval' of method 'rigl' must be in (0, inf), got 0"),
        (["method=mest", "method_args.interval=0.5", "method_args.interval_unit=steps"],
         "option 'interval' of method 'mest' counts steps (interval_unit: steps), so it must be a whole number, got 0.5"),
        (["method_args.drop_fraction=nan"], "option 'drop_fraction' of method 'rigl' must be like 0.3, got 'nan'"),
        (["dataset=fashion-mnist", "data_root=/nonexistent/fmnist"], "/nonexistent/fmnist"),
        (["device=cuda"] if not torch.cuda.is_available() else ["device=tpu"], "device"),
        (["precision=fp8"], "config key 'precision' must be one of fp32, bf16, fp16"),
        (["distribution=foo"], "unknown distribution 'foo'; known: uniform, er, erk"),
        (["seed=99999999999999999999"], "seed must be in [-2**63, 2**64), got 99999999999999999999"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, tmp_path, capsys):
    code = main(["train", *TINY, *args, "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing is left behind by a run that could not start
    if not any(a.startswith(("data_root", "device")) for a in args):  # what needs no data or device: checked there too
        assert main(["train", *TINY, *args, "--print-config"]) == 2
        assert message in capsys.readouterr().err


def test_under_torchrun_a_config_error_is_printed_by_rank_0_alone(tmp_path, capsys, monkeypatch):
    """Every process reads the same command line: each printed the same error (the README promises one line)."""
    monkeypatch.setenv("RANK", "1")
    assert main(["train", *TINY, "epohcs=3", "--run-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", *TINY, "epohcs=3", "--run-dir", str(tmp_path / "r")]) == 2
    assert "unknown config key 'epohcs'" in capsys.readouterr().err


def test_unusable_run_folder_or_recipe_as_override_is_one_line(tmp_path, capsys):
    """A run folder that is a file (or lies under one) is refused before any work, and the file is left as it was;
    a recipe passed without --config is named as such."""
    afile = tmp_path / "results.txt"
    afile.write_text("keep me")
    for run_dir, message in ((afile, "as a folder: it is a file"), (afile / "run", f"{afile} is a file")):
        assert main(["train", *TINY, "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert afile.read_text() == "keep me"
    assert main(["train", "configs/fashion-mnist.yaml"]) == 2
    assert "a recipe file goes after --config" in capsys.readouterr().err
    binary = tmp_path / "image.yaml"
    binary.write_bytes(bytes([0x89, 0x50, 0x4E, 0x47, 0xB7, 0xFF]) * 20)  # not text: was a UnicodeDecodeError traceback
    assert main(["train", "--config", str(binary), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot read recipe {binary}" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("root", ["2024", "/data/a #1", "data: v2", "[x]", "null"])
def test_a_data_root_flag_is_taken_as_written(root, capsys):
    """The flag's value went through YAML: a folder named 2024 was refused (not a string), "a #1" cut at the #."""
    import yaml

    assert main(["train", "--data-root", root, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data_root"] == root


@pytest.mark.parametrize(
    "args,recipe,message",
    [
        ([], "method_args:\n  1: 2\n", "unknown option(s) 1 for method 'rigl'"),  # was a TypeError traceback
        ([], "match_flops: rigl\nmatch_flops_args:\n  2: 1\n", "match_flops_args: unknown option(s) 2"),
        (["method=bidst", "backend=sparse", "method_args.hypergradient=unrolled"], "",
         "hypergradient 'unrolled' sets trial weights in dense layers"),  # passed, then every run failed
        (["method=bidst", "method_args.upper_data=holdout"], "", "upper_data 'holdout' needs held-out batches"),
    ],
)
def test_print_config_refuses_what_a_run_refuses(args, recipe, message, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe or "{}\n")
    assert main(["train", "--config", str(path), *args, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_resuming_in_a_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """It loaded data and model, then stopped with an OSError traceback writing metrics.jsonl."""
    import yaml

    import bidst.recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(load_config(None, TINY).to_dict(), sort_keys=False))
    monkeypatch.setattr(bidst.recipe.os, "access", lambda path, mode: False)  # a read-only mount, even for root
    monkeypatch.setattr(bidst.recipe, "load_data", lambda cfg: pytest.fail("loaded data first"))
    assert main(["train", *TINY, "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot resume {run}: {run} is not writable" in err and len(err.splitlines()) == 1


def test_ctrl_c_in_a_subcommand_is_one_line(monkeypatch, capsys):
    """Ctrl-C during `bidst bench` ended in a KeyboardInterrupt traceback (train and sweep print one line)."""
    import bidst.bench

    def interrupted(argv):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(bidst.bench, "main", interrupted)
    assert main(["bench", "--models", "mlp"]) == 130
    assert capsys.readouterr().err == "bidst: interrupted\n"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(precision, tmp_path, capsys):
    assert main(["train", *TINY, "epochs=1", f"precision={precision}", "--run-dir", str(tmp_path / "r"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["measured_sparsity"] == pytest.approx(0.9, abs=0.002) and summary["final_test_acc"] > 30


def test_bad_input_from_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity: [oops\n")
    proc = run_cli("train", "--config", str(bad))
    assert proc.returncode == 2 and "cannot read recipe" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_corrupt_data_file_is_a_clear_error(tmp_path, capsys):
    root = tmp_path / "fm"
    root.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (root / name).write_bytes(b"\x00\x00\x08\x03garbage")
    code = main(["train", *TINY, "dataset=fashion-mnist", f"data_root={root}", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "idx" in err and len(err.strip().splitlines()) == 1


def test_checkpoint_from_another_model_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "epochs=1", "--run-dir", str(run)]) == 0
    other = tmp_path / "other"
    assert main(["train", *TINY, "epochs=1", "model=cnn", "--run-dir", str(other)]) == 0
    # put the CNN's checkpoint into the MLP run and resume: refused, the user's files untouched
    (run / "summary.json").unlink()
    ckpt = sorted((other / "checkpoints").glob("*.pt"))[-1]
    target = run / "checkpoints" / "step-99999999.pt"
    target.write_bytes(ckpt.read_bytes())
    before = target.read_bytes()
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run), "--resume"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert target.read_bytes() == before
    # a config that differs from the saved run is refused too
    assert main(["train", *TINY, "epochs=1", "sparsity=0.5", "--run-dir", str(run), "--resume"]) == 2
    assert "config differs" in capsys.readouterr().err


def test_resume_takes_a_config_that_writes_out_defaults():
    """A config giving a method option or the distribution at its default (as --print-config writes them out) was
    refused on resume as differing from the saved run, which left them out."""
    saved = load_config(None, ["method=rigl"]).to_dict()
    same = load_config(None, ["method=rigl", "method_args.drop_fraction=0.3", "distribution=erk"])
    assert config_diff(saved, same) == []
    assert config_diff(saved, load_config(None, ["method=rigl", "method_args.drop_fraction=0.5"])) == ["method_args"]
    assert config_diff(saved, load_config(None, ["method=rigl", "distribution=er"])) == ["distribution"]


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads `1e-3` as a string (YAML 1.1); recipes, overrides and method options take it as a number."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: rigl\nlr: 1e-2\nweight_decay: 5E-4\nmethod_args:\n  drop_fraction: 3e-1\n")
    cfg = load_config(recipe, ["momentum=9e-1", "method_args.interval=1e2"])
    assert (cfg.lr, cfg.weight_decay, cfg.momentum) == (0.01, 0.0005, 0.9)
    assert cfg.method_args == {"drop_fraction": 0.3, "interval": 100.0}
    method = create_method("rigl", **cfg.method_args)  # an integral float where the option is an integer
    assert method.interval == 100 and type(method.interval) is int and type(create_method("rigl", drop_fraction=1).drop_fraction) is float
    with pytest.raises(BidstError, match="option 'interval' of method 'rigl' must be like 100, got 100.5"):
        create_method("rigl", interval=100.5)
    assert load_config(None, ["dataset=1e5x"]).dataset == "1e5x"  # not a number: stays a string


def test_version(capsys):
    import bidst

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"bidst {bidst.__version__}"
