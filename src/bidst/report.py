"""`bidst report`: turn finished run folders into a table (mean ± std over seeds) and figures.

Runs are grouped by method and sparsity, plus every config key that takes more than one value
among runs sharing a method and sparsity (an ablation axis such as ``method_args.mask_lr``);
keys naming a seed, ``run_dir``, ``resume``, ``data_root``, ``device``, ``iou_interval`` and the operational
keys (progress, logging, checkpoints, threads, loader workers) never split groups. FLOPs and time are given
relative to a dense run of the same model and dataset when the set holds one, else as the run
recorded them (FLOPs only); time is the summary's ``time.total``, else its ``wall_time_s``.
Outputs are written to temporary names and renamed at the end, so a failed report never leaves
half-written files; a file of the report's names already in the output folder is replaced only if an
earlier report wrote it (listed in the folder's ``.bidst-report.json``), and that report's other files go.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import make_folder
from .config import OPERATIONAL_KEYS, TrainConfig, load_yaml
from .errors import BidstError
from .methods import with_defaults

# they do not change what a run computes (the device only its floating-point rounding)
_NEVER_GROUP = {"run_dir", "resume", "data_root", "device", "iou_interval", *OPERATIONAL_KEYS}
DENSE_IGNORES = ("distribution", "dense_first", "dense_last")  # settings that dense training never reads


@dataclass
class Run:
    """One finished run folder: its summary, resolved config and metric records."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The method name, from the summary (else the config)."""
        return str(self.summary.get("method", self.config.get("method", "?")))

    @property
    def sparsity(self) -> float:
        """The target sparsity, rounded so that 0.9 and 0.9000000001 group together (0 for dense training, which
        ignores the configured one)."""
        if self.method == "dense":
            return 0.0
        return round(float(self.summary.get("sparsity", self.config.get("sparsity", 0.0))), 6)

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        """The config as dotted keys with the method's defaults written out, so that an option left out and the same
        option given at its default are one setting (a method this process does not know is taken as written)."""
        flat = {k: v for k, v in flatten(with_defaults(self.config)).items() if v != {}}
        return {k: v for k, v in flat.items() if k not in DENSE_IGNORES} if self.method == "dense" else flat

    def records(self, kind: str) -> dict[int, dict[str, Any]]:
        """The last record of `kind` per epoch (a resumed run may log an epoch twice)."""
        return {int(r["epoch"]): r for r in self.metrics if r.get("kind") == kind and "epoch" in r}


def _warn(message: str) -> None:
    print(f"bidst report: warning: {message}", file=sys.stderr)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _usable(record: Any) -> bool:
    """Whether a metrics record has the types the report reads: an integer epoch, a numeric test accuracy, and
    per-layer number mappings (with the overall "__all__" for IoU and ITOP)."""
    if not isinstance(record, dict):
        return False
    epoch = record.get("epoch", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not _is_number(record.get("test_acc")):
        return False
    for key in ("density", "iou", "itop"):
        part = record.get(key, {"__all__": 0})
        if not isinstance(part, dict) or "__all__" not in part and key != "density":
            return False
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part.values()):
            return False
    return True


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records, bad = [], 0
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():  # a damaged byte spoils its line only
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if _usable(record):
                records.append(record)
            elif isinstance(record, dict):
                bad += 1
    if bad:
        _warn(f"{path}: skipped {bad} unreadable or damaged line(s)")
    return records


SUMMARY_NUMBERS = ("final_test_acc", "best_val_acc", "final_val_acc", "topology_changes", "measured_sparsity",
                   "wall_time_s")


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_summary(summary: dict[str, Any]) -> None:
    """Raise TypeError naming the first field the report reads that has the wrong type (a hand-edited file)."""
    wrong = [k for k in SUMMARY_NUMBERS if not _is_number(summary.get(k))]
    for kind in ("flops", "time"):
        part = summary.get(kind)
        if part is not None and (not isinstance(part, dict) or not all(
                _is_number(part.get(k)) for k in ("total", "relative_to_dense"))):  # fmt: skip
            wrong.append(kind)
    if not isinstance(summary.get("method_stats") or {}, dict):
        wrong.append("method_stats")
    layers = summary.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, dict) and isinstance(x.get("name", ""), str)
                                               and _is_number(x.get("density")) for x in layers):  # fmt: skip
        wrong.append("layers")
    if wrong:
        raise TypeError(f"summary.json has {', '.join(wrong)} of the wrong type")


