"""bidst report over run folders written here: statistics, grouping, files and robustness."""

import json
import statistics
import sys

import pytest
import yaml

from bidst import report

ACCS = {
    ("dense", 0.0, None): [0.92, 0.94],
    ("rigl", 0.9, None): [0.90, 0.91, 0.95],
    ("set", 0.9, None): [0.88, 0.86],
    ("bidst", 0.9, 0.0): [0.89, 0.91],
    ("bidst", 0.9, 0.01): [0.90, 0.94],
}
FLOPS = {"dense": 1000.0, "rigl": 400.0, "set": 300.0, "bidst": 350.0}
SECONDS = {"dense": 10.0, "rigl": 12.0, "set": 9.0, "bidst": 11.0}


def write_run(folder, method, sparsity, seed, acc, mask_lr=None, finished=True):
    """A run folder as the training loop writes it: config, metrics (epoch + mask records), summary."""
    folder.mkdir(parents=True)
    config = {"method": method, "sparsity": sparsity, "seed": seed, "model": "cnn", "dataset": "fmnist",
              "epochs": 3, "run_dir": str(folder), "data": {"seed": seed},
              "threads": seed, "num_workers": seed % 2, "checkpoint_every": 10 * seed}  # operational: never a group key
    if mask_lr is not None:
        config["method_args"] = {"mask_lr": mask_lr}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for epoch in range(1, 4):
        lines.append({"kind": "step", "step": epoch * 10, "epoch": epoch, "loss": 1.0 / epoch, "lr": 0.1})
        lines.append({"kind": "epoch", "epoch": epoch, "step": epoch * 10, "train_acc": acc,
                      "val_acc": acc, "test_acc": acc * epoch / 3, "sparsity": sparsity, "topology_changes": epoch})
        density = {"conv.weight": 1 - sparsity / 2, "fc.weight": 1 - sparsity, "__all__": 1 - sparsity}
        record = {"kind": "mask", "epoch": epoch, "density": density,
                  "itop": {"__all__": min(1.0, (1 - sparsity) * epoch)}}
        if epoch % 2 == 0:
            record["iou"], record["iou_interval"] = {"__all__": 0.5 + seed / 10}, [epoch - 2, epoch]
        lines.append(record)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        summary = {"method": method, "sparsity": sparsity, "seed": seed, "final_test_acc": acc,
                   "best_val_acc": acc + 0.01, "measured_sparsity": sparsity, "topology_changes": 3,
                   "steps": 30, "epochs": 3,
                   "flops": {"total": FLOPS[method], "relative_to_dense": FLOPS[method] / 2000},
                   "time": {"total": SECONDS[method]}}
        if method == "bidst":
            summary["method_stats"] = {"swap_decisions": 100, "set_by_scores": 0.05 * (seed + 1)}
        (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    for (method, sparsity, mask_lr), accs in ACCS.items():
        for seed, acc in enumerate(accs):
            write_run(root / f"{method}-{sparsity}-{mask_lr}" / f"seed{seed}", method, sparsity, seed, acc, mask_lr)
    write_run(root / "unfinished", "rigl", 0.9, 7, 0.1, finished=False)
    write_run(root / "corrupt", "rigl", 0.9, 8, 0.1)
    (root / "corrupt" / "summary.json").write_text("{not json")
    (root / "method=snfs").mkdir()
    (root / "method=snfs" / "seed=0.log").write_text(  # a sweep run that failed: the sweep's command line, its error
        "$ python -m bidst train --config r.yaml method=snfs\nbidst: train_subset ... is too small\n\n")
    (root / "method=set").mkdir()
    (root / "method=set" / "seed=0.log").write_text("$ python -m bidst train --config r.yaml method=set\n")
    return root


def row_of(rows, method, **keys):
    found = [r for r in rows if r["method"] == method and all(r[k] == v for k, v in keys.items())]
    assert len(found) == 1, found
    return found[0]


def test_groups_means_and_relative_costs(runs_dir, capsys):
    runs = report.find_runs([runs_dir])
    err = capsys.readouterr().err
    assert "unfinished" in err and "corrupt" in err
    assert (f"{runs_dir / 'method=snfs' / 'seed=0'}: skipped, failed before making its run folder: bidst: "
            "train_subset ... is too small (see seed=0.log)") in err  # the log's last line: the run's error
    assert len(runs) == sum(map(len, ACCS.values()))
    extra, rows = report.summarize(runs)
    assert extra == ["method_args.mask_lr"]  # varies within (bidst, 0.9); run_dir, seeds, threads... never split groups
    rigl = row_of(rows, "rigl")
    assert rigl["n"] == 3 and rigl["seeds"] == ["0", "1", "2"]
    assert rigl["test_acc_mean"] == pytest.approx(statistics.fmean(ACCS[("rigl", 0.9, None)]))
    assert rigl["test_acc_std"] == pytest.approx(statistics.stdev(ACCS[("rigl", 0.9, None)]))
    assert rigl["best_val_acc_mean"] == pytest.approx(0.93)
    assert rigl["flops_rel_mean"] == pytest.approx(0.4)  # against the dense run, not as recorded
    assert rigl["time_rel_mean"] == pytest.approx(1.2)
    ablation = row_of(rows, "bidst", **{"method_args.mask_lr": 0.01})
    assert ablation["test_acc_mean"] == pytest.approx(0.92) and ablation["n"] == 2
    assert row_of(rows, "bidst", **{"method_args.mask_lr": 0.0})["test_acc_mean"] == pytest.approx(0.90)
    assert ablation["method_stats"] == pytest.approx({"swap_decisions": 100.0, "set_by_scores": 0.075})  # seeds 0, 1
    assert rigl["method_stats"] == {}
    table = report.markdown(extra, rows)
    assert table.splitlines()[0].endswith("| method stats |")
    assert "| swap_decisions 100, set_by_scores 0.075 |" in table
    assert all(line.endswith("| 3 | – |") for line in table.splitlines() if line.startswith("| rigl |"))  # no stats
    assert rows[0]["method"] == "dense"  # sorted by sparsity first


def test_without_a_dense_run_flops_are_as_recorded(runs_dir):
    runs = [r for r in report.find_runs([runs_dir / "rigl-0.9-None"])]
    _, (row,) = report.summarize(runs)
    assert row["flops_rel_mean"] == pytest.approx(0.2) and row["time_rel_mean"] is None
    assert "| rigl | 0.9 | 3 | 0.92 ± 0.026 | 0.93 ± 0.026 | 0.2 | – | 3 | 3 |" in report.markdown([], [row])
    # runs that differ in epochs have it as a group column: shown once (the header named it twice)
    header = report.markdown(["epochs"], [row]).splitlines()[0]
    assert header.count("epochs") == 1 and report.markdown(["epochs"], [row]).splitlines()[2].endswith("| – | 3 |")


def test_a_run_reached_twice_counts_once(runs_dir):
    """`bidst report runs/x ./runs/x/` (or a sweep folder and one of its runs) read the same run twice: n=2."""
    folder = runs_dir / "rigl-0.9-None" / "seed0"
    runs = report.find_runs([folder, str(folder) + "/", runs_dir / "rigl-0.9-None"])
    assert len(runs) == 3 and len({r.path.resolve() for r in runs}) == 3


def test_a_damaged_byte_in_the_metrics_costs_its_line_only(runs_dir, capsys):
    metrics = runs_dir / "rigl-0.9-None" / "seed0" / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    metrics.write_bytes(b"".join([b"\xff" + lines[0], *lines[1:]]))  # was a UnicodeDecodeError for the report
    runs = report.find_runs([runs_dir / "rigl-0.9-None"])
    assert len(runs) == 3 and "skipped 1 unreadable or damaged line" in capsys.readouterr().err


@pytest.mark.parametrize("damage", [
    lambda r: r["iou"].pop("__all__"), lambda r: r["itop"].update(__all__="x"), lambda r: r.update(epoch="one"),
    lambda r: r.update(iou=0.5), lambda r: r.update(test_acc="n/a"), lambda r: r.update(density=[1, 2]),
])
def test_a_metrics_record_of_the_wrong_types_is_skipped_with_a_warning(runs_dir, tmp_path, capsys, damage):
    """Valid JSON with a field of the wrong type (a changed key, a hand edit) was a KeyError/ValueError traceback."""
    metrics = runs_dir / "rigl-0.9-None" / "seed0" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    target = next(r for r in records if r.get("iou"))
    target["test_acc"] = 0.5  # so that each damage has a record of every field to spoil
    damage(target)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = report.write_report(report.find_runs([runs_dir]), tmp_path / "out", plots=False)
    assert result["runs"] == 11 and "skipped 1 unreadable or damaged line" in capsys.readouterr().err
    run = next(r for r in report.find_runs([metrics.parent]))
    assert target["epoch"] not in run.records("mask") or not isinstance(target["epoch"], int)


def test_settings_that_do_not_change_the_computation_never_split_groups(runs_dir):
    """Runs rerun with another data folder, device spelling or IoU logging interval are the same experiment."""
    for seed, (key, value) in enumerate([("data_root", "/data"), ("device", "cpu"), ("iou_interval", 1)]):
        config_file = runs_dir / "rigl-0.9-None" / f"seed{seed}" / "config.yaml"
        config_file.write_text(yaml.safe_dump({**yaml.safe_load(config_file.read_text()), key: value}))
    extra, rows = report.summarize(report.find_runs([runs_dir]))
    assert extra == ["method_args.mask_lr"] and [r["n"] for r in rows if r["method"] == "rigl"] == [3]


def test_a_damaged_config_is_a_one_line_warning(runs_dir, capsys):
    (runs_dir / "set-0.9-None" / "seed0" / "config.yaml").write_text("model: [1\n")
    assert len(report.find_runs([runs_dir / "set-0.9-None"])) == 1
    warnings = capsys.readouterr().err.splitlines()  # the YAML error's context and caret lines were printed too
    assert len(warnings) == 1 and "set-0.9-None/seed0: skipped, corrupt run folder (while parsing" in warnings[0]


def test_dense_reference_shares_the_schedule(tmp_path):
    """A dense run of another length is no reference: each run is set against the dense run of its own epochs,
    or, with none, keeps its recorded ratio (dense runs of 1 and 2 epochs were averaged for both)."""
    runs = []
    for epochs in (1, 2, 3):
        for method in ("dense", "rigl") if epochs < 3 else ("rigl",):
            folder = tmp_path / f"{method}-{epochs}"
            write_run(folder, method, 0.0 if method == "dense" else 0.9, 0, 0.9)
            config = yaml.safe_load((folder / "config.yaml").read_text())
            (folder / "config.yaml").write_text(yaml.safe_dump({**config, "epochs": epochs}))
            summary = json.loads((folder / "summary.json").read_text())
            summary["flops"]["total"] *= epochs
            summary["time"]["total"] *= epochs
            summary["epochs"] = epochs
            (folder / "summary.json").write_text(json.dumps(summary))
            runs += report.find_runs([folder])
    extra, rows = report.summarize(runs)
    assert extra == ["epochs"]
    rigl = {int(row["epochs"]): row for row in rows if row["method"] == "rigl"}
    assert [rigl[e]["flops_rel_mean"] for e in (1, 2)] == pytest.approx([0.4, 0.4])
    assert [rigl[e]["time_rel_mean"] for e in (1, 2)] == pytest.approx([1.2, 1.2])
    assert rigl[3]["flops_rel_mean"] == pytest.approx(0.2) and rigl[3]["time_rel_mean"] is None  # as recorded


def test_main_writes_table_csv_and_figures(runs_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    out = tmp_path / "report"
    first, *rest = sorted(str(p) for p in runs_dir.iterdir())
    assert report.main([first, "--out", str(out), *rest, "--json"]) == 0  # folders on both sides of the options
    result = json.loads(capsys.readouterr().out)
    assert result["group_keys"] == ["method", "sparsity", "method_args.mask_lr"] and result["runs"] == 11
    table, left_out = (out / "report.md").read_text().split("\nLeft out (4):\n\n")
    assert table.count("\n") == 2 + 5 + 2 and "0.92 ± 0.026" in table and "sample standard deviation (n − 1)" in table
    assert sorted(line.split(": ", 1)[1] for line in left_out.splitlines()) == [
        "corrupt run folder (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        "failed before making its run folder: bidst: train_subset ... is too small (see seed=0.log)",
        "failed before making its run folder: its log holds no output (stopped as it started?) (see seed=0.log)",
        "unfinished run (no summary.json: still running, or killed)",
    ] and result["left_out"] == [line[2:] for line in left_out.splitlines()]
    assert (out / "report.csv").read_text().splitlines()[0].startswith("method,sparsity,method_args.mask_lr,n,")
    pngs = ["accuracy_vs_sparsity.png", "test_acc_curves.png", "iou.png", "itop.png", "layer_density.png"]
    for name in pngs:
        pixels = imread(out / name)
        assert pixels.shape[0] > 200 and pixels.std() > 0.01, name  # a real drawing, not a blank canvas
    # no temp files; the manifest lists what this report wrote
    assert sorted(p.name for p in out.iterdir()) == sorted([*pngs, "report.csv", "report.md", report.MANIFEST])
    assert set(json.loads((out / report.MANIFEST).read_text())) == {*pngs, "report.csv", "report.md"} <= set(
        report.REPORT_FILES)


def test_a_report_replaces_an_earlier_report_only(runs_dir, tmp_path, capsys):
    """Rewriting a report folder replaces its files and removes the earlier report's figures this one does not make
    (they were left behind, looking like part of the new report); a file no report wrote is never replaced."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert report.main([str(runs_dir), "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert report.main([str(runs_dir / "rigl-0.9-None"), "--out", str(out), "--no-plots"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([".bidst-report.json", "notes.txt", "report.csv", "report.md"])
    assert "| rigl | 0.9 | 3 |" in (out / "report.md").read_text() and "set" not in (out / "report.csv").read_text()
    # a folder whose report.md is the user's own
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("MY NOTES")
    (mine / "iou.png").write_bytes(b"my figure")
    capsys.readouterr()
    assert report.main([str(runs_dir), "--out", str(mine)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bidst report: error")]
    assert len(errors) == 1 and "mine/report.md exists and no earlier bidst report wrote it" in errors[0]
    assert (mine / "report.md").read_text() == "MY NOTES" and (mine / "iou.png").read_bytes() == b"my figure"
    assert sorted(p.name for p in mine.iterdir()) == ["iou.png", "report.md"]
    # a table of the user's that starts as the report's does is not taken for an earlier report
    (mine / "report.md").write_text("| method | sparsity | my own table\n")
    (mine / "report.csv").write_text("method,sparsity,mine\n")
    assert report.main([str(runs_dir), "--out", str(mine), "--no-plots"]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["iou.png", "report.csv", "report.md"]
    assert (mine / "iou.png").read_bytes() == b"my figure"
    # a report written before manifests existed (its table header) is recognised and replaced
    older = tmp_path / "older"  # (one from before the footnote under the table, and without report.csv)
    older.mkdir()
    (older / "report.md").write_text("| method | sparsity | n | test acc | best val acc | train FLOPs (× dense) | "
                                     "time (× dense) | topology changes | epochs |\n| --- |\n")
    assert report.main([str(runs_dir), "--out", str(older), "--no-plots"]) == 0
    legacy = tmp_path / "legacy"
    assert report.main([str(runs_dir), "--out", str(legacy), "--no-plots"]) == 0
    (legacy / report.MANIFEST).unlink()
    (legacy / "iou.png").write_bytes(b"an old report's figure")
    assert report.main([str(runs_dir / "rigl-0.9-None"), "--out", str(legacy), "--no-plots"]) == 0
    assert sorted(p.name for p in legacy.iterdir()) == [".bidst-report.json", "report.csv", "report.md"]


def test_failed_report_leaves_no_files(runs_dir, tmp_path, monkeypatch):
    def broken(runs, extra):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "figures", broken)
    with pytest.raises(RuntimeError):
        report.write_report(report.find_runs([runs_dir]), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_out_that_is_a_file_is_a_one_line_error_and_the_file_is_kept(runs_dir, tmp_path, capsys):
    afile = tmp_path / "report"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        assert report.main([str(runs_dir), "--out", str(out), "--no-plots"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bidst report: error")]
        assert len(errors) == 1 and str(afile) in errors[0]
    assert afile.read_text() == "keep me"


def test_no_runs_and_missing_matplotlib_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r"), "--no-plots"]) == 2
    assert "no finished runs" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "bidst[plots]" in err and err.count("\n") == 1


def test_series_at_one_sparsity_sit_side_by_side_inside_the_axes(runs_dir):
    """The four sparse series at 90% are drawn a few points apart, and the axes' limits hold every error bar."""
    pytest.importorskip("matplotlib")
    runs = report.find_runs([runs_dir])
    extra, _ = report.summarize(runs)
    fig = report.figures(runs, extra)["accuracy_vs_sparsity.png"]
    ax = fig.axes[0]
    markers = [line for line in ax.lines if line.get_marker() == "o"]
    assert len(markers) == 4  # rigl, set and bidst at two mask_lr; dense is a horizontal line
    xs = [float(line.get_transform().transform(line.get_xydata())[0, 0]) for line in markers]
    assert len({round(x, 3) for x in xs}) == 4
    low, high = ax.get_ylim()
    assert low <= 0.86 and high >= statistics.mean([0.90, 0.94]) + statistics.stdev([0.90, 0.94])


@pytest.mark.parametrize("field,value", [("final_test_acc", "90%"), ("topology_changes", [3]),
                                         ("flops", {"total": "many"}), ("time", 12), ("method_stats", [1]),
                                         ("layers", [{"name": "fc", "density": "x"}]), ("best_val_acc", True)])  # fmt: skip
def test_a_summary_field_of_the_wrong_type_skips_that_run_with_a_warning(runs_dir, capsys, field, value):
    """A hand-edited summary.json with a field the report computes with of the wrong type was a traceback in the
    middle of the tables (or a silently wrong mean)."""
    path = runs_dir / "rigl-0.9-None" / "seed0" / "summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({**summary, field: value}))
    capsys.readouterr()
    runs = report.find_runs([runs_dir])
    assert f"{field} of the wrong type" in capsys.readouterr().err
    assert len(runs) == sum(map(len, ACCS.values())) - 1
    _, rows = report.summarize(runs)
    assert row_of(rows, "rigl")["n"] == 2


def test_a_setting_written_out_at_its_default_is_the_same_setting(tmp_path):
    """An option left out and the same option given at the method's default are one group (they split the seeds
    into two rows, each with a spurious column)."""
    root = tmp_path / "runs"
    for seed, acc in enumerate([0.90, 0.91]):
        write_run(root / f"plain{seed}", "rigl", 0.9, seed, acc)
    write_run(root / "explicit", "rigl", 0.9, 2, 0.95)
    config = yaml.safe_load((root / "explicit" / "config.yaml").read_text())
    config.update(method_args={"drop_fraction": 0.3}, distribution="erk")  # RigL's defaults
    (root / "explicit" / "config.yaml").write_text(yaml.safe_dump(config))
    write_run(root / "other", "rigl", 0.9, 0, 0.80)
    config["method_args"] = {"drop_fraction": 0.5}
    (root / "other" / "config.yaml").write_text(yaml.safe_dump(config))
    extra, rows = report.summarize(report.find_runs([root]))
    assert extra == ["method_args.drop_fraction"]
    assert row_of(rows, "rigl", **{"method_args.drop_fraction": 0.3})["n"] == 3
    assert row_of(rows, "rigl", **{"method_args.drop_fraction": 0.5})["n"] == 1


def test_dense_runs_sit_at_sparsity_zero_whatever_their_config_says(tmp_path):
    root = tmp_path / "runs"
    for seed, sparsity in enumerate([0.9, 0.95]):
        write_run(root / f"dense{seed}", "dense", sparsity, seed, 0.93)
    _, rows = report.summarize(report.find_runs([root]))
    assert [(r["method"], r["sparsity"], r["n"]) for r in rows] == [("dense", 0.0, 2)]


def test_a_non_finite_accuracy_shows_as_nan_and_a_repeated_seed_is_flagged(runs_dir, tmp_path, capsys):
    summary = runs_dir / "rigl-0.9-None" / "seed0" / "summary.json"
    summary.write_text(summary.read_text().replace('"final_test_acc": 0.9,', '"final_test_acc": NaN,'))
    write_run(runs_dir / "again", "set", 0.9, 0, 0.87)  # seed 0 of SET a second time
    runs = report.find_runs([runs_dir])
    _, rows = report.summarize(runs)
    rigl = row_of(rows, "rigl")
    assert rigl["n"] == 3 and rigl["test_acc_mean"] != rigl["test_acc_mean"]  # NaN, not the mean of the others
    assert "share seeds (0, 1)" in capsys.readouterr().err
    assert report.main([str(runs_dir), "--out", str(tmp_path / "out")]) == 0  # table and figures, no crash
    assert "| rigl | 0.9 | – | 3 | nan |" in (tmp_path / "out" / "report.md").read_text()


def test_runs_without_a_test_accuracy_are_left_out_of_the_figures(runs_dir, tmp_path):
    for folder in (runs_dir / "dense-0.0-None").iterdir():
        summary = folder / "summary.json"
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "final_test_acc": None}))
    assert report.main([str(runs_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "accuracy_vs_sparsity.png").exists()


def test_an_integer_written_for_a_float_default_adds_no_column(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "plain", "bidst", 0.9, 0, 0.90)
    write_run(root / "explicit", "bidst", 0.9, 1, 0.91)
    config = yaml.safe_load((root / "explicit" / "config.yaml").read_text())
    config["method_args"] = {"mask_rows": 1}  # the default is 1.0
    (root / "explicit" / "config.yaml").write_text(yaml.safe_dump(config))
    extra, rows = report.summarize(report.find_runs([root]))
    assert extra == [] and [r["n"] for r in rows] == [2]


def test_runs_of_other_models_or_datasets_never_share_a_series_unnamed(tmp_path):
    """A key of the experiment (model, dataset, schedule) splits groups wherever it varies among the runs: a RigL run
    on another dataset at another sparsity was drawn on one line with the first dataset's runs, unnamed."""
    write_run(tmp_path / "a", "rigl", 0.9, 0, 0.9)
    write_run(tmp_path / "b", "rigl", 0.95, 0, 0.1)
    config = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    (tmp_path / "b" / "config.yaml").write_text(yaml.safe_dump({**config, "dataset": "synthetic"}))
    extra, rows = report.summarize(report.find_runs([tmp_path]))
    assert extra == ["dataset"] and [(r["sparsity"], r["dataset"]) for r in rows] == [(0.9, "fmnist"), (0.95, "synthetic")]


def test_dense_runs_are_not_split_by_settings_dense_never_reads(tmp_path):
    for seed, distribution in enumerate(["erk", "uniform"]):
        write_run(tmp_path / f"dense{seed}", "dense", 0.0, seed, 0.9)
        config = yaml.safe_load((tmp_path / f"dense{seed}" / "config.yaml").read_text())
        (tmp_path / f"dense{seed}" / "config.yaml").write_text(
            yaml.safe_dump({**config, "distribution": distribution, "dense_first": bool(seed)}))
    extra, rows = report.summarize(report.find_runs([tmp_path]))
    assert extra == [] and len(rows) == 1 and rows[0]["n"] == 2


def test_folders_that_are_not_runs_are_searched_and_runs_without_config_are_left_out(tmp_path, capsys):
    """A config.yaml or log of the user's in a folder above the runs hid every run below it ("unfinished run"); a
    run folder without config.yaml was reported with default settings it never used."""
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "config.yaml").write_text("notes: x\n")
    (tmp_path / "exp" / "train.log").write_text("output\n")
    write_run(tmp_path / "exp" / "a", "rigl", 0.9, 0, 0.9)
    write_run(tmp_path / "exp" / "b", "rigl", 0.9, 1, 0.9)
    (tmp_path / "exp" / "b" / "config.yaml").unlink()
    left_out: list[str] = []
    runs = report.find_runs([tmp_path], left_out)
    assert [r.path.name for r in runs] == ["a"]
    assert left_out == [f"{tmp_path / 'exp' / 'b'}: corrupt run folder (no config.yaml, so its settings are unknown)"]
    assert "exp:" not in capsys.readouterr().err


def test_a_failed_run_is_named_with_its_reason(tmp_path):
    write_run(tmp_path / "ok", "rigl", 0.9, 0, 0.9)
    write_run(tmp_path / "failed", "rigl", 0.9, 1, 0.9, finished=False)
    with (tmp_path / "failed" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"kind": "stopped", "epoch": 1, "step": 3, "reason": "non-finite loss (nan) at step 3"}) + "\n")
    left_out: list[str] = []
    assert len(report.find_runs([tmp_path, tmp_path / "failed"], left_out)) == 1  # one folder, reached twice
    assert left_out == [f"{tmp_path / 'failed'}: stopped: non-finite loss (nan) at step 3"]


