"""Training configs: a typed dataclass read from YAML recipes plus dotted `key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import BidstError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading exponent floats without a dot (1e-3, 5E4) as numbers, as YAML 1.2 does:
    PyYAML follows YAML 1.1, where `lr: 1e-3` is the string '1e-3'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (recipes, overrides, sweep files, saved configs), exponent floats included."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


# keys that change how a run executes (progress, logging, checkpoints, threads, loader workers), not what it computes
OPERATIONAL_KEYS = frozenset({"progress", "threads", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; every field is a recipe key."""

    # what to train
    model: str = "cnn"  # see `bidst models`
    dataset: str = "fashion-mnist"  # see `bidst datasets`
    data_root: str | None = None  # None: the dataset's default places (BIDST_DATA, system, cache)
    val_size: int = 5000  # validation images carved out of the training set (for choosing defaults)
    augment: bool = False  # the dataset's standard augmentation
    train_subset: int = 0  # train on the first N training items only (quick runs); 0: all
    holdout_size: int = 0  # training items the weights never see, for BiDST's upper_data: holdout; 0: none
    holdout_batch: int = 0  # items per held-out batch (the global batch, like batch_size); 0: batch_size
    # how to sparsify it
    method: str = "rigl"  # see `bidst methods`
    sparsity: float = 0.9  # fraction of zero weights over the sparsified layers
    distribution: str | None = None  # uniform | er | erk; None: the method's default
    dense_first: bool = False  # keep the first Conv/Linear layer dense
    dense_last: bool = False  # keep the classifier dense
    method_args: dict[str, Any] = field(default_factory=dict)  # the method's own options
    backend: str = "masked"  # masked (dense weights x masks) | sparse (bidst.sparse kernels)
    match_flops: str = ""  # a method (e.g. rigl): shorten this run to that method's training FLOPs; "": off
    match_flops_args: dict[str, Any] = field(default_factory=dict)  # that method's options (its recipe's method_args)
    # how to optimise
    epochs: int = 3  # passes over the training set (match_flops may stop earlier)
    batch_size: int = 128  # the global batch (split over DDP processes)
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05  # peak learning rate (after warm-up)
    momentum: float = 0.9  # SGD momentum (Adam's beta1 stays at its default)
    nesterov: bool = False  # Nesterov momentum (SGD)
    weight_decay: float = 5e-4  # L2 (SGD, Adam) or decoupled (AdamW) weight decay
    lr_schedule: str = "cosine"  # cosine | step | constant, a function of the step
    warmup_epochs: float = 0.0  # linear warm-up
    label_smoothing: float = 0.0  # of the cross-entropy targets
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (the last checkpoint stays intact) | skip the step
    # where and how to run
    seed: int = 0  # model init, data order and mask decisions
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (torch.amp)
    threads: int = 0  # torch and Numba CPU threads; 0: their defaults (all cores)
    num_workers: int = 0  # data-loading worker processes
    log_every: int = 50  # steps between step lines in metrics.jsonl
    iou_interval: int = 5  # epochs between the mask snapshots whose IoU is logged (BiDST's Figure 4)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends only
    keep_checkpoints: int = 2  # how many recent checkpoints to keep; 0: all
    progress: bool = True  # tqdm bars on stderr

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (YAML/JSON ready)."""
        return dataclasses.asdict(self)


CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "lr_schedule": ("cosine", "step", "constant"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "on_nonfinite": ("stop", "skip"),
    "backend": ("masked", "sparse"),
}


# numeric keys' ranges, checked before anything runs (PyTorch's own errors for these come as tracebacks, late)
AT_LEAST_ZERO = {"val_size", "train_subset", "holdout_size", "holdout_batch", "lr", "momentum", "weight_decay",
                 "warmup_epochs", "threads", "num_workers", "checkpoint_every", "keep_checkpoints"}  # fmt: skip
POSITIVE = {"epochs", "batch_size", "log_every", "iou_interval"}


NESTED = ("method_args", "match_flops_args")  # the mapping keys, which take dotted overrides


def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Check `value` against the type of field `key`, converting ints to floats where a float is due."""
    default = _fields()[key].default
    kind = type(default) if default is not dataclasses.MISSING else dict
    if key in ("data_root", "distribution"):
        if value is None or isinstance(value, str):
            return value
        raise BidstError(f"config key {key!r} must be a string or null, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, kind):
        # option names as text: a YAML key such as 1 is then an unknown option, as the override method_args.1= is
        return {str(k): v for k, v in value.items()} if kind is dict else value
    noun = {bool: "true or false", float: "a number", int: "an integer", str: "a string", dict: "a mapping"}.get(kind, kind.__name__)
    raise BidstError(f"config key {key!r} must be {noun}, got {value!r}")


def _check_key(key: str) -> None:
    if key not in _fields():
        close = difflib.get_close_matches(key, list(_fields()), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BidstError(f"unknown config key {key!r}{hint}")


def yaml_value(value: Any) -> str:
    """`value` written so that a YAML reader of a ``key=value`` override gets it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):  # plain where YAML reads it back as it is ("2024", "a #1", "x: y" need quotes)
        try:
            plain = load_yaml(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else yaml.safe_dump(value, default_style='"', width=2**31, allow_unicode=True).rstrip("\n")
    return json.dumps(value)


def parse_override(text: str) -> tuple[str, Any]:
    """Split `key=value` and parse the value as YAML (so 0.9, true, null and [1, 2] work)."""
    if "=" not in text:
        hint = f" (a recipe file goes after --config: --config {text})" if text.endswith((".yaml", ".yml")) else ""
        raise BidstError(f"override {text!r} is not of the form key=value{hint}")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Apply dotted overrides (`method_args.drop_fraction=0.5`) to a nested dict, returning a copy."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in overrides:
        head, _, rest = key.partition(".")
        if rest:
            if head not in NESTED:
                raise BidstError(f"config key {key!r}: only {' and '.join(NESTED)} have sub-keys")
            if not isinstance(out.setdefault(head, {}), dict):
                raise BidstError(f"config key {head!r} must be a mapping, got {out[head]!r}")
            out[head][rest] = value
        else:
            out[head] = value
    return out


def build_config(data: dict[str, Any]) -> TrainConfig:
    """Validate a dict of recipe keys into a TrainConfig; a misspelled key or bad value is a BidstError."""
    if not isinstance(data, dict):
        raise BidstError("a recipe must be a YAML mapping of config keys")
    values = {}
    for key, value in data.items():
        _check_key(str(key))
        values[key] = _coerce(key, value)
    for key, choices in CHOICES.items():
        if key in values and values[key] not in choices:
            raise BidstError(f"config key {key!r} must be one of {', '.join(choices)}, got {values[key]!r}")
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise BidstError(f"config key {key!r} must be a finite number, got {value}")
        if key in AT_LEAST_ZERO and value < 0:
            raise BidstError(f"config key {key!r} must be >= 0, got {value}")
        if key in POSITIVE and value <= 0:
            raise BidstError(f"config key {key!r} must be positive, got {value}")
    if not 0.0 <= values.get("label_smoothing", 0.0) <= 1.0:
        raise BidstError(f"config key 'label_smoothing' must be in [0, 1], got {values['label_smoothing']}")
    return TrainConfig(**values)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read recipe `path` (or the defaults when None) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = load_yaml(path.read_text()) or {}
        except FileNotFoundError:
            raise BidstError(f"recipe {path} does not exist") from None
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:  # UnicodeDecodeError: not a text file
            raise BidstError(f"cannot read recipe {path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise BidstError(f"recipe {path} must be a YAML mapping of config keys")
    return build_config(apply_overrides(data, [parse_override(o) for o in overrides]))
