"""The `bidst` command line: train, list registries, sweep and report; user errors are one line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .errors import BidstError, SharedError
from .signals import RunInterrupted

if TYPE_CHECKING:
    from .config import TrainConfig

# flags for the most common config keys; each becomes a `key=value` override
COMMON_FLAGS = {
    "method": str, "sparsity": float, "epochs": int, "seed": int, "model": str, "dataset": str,
    "device": str, "precision": str, "lr": float, "batch_size": int, "data_root": str,
}


def _train(args: argparse.Namespace) -> int:
    from .config import load_config, yaml_value
    from .recipe import train

    overrides = list(args.overrides)
    for key in COMMON_FLAGS:
        value = getattr(args, key)
        if value is not None:  # written so that the override's YAML reads the flag's value back (data_root 2024)
            overrides.append(f"{key}={yaml_value(value)}")
    if args.no_progress:
        overrides.append("progress=false")
    config_path = args.config
    if args.resume and args.run_dir and config_path is None and (Path(args.run_dir) / "config.yaml").exists():
        config_path = str(Path(args.run_dir) / "config.yaml")
    try:  # under torchrun every process reads the same command line and files: rank 0 says what is wrong
        cfg = load_config(config_path, overrides)
    except BidstError as exc:
        raise SharedError.of(exc) from None
    if args.print_config:
        return _print_config(cfg)
    if args.resume and not args.run_dir:
        raise SharedError("--resume needs --run-dir, the folder of the run to continue")
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / (
        f"{cfg.dataset}-{cfg.model}-{cfg.method}-s{cfg.sparsity:g}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    summary = train(cfg, run_dir, resume=args.resume)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 alone reports
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"final test accuracy: {summary['final_test_acc']:.2f}%")
        print(f"measured sparsity:   {100 * summary['measured_sparsity']:.1f}%")
        print(f"run folder:          {run_dir}")
    return 0


def _print_config(cfg: TrainConfig) -> int:
    """Print the config a run would use as a YAML recipe, with the method's defaults filled in; train nothing.

    The config is checked first (`check_config`), so a bad value fails here as it would at the start of a run.
    """
    from .methods import create_method, method_options
    from .recipe import check_config

    check_config(cfg)
    method = create_method(cfg.method, **cfg.method_args)
    data = cfg.to_dict()
    data["distribution"] = cfg.distribution or method.default_distribution  # as the Sparsifier resolves it
    data["method_args"] = {key: getattr(method, key) for key in method_options(cfg.method)}
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip())
    return 0


def _method_options(name: str, as_json: bool) -> int:
    """Print method `name`'s options with their defaults, as commented YAML that pastes under `method_args:` (or JSON)."""
    from .methods.base import method_options, option_comments

    options = method_options(name)
    if as_json:
        print(json.dumps(options))
        return 0
    if not options:
        print(f"{name} has no options")
    comments = option_comments(name)
    for key, value in options.items():
        line = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]  # "key: value"
        print(f"{line}  # {comments[key]}" if key in comments else line)
    return 0


def _listing(kind: str, as_json: bool) -> int:
    """The registered names of `kind`, each with what it is in a line (JSON: the names only)."""
    from .data import dataset_info, list_datasets
    from .methods import METHODS, list_methods
    from .models import MODELS, list_models

    def summary(name: str) -> str:
        if kind == "datasets":
            info = dataset_info(name)
            return f"{info.num_classes} classes, {info.in_channels}x{info.image_size}x{info.image_size} images"
        doc = (METHODS if kind == "methods" else MODELS).get(name).__doc__ or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    items = {"methods": list_methods, "models": list_models, "datasets": list_datasets}[kind]()
    if as_json:
        print(json.dumps(items))
    else:
        width = max(map(len, items))
        print("\n".join(f"{name:<{width}}  {summary(name)}".rstrip() for name in items))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `bidst`."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="bidst", description="Dynamic sparse training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"bidst {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one run from a YAML recipe")
    train.add_argument("--config", help="recipe YAML (configs/...); defaults apply to missing keys")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sparsity=0.95")
    train.add_argument("--run-dir", help="run folder (default: runs/<dataset>-<model>-<method>-...)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (recipe, overrides, the method's defaults) as YAML and exit")
    for key, convert in COMMON_FLAGS.items():
        train.add_argument(f"--{key.replace('_', '-')}", dest=key, type=convert, help=f"same as {key}=VALUE")
    for kind in ("methods", "models", "datasets"):
        p = sub.add_parser(kind, help=f"list the registered {kind}, each with what it is")
        p.add_argument("--json", action="store_true", help="as JSON: the names (with a method name: its options and defaults)")
        if kind == "methods":
            p.add_argument("name", nargs="?", help="a method: list its options with their defaults instead")
    sub.add_parser("sweep", help="run a grid of runs from a sweep YAML (see `bidst sweep -h`)", add_help=False)
    sub.add_parser("report", help="tables and plots over run folders (see `bidst report -h`)", add_help=False)
    sub.add_parser("bench", help="time the sparse backend against dense (see `bidst bench -h`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code: 2 for user errors (one line), 128 + signal after SIGINT/SIGTERM, 141
    when stdout is a pipe whose reader went away."""
    try:
        code = _dispatch(argv)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback when Python flushes at exit
        return code
    except BrokenPipeError:  # the reader went away (`bidst methods bidst | head -1`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C in a command without its own handling (bench, report, a listing)
        print("bidst: interrupted", file=sys.stderr)
        return 130


PLUGINS_ENV = "BIDST_IMPORT"  # modules to import first: a user's methods, models and datasets register themselves


def import_plugins() -> None:
    """Import the modules named in $BIDST_IMPORT (comma-separated), so that what they register is known to every
    command, and to the runs a sweep starts (they inherit the variable)."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module.endswith(".py"):
            raise BidstError(f"{PLUGINS_ENV} names modules, not files: {module[:-3]!r}, not {module!r}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # (an error inside the module is the user's to see, with its traceback)
            if exc.name is None or not module.startswith(exc.name):
                raise
            raise BidstError(f"{PLUGINS_ENV}: no module named {module!r} on the Python path (PYTHONPATH)") from None


def _dispatch(argv: Sequence[str] | None) -> int:
    """Run the command `argv` names (default: the process's arguments); its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_plugins()
    except BidstError as exc:
        print(f"bidst: error: {exc}", file=sys.stderr)
        return 2
    if argv and argv[0] in ("sweep", "report", "bench"):  # their own parsers, errors and exit codes
        if argv[0] == "sweep":
            from .sweep import main as sub_main
        elif argv[0] == "bench":
            from .bench import main as sub_main
        else:
            from .report import main as sub_main
        return sub_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come on both sides of train's options, which argparse's positionals cannot span
    if args.command == "train" and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    rank = int(os.environ.get("RANK", "0"))
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "methods" and args.name:
            return _method_options(args.name, args.json)
        return _listing(args.command, args.json)
    except BidstError as exc:
        if rank == 0 or not isinstance(exc, SharedError):
            print(f"bidst: error{f' (rank {rank})' if rank else ''}: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        if rank == 0:
            print(f"bidst: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