def test_iou_curves_of_other_intervals_are_separate_series(tmp_path, monkeypatch):
    """The IoU figure averaged IoUs over one-epoch and three-epoch intervals into one point, its band past 1."""
    pytest.importorskip("matplotlib")
    for seed, interval in enumerate([1, 1, 3]):
        write_run(tmp_path / f"r{seed}", "rigl", 0.9, seed, 0.9)
        config = yaml.safe_load((tmp_path / f"r{seed}" / "config.yaml").read_text())
        (tmp_path / f"r{seed}" / "config.yaml").write_text(yaml.safe_dump({**config, "iou_interval": interval}))
    runs = report.find_runs([tmp_path])
    extra, _ = report.summarize(runs)
    figs = report.figures(runs, extra)
    ax = figs["iou.png"].axes[0]
    labels = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert labels == ["rigl iou_interval=1 (n=2)", "rigl iou_interval=3 (n=1)"]
    bands = [[p.vertices for p in band.get_paths()] for band in ax.collections]  # in the series' sorted order
    assert [len(paths) for paths in bands] == [1, 0]  # one run has no band (a NaN std spanned the whole axis)
    assert 0.0 <= bands[0][0][:, 1].min() and bands[0][0][:, 1].max() <= 1.0
    (itop_label,) = [t.get_text() for t in figs["itop.png"].axes[0].get_legend().get_texts()]
    assert itop_label == "rigl (n=3)"