def _load_run(folder: Path) -> Run | str:
    """The run in `folder`, or why it cannot be read."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        config_file = folder / "config.yaml"
        if not config_file.exists():  # its settings would be taken for the defaults
            raise ValueError("no config.yaml, so its settings are unknown")
        config = load_yaml(config_file.read_text())
        if not isinstance(summary, dict) or not isinstance(config, dict) or "final_test_acc" not in summary:
            raise TypeError("summary.json without final_test_acc, or config.yaml not a mapping")
        _check_summary(summary)
        # keys added to TrainConfig after a run was made take their defaults, so they never split groups
        run = Run(folder, summary, {**TrainConfig().to_dict(), **config})
        _ = run.sparsity  # a sparsity that is not a number is corrupt too
    except (OSError, ValueError, TypeError, yaml.YAMLError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"corrupt run folder ({reason})"
    run.metrics = _read_metrics(folder / "metrics.jsonl")
    return run


def _stopped(folder: Path) -> str:
    """Why an unfinished run stopped, from the record `bidst train` leaves in its metrics.jsonl when it fails or is
    interrupted; else that it is still running or was killed."""
    try:
        lines = (folder / "metrics.jsonl").read_text(errors="replace").splitlines()
        record = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and record.get("kind") == "stopped":
        return f"stopped: {record.get('reason')}"
    return "unfinished run (no summary.json: still running, or killed)"


def find_runs(paths: Iterable[str | os.PathLike], skipped: list[str] | None = None) -> list[Run]:
    """Finished runs found under `paths` (run folders or sweep folders, searched recursively); unfinished, failed
    and corrupt run folders are reported on stderr, each with its reason added to `skipped`, and left out."""
    skipped = [] if skipped is None else skipped
    runs: list[Run] = []
    seen: set[Path] = set()  # a folder reached through two of `paths` counts once, left out or not

    def leave_out(folder: Path, reason: str) -> None:
        if folder.resolve() not in seen:
            seen.add(folder.resolve())
            _warn(f"{folder}: skipped, {reason}")
            skipped.append(f"{folder}: {reason}")
    for root in map(Path, paths):
        if not root.is_dir():
            _warn(f"{root}: not a folder")
            continue
        for folder, subdirs, files in os.walk(root):
            if "summary.json" in files:
                run = None if Path(folder).resolve() in seen else _load_run(Path(folder))
                if isinstance(run, Run):
                    seen.add(run.path.resolve())
                    runs.append(run)
                elif run is not None:
                    leave_out(Path(folder), run)
                subdirs.clear()  # a run folder's subfolders are its checkpoints
                continue
            if "config.yaml" in files and ("metrics.jsonl" in files or "checkpoints" in subdirs):  # a run's folder
                leave_out(Path(folder), _stopped(Path(folder)))
            for log in sorted(f for f in files if f.endswith(".log") and "=" in f and f[:-4] not in subdirs):
                # a sweep writes <run>.log beside <run>/: this run failed before it made its folder
                leave_out(Path(folder) / log[:-4], f"failed before making its run folder: {_last_line(Path(folder) / log)} "
                          f"(see {log})")
            subdirs[:] = sorted(d for d in subdirs if d != "checkpoints")
    return sorted(runs, key=lambda r: str(r.path))


def _last_line(path: Path, limit: int = 200) -> str:
    """The last non-empty line of a log (a failed run's one-line error), cut to `limit` characters."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"its log cannot be read ({exc.strerror or exc})"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("$ ")]  # the command
    last = lines[-1] if lines else "its log holds no output (stopped as it started?)"
    return last if len(last) <= limit else last[: limit - 3] + "..."


def _canon(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys, seeds aside, that take several values among runs of one (method, sparsity), and the keys of
    the experiment itself (model, data, schedule: `REFERENCE_KEYS`) that take several values among all runs, so
    that runs on another model or dataset never join a series unnamed."""
    by_base: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        by_base.setdefault((run.method, run.sparsity), []).append(run.settings)
    keys = sorted({k for flats in by_base.values() for flat in flats for k in flat})

    def varies(k: str, flats: Sequence[dict[str, Any]]) -> bool:
        return len({_sortable(f.get(k)) for f in flats}) > 1  # 1 and 1.0 alike

    every = [run.settings for run in runs]
    return [
        k
        for k in keys
        if k not in ("method", "sparsity")
        and k not in _NEVER_GROUP
        and "seed" not in k.rsplit(".", 1)[-1]
        and (any(varies(k, flats) for flats in by_base.values()) or k in REFERENCE_KEYS and varies(k, every))
    ]


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value) of the values present; NaN if one is not
    finite (a failed run is shown, not averaged away)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    if not all(math.isfinite(v) for v in present):
        return math.nan, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


REFERENCE_KEYS = ("model", "dataset", "epochs", "batch_size", "train_subset", "val_size", "holdout_size")


def _reference_key(run: Run) -> str:
    """What a dense reference run must share with a run: the model, the data and the schedule (the steps taken)."""
    return _canon([run.config.get(k) for k in REFERENCE_KEYS])


def _total(run: Run, kind: str) -> float | None:
    """A run's recorded `kind` ("flops" or "time") total; time falls back to ``wall_time_s``."""
    total = (run.summary.get(kind) or {}).get("total")
    if total is None and kind == "time":
        total = run.summary.get("wall_time_s")
    return None if total is None else float(total)


def _dense_totals(runs: Sequence[Run], kind: str) -> dict[str, float]:
    """Mean `kind` total of the dense runs, per model, data and schedule (`REFERENCE_KEYS`)."""
    totals: dict[str, list[float]] = {}
    for run in runs:
        total = _total(run, kind)
        if run.method == "dense" and total:
            totals.setdefault(_reference_key(run), []).append(total)
    return {k: statistics.fmean(v) for k, v in totals.items()}


def _relative(run: Run, kind: str, dense: dict[str, float]) -> float | None:
    reference, total = dense.get(_reference_key(run)), _total(run, kind)
    if reference and total is not None:
        return total / reference
    return (run.summary.get(kind) or {}).get("relative_to_dense")


def _sortable(value: Any) -> tuple:
    """A total order over config values: missing first, then numbers by value, then the rest."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, _canon(value))


def summarize(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """The group key names and one row of statistics per group (sorted by sparsity, method)."""
    extra = varying_keys(runs)
    dense_flops, dense_time = _dense_totals(runs, "flops"), _dense_totals(runs, "time")
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        flat = run.settings
        key = (run.sparsity, run.method, *(_sortable(flat.get(k)) for k in extra))
        groups.setdefault(key, []).append(run)
    rows = []
    for key in sorted(groups):
        members = groups[key]
        flat = members[0].settings
        row: dict[str, Any] = {"method": key[1], "sparsity": key[0], **{k: flat.get(k) for k in extra}}
        row["n"] = len(members)
        row["seeds"] = sorted({_canon(r.summary.get("seed", r.config.get("seed"))) for r in members})
        if len(row["seeds"]) < row["n"]:
            _warn(f"{row['n']} runs of {key[1]} at sparsity {key[0]:g} share seeds ({', '.join(row['seeds'])}): a "
                  "seed run twice counts twice in the mean and std; report each seed once")
        columns: dict[str, Callable[[Run], Any]] = {
            "test_acc": lambda r: r.summary.get("final_test_acc"),
            "best_val_acc": lambda r: r.summary.get("best_val_acc"),
            "flops_rel": lambda r: _relative(r, "flops", dense_flops),
            "time_rel": lambda r: _relative(r, "time", dense_time),
            "topology_changes": lambda r: r.summary.get("topology_changes"),
            "measured_sparsity": lambda r: r.summary.get("measured_sparsity"),
        }
        for name, get in columns.items():
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([get(r) for r in members])
        row["epochs"] = "/".join(sorted({_canon(r.summary.get("epochs")) for r in members}))
        row["method_stats"] = _stats_means(members)
        rows.append(row)
    return extra, rows


def _stats_means(members: Sequence[Run]) -> dict[str, float]:
    """Mean over a group's runs of each number in their summaries' `method_stats` (e.g. BiDST's set_by_scores)."""
    values: dict[str, list[float]] = {}
    for run in members:
        for key, value in (run.summary.get("method_stats") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, []).append(float(value))
    return {key: statistics.fmean(v) for key, v in values.items()}


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.2g}"


def markdown(extra: Sequence[str], rows: Sequence[dict[str, Any]], left_out: Sequence[str] = ()) -> str:
    """The report table in Markdown, and the run folders left out of it with their reasons."""
    stats = any(row.get("method_stats") for row in rows)  # a column only where some method reported stats
    epochs = "epochs" not in extra  # (where runs differ in it, the group's column shows it once)
    header = ["method", "sparsity", *extra, "n", "test acc", "best val acc", "train FLOPs (× dense)", "time (× dense)",
              "topology changes", *(["epochs"] if epochs else []), *(["method stats"] if stats else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["method"], f"{row['sparsity']:g}", *("–" if row[k] is None else _canon(row[k]) for k in extra)]
        cells.append(str(row["n"]))
        cells += [_fmt(row[f"{c}_mean"], row[f"{c}_std"]) for c in ("test_acc", "best_val_acc")]
        cells += [_fmt(row[f"{c}_mean"]) for c in ("flops_rel", "time_rel", "topology_changes")]
        if epochs:
            cells.append(row["epochs"])
        if stats:
            cells.append(", ".join(f"{k} {_fmt(v)}" for k, v in row.get("method_stats", {}).items()) or "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "± is the sample standard deviation (n − 1) over a row's runs; a row of one run has none, a run with a "
              "non-finite accuracy makes its row's mean nan."]
    if left_out:
        lines += ["", f"Left out ({len(left_out)}):", "", *(f"- {reason}" for reason in left_out)]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The report rows as CSV (empty cells for missing values)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(v) if k == "seeds" else _stats_cell(v) if k == "method_stats"
                         else ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def _stats_cell(stats: dict[str, float]) -> str:
    """A CSV cell for a row's method stats: `key=value` pairs joined by semicolons (empty if none)."""
    return ";".join(f"{k}={v:g}" for k, v in stats.items())


# ---- figures -------------------------------------------------------------------------------

def _figure_class() -> Any:
    """matplotlib's Figure (no pyplot, no global backend switch), or a one-line BidstError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BidstError("plots need matplotlib: pip install 'bidst[plots]' (or pass --no-plots)") from None
    return Figure


def _series(run: Run, extra: Sequence[str]) -> str:
    flat = run.settings
    return " ".join([run.method, *(f"{k}={_canon(flat[k])}" for k in extra if flat.get(k) not in (None, {}))])


def _curve(runs: Sequence[Run], points: Callable[[Run], dict[int, float]]):
    """Mean and std over runs at every epoch some run has (x, mean, std as lists), and the fewest and most runs
    a point averages."""
    per_epoch: dict[int, list[float]] = {}
    for run in runs:
        for epoch, value in points(run).items():
            per_epoch.setdefault(epoch, []).append(value)
    xs = sorted(per_epoch)
    stats = [_mean_std(per_epoch[x]) for x in xs]
    counts = [len(per_epoch[x]) for x in xs]
    # NaN: no band
    return xs, [m for m, _ in stats], [math.nan if s is None else s for _, s in stats], (min(counts), max(counts))


def _grid(Figure: Any, n: int, title: str):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes


def _per_sparsity_curves(Figure, runs, extra, colors, points, title, ylabel, limits=(-math.inf, math.inf)):
    """One panel per sparsity, one mean line with a ±std band (cut to `limits`, the values the quantity can take) per
    series, labelled with how many runs its points average; None if no data."""
    from matplotlib.ticker import MaxNLocator

    levels = sorted({r.sparsity for r in runs if points(r)})
    if not levels:
        return None
    fig, axes = _grid(Figure, len(levels), title)
    for ax, level in zip(axes, levels):
        by_series: dict[str, list[Run]] = {}
        for run in runs:
            if run.sparsity == level and points(run):
                by_series.setdefault(_series(run, extra), []).append(run)
        for name, members in sorted(by_series.items()):
            xs, mean, std, (fewest, most) = _curve(members, points)
            ax.plot(xs, mean, marker=".", color=colors[name],
                    label=f"{name} (n={fewest}{'' if fewest == most else f'-{most}'})")
            low, high = limits  # (a NaN std, one run, stays NaN: no band there)
            ax.fill_between(xs, [m - s if math.isnan(s) else max(low, m - s) for m, s in zip(mean, std)],
                            [m + s if math.isnan(s) else min(high, m + s) for m, s in zip(mean, std)],
                            color=colors[name], alpha=0.2)
        ax.set_title(f"sparsity {level:g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    return fig


def _accuracy_vs_sparsity(Figure, runs, extra, colors):
    fig, (ax,) = _grid(Figure, 1, "Final test accuracy vs sparsity (mean ± std over seeds)")
    by_series: dict[str, list[Run]] = {}
    for run in runs:
        by_series.setdefault(_series(run, extra), []).append(run)
    from matplotlib.transforms import offset_copy

    sparse = [name for name, members in sorted(by_series.items()) if members[0].method != "dense"]
    for name, members in sorted(by_series.items()):
        levels = sorted({r.sparsity for r in members})
        stats = [_mean_std([r.summary["final_test_acc"] for r in members if r.sparsity == s]) for s in levels]
        kept = [(x, m, math.nan if sd is None else sd) for x, (m, sd) in zip(levels, stats) if m is not None]
        if not kept:  # no run of this series has a test accuracy
            continue
        levels, means, stds = (list(t) for t in zip(*kept))
        if members[0].method == "dense":
            ax.axhline(means[0], color=colors[name], linestyle="--", label=name)
            continue
        # series side by side, a few points apart, so that error bars at the same sparsity do not hide each other
        shift = offset_copy(ax.transData, fig=fig, x=4.0 * (sparse.index(name) - (len(sparse) - 1) / 2), units="points")
        ax.errorbar(levels, means, yerr=stds,  # a NaN std (one seed) draws no bar
                    color=colors[name], marker="o", capsize=3, label=name, transform=shift)
        ax.update_datalim([(x, m + sign * (0.0 if math.isnan(sd) else sd)) for x, m, sd in zip(levels, means, stds)
                           for sign in (-1, 1) if math.isfinite(m)])
    ax.autoscale_view()
    ax.set_xlabel("sparsity")
    ax.set_ylabel("final test accuracy")
    ax.legend(fontsize="small")
    return fig


def _final_density(run: Run) -> dict[str, float]:
    """Per-layer density from the last mask record, else from the summary's ``layers``."""
    masks = run.records("mask")
    if run.method == "dense":
        return {}
    if masks:
        return {k: v for k, v in masks[max(masks)].get("density", {}).items() if k != "__all__"}
    return {layer["name"]: layer["density"] for layer in run.summary.get("layers", []) if "density" in layer}


def _layer_densities(Figure, runs, extra, colors):
    levels = sorted({r.sparsity for r in runs if _final_density(r)})
    if not levels:
        return None
    fig, axes = _grid(Figure, len(levels), "Final per-layer density")
    for ax, level in zip(axes, levels):
        shown: set[str] = set()
        for run in runs:
            density, name = _final_density(run), _series(run, extra)
            if run.sparsity != level or not density or name in shown:
                continue
            shown.add(name)  # the layer budgets of one method are the same for every seed
            ax.plot(range(len(density)), list(density.values()), marker="o", color=colors[name], label=name)
            ax.set_xticks(range(len(density)), list(density), rotation=60, ha="right", fontsize="x-small")
        ax.set_title(f"sparsity {level:g}")
        ax.set_ylabel("density (share of weights active)")
        ax.legend(fontsize="small")
    return fig


def figures(runs: Sequence[Run], extra: Sequence[str]) -> dict[str, Any]:
    """The report's figures by file name; a figure without data in the runs is left out. IoU curves of runs with
    different `iou_interval`s are separate series: an IoU over a longer interval is lower."""
    Figure = _figure_class()
    intervals = {_sortable(r.settings.get("iou_interval")) for r in runs}
    iou_extra = [*extra, "iou_interval"] if len(intervals) > 1 else extra
    names = sorted({_series(r, keys) for r in runs for keys in (extra, iou_extra)})
    palette = [f"C{i % 10}" for i in range(len(names))]
    colors = dict(zip(names, palette))

    def test_acc(run: Run) -> dict[int, float]:
        return {e: r["test_acc"] for e, r in run.records("epoch").items() if r.get("test_acc") is not None}

    def overall(key: str) -> Callable[[Run], dict[int, float]]:  # (dense training has no mask to follow)
        return lambda run: {} if run.method == "dense" else {
            e: r[key]["__all__"] for e, r in run.records("mask").items() if key in r}

    iou, itop = overall("iou"), overall("itop")

    made = {
        "accuracy_vs_sparsity.png": _accuracy_vs_sparsity(Figure, runs, extra, colors),
        "test_acc_curves.png": _per_sparsity_curves(
            Figure, runs, extra, colors, test_acc, "Test accuracy during training (mean ± std)", "test accuracy"),
        "iou.png": _per_sparsity_curves(
            Figure, runs, iou_extra, colors, iou, "Mask IoU between the start and end of each interval",
            "IoU (all layers)", (0.0, 1.0)),
        "itop.png": _per_sparsity_curves(
            Figure, runs, extra, colors, itop, "ITOP rate (share of weights ever active)", "ITOP rate", (0.0, 1.0)),
        "layer_density.png": _layer_densities(Figure, runs, extra, colors),
    }
    return {name: fig for name, fig in made.items() if fig is not None}


# ---- writing -------------------------------------------------------------------------------

MANIFEST = ".bidst-report.json"  # the files the last report wrote into its folder
REPORT_FILES = ("report.md", "report.csv", "accuracy_vs_sparsity.png", "test_acc_curves.png", "iou.png", "itop.png",
                "layer_density.png")


LEGACY_HEADER = "| n | test acc | best val acc | train FLOPs (× dense) | time (× dense) | topology changes |"


def earlier_report(out: Path) -> set[str]:
    """The files an earlier report wrote into `out`: its manifest's list, or for a report written before manifests
    (a report.md whose table header is the report's, and report.csv's if present), the report file names present."""
    try:
        names = json.loads((out / MANIFEST).read_text())
        if isinstance(names, list):
            return {n for n in names if n in REPORT_FILES}
    except (OSError, ValueError):
        pass
    try:  # the table's first line as every version wrote it, and the CSV's header if there is one
        head = (out / "report.md").read_text(errors="replace").partition("\n")[0]
        table = out / "report.csv"
        csv_head = table.read_text(errors="replace") if table.exists() else "method,sparsity,"
    except OSError:
        return set()
    legacy = head.startswith("| method | sparsity |") and LEGACY_HEADER in head and csv_head.startswith(
        "method,sparsity,")
    return {n for n in REPORT_FILES if (out / n).exists()} if legacy else set()


def write_report(
    runs: Sequence[Run], out: str | os.PathLike, plots: bool = True, left_out: Sequence[str] = ()
) -> dict[str, Any]:
    """Write report.md (naming the run folders `left_out`, with their reasons), report.csv and the figures into
    `out` atomically; return the JSON view."""
    if not runs:
        raise BidstError("no finished runs to report (a run is finished when it has summary.json)")
    extra, rows = summarize(runs)
    out = Path(out)
    make_folder(out)
    texts = {"report.md": markdown(extra, rows, left_out), "report.csv": to_csv(rows)}
    figs = figures(runs, extra) if plots else {}
    ours = earlier_report(out)
    foreign = [name for name in [*texts, *figs] if (out / name).exists() and name not in ours]
    if foreign:
        raise BidstError(f"{out / foreign[0]} exists and no earlier bidst report wrote it: give --out a new folder "
                         "(or one holding only a report)")
    staged: dict[str, str] = {}
    try:
        for name in [*texts, *figs, MANIFEST]:
            staged[name] = str(out / f".{name}.{os.getpid()}.tmp")
            if name in texts:
                Path(staged[name]).write_text(texts[name])
            elif name in figs:
                figs[name].savefig(staged[name], format="png", dpi=110)
            else:
                Path(staged[name]).write_text(json.dumps(sorted([*texts, *figs])) + "\n")
        for name, tmp in staged.items():
            os.replace(tmp, out / name)
        for name in ours - {*texts, *figs}:  # the earlier report's figures this one does not make
            (out / name).unlink(missing_ok=True)
    except OSError as exc:
        raise BidstError(f"could not write the report into {out}: {exc.strerror or exc}") from None
    finally:
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    return {"group_keys": ["method", "sparsity", *extra], "groups": rows,
            "runs": len(runs), "left_out": list(left_out), "files": sorted([*texts, *figs])}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `bidst report RUN_DIRS... [--out DIR] [--json] [--no-plots]`."""
    parser = argparse.ArgumentParser(prog="bidst report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders or sweep folders (searched recursively)")
    parser.add_argument("--out", default="report", help="output folder (default: ./report)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON on stdout")
    parser.add_argument("--no-plots", action="store_true", help="write only report.md and report.csv")
    args = parser.parse_intermixed_args(argv)  # folders may come before and after the options
    try:
        if not args.no_plots:
            _figure_class()  # fail before any work when matplotlib is missing
        left_out: list[str] = []
        result = write_report(find_runs(args.run_dirs, left_out), args.out, plots=not args.no_plots, left_out=left_out)
    except BidstError as e:
        print(f"bidst report: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print((Path(args.out) / "report.md").read_text(), end="")
        print(f"wrote {', '.join(result['files'])} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
