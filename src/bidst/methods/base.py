"""The protocol every DST method implements, its registry, and the option handling they share."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch

from ..errors import BidstError
from ..registry import Registry

if TYPE_CHECKING:
    from ..engine import Sparsifier


@runtime_checkable
class Method(Protocol):
    """A DST method: it creates the initial masks and decides every topology change.

    The engine owns masks, weights and optimizer state; a method only chooses positions and
    calls `Sparsifier.change`, so the masking invariants hold for every method by construction.
    A method that reads weights only through `Sparsifier.weight`/`grad` (never `params`) may set
    `backends = ("masked", "sparse")` to allow the sparse backend; without it only "masked" is allowed.
    Three hooks are optional: `validate()`, called once its options are set, raises BidstError on bad
    ones; `loaded(sp)` is called once a Sparsifier's whole state is restored (its step may lie before the
    current one: a rollback); `stats()` returns numbers about the method's own decisions, which a recipe run writes to
    `summary.json` as `method_stats`. For FLOPs plans (`bidst.budget`), `planned_costs(sp, rows)` gives the
    method's own work by phase and `budget_changes(sp, steps)` the layer budgets over training where they
    change (None: they do not). `check_loss_scaling()` raises BidstError if the method cannot work with a
    scaled loss (a GradScaler). `sampled_positions(step, sp)` names per layer the flat positions whose gradient
    step `step`'s backward gathers into `sp.sampled_grads`; it may be called more than once for a step (again after
    `load_state_dict`), so it must follow from the method's state, with any random draw made in `update`.
    A layer's budget changes only if the method says so (`moves_budgets` true, or `budget_changes`); otherwise
    every change must grow as many weights as it drops, or the step raises. Randomness comes from `sp.rng`.
    """

    name: ClassVar[str]
    default_distribution: ClassVar[str]

    def setup(self, sp: Sparsifier) -> None:
        """Create the initial masks and budgets (called once, before training)."""

    def wants_dense_grad(self, step: int, sp: Sparsifier) -> bool:
        """Whether optimizer step `step` (1-based) needs the dense gradient of inactive weights."""

    def update(self, sp: Sparsifier, step: int, dense_grads: dict[str, torch.Tensor] | None) -> bool:
        """Run the method's work after optimizer step `step`; return True if the topology changed."""

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers the method needs to resume exactly."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


METHODS: Registry[Method] = Registry("method")


def list_methods() -> list[str]:
    """Names of every registered DST method."""
    return METHODS.names()


def method_options(name: str) -> dict[str, Any]:
    """The options of method `name` with their defaults (the fields of its dataclass)."""
    cls = METHODS.get(name)
    if not dataclasses.is_dataclass(cls):
        raise BidstError(f"method {name!r} is not a dataclass: declare it with @dataclass, its fields being its "
                         "options (the Method protocol in bidst.methods.base)")
    return {f.name: f.default for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config (a dict) with its method's and its match_flops method's options and the method's default
    distribution written out, so that an option left out and the same option given at its default read alike (a
    method this process does not know is taken as written)."""
    config = dict(config)
    for key, method_key in (("method_args", "method"), ("match_flops_args", "match_flops")):
        name = config.get(method_key)
        if isinstance(name, str) and name in METHODS and isinstance(config.get(key) or {}, dict):
            config[key] = {**method_options(name), **(config.get(key) or {})}
    method = config.get("method")
    if config.get("distribution") is None and isinstance(method, str) and method in METHODS:
        config["distribution"] = METHODS.get(method).default_distribution
    return config


def option_comments(name: str) -> dict[str, str]:
    """What each option of method `name` means: the comment beside its field in the source (none where absent)."""
    options, comments = method_options(name), {}
    for cls in reversed(METHODS.get(name).__mro__):  # subclasses' comments win, as their defaults do
        try:
            lines = inspect.getsourcelines(cls)[0]
        except (OSError, TypeError):  # builtins, or source not shipped
            continue
        for line in lines:
            found = re.match(r"\s+(\w+)\s*:[^#]*=[^#]*#\s*(.+)$", line)
            if found and found.group(1) in options:
                comments[found.group(1)] = found.group(2).strip()
    return comments


def _option_value(method: str, key: str, default: Any, value: Any) -> Any:
    """`value` as the type of the option's default: an integral float (1e2) becomes an int, an int a float."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if number and float(value).is_integer():
            return int(value)
    elif isinstance(default, float):
        if number:
            return float(value)
    elif not isinstance(default, str) or isinstance(value, str):
        return value
    raise BidstError(f"option {key!r} of method {method!r} must be like {default!r}, got {value!r}")


def create_method(name: str, **options: Any) -> Method:
    """Build method `name` with `options`; unknown options raise BidstError listing the valid ones."""
    cls = METHODS.get(name)
    valid = method_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise BidstError(
            f"unknown option(s) {', '.join(unknown)} for method {name!r}; "
            f"options: {', '.join(sorted(valid)) or '(none)'}"
        )
    options = {key: _option_value(name, key, valid[key], value) for key, value in options.items()}
    method = cls(**options)
    check = getattr(method, "validate", None)
    if check is not None:
        check()
    return method


class Stateless:
    """Mixin for methods whose only state is their (config) fields and the engine's."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def require_choice(method: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise BidstError unless option `key` of `method` is one of `choices`."""
    if value not in choices:
        raise BidstError(f"option {key!r} of method {method!r} must be one of {', '.join(choices)}, got {value!r}")


def require_range(method: str, key: str, value: float, lo: float, hi: float, *, above_lo: bool = False) -> None:
    """Raise BidstError unless lo <= value <= hi (lo < value with `above_lo`) and value is finite (an infinite rate
    or interval is never meant: hi = inf only means no upper bound)."""
    if not (lo < value if above_lo else lo <= value) or not value <= hi or not math.isfinite(value):
        raise BidstError(f"option {key!r} of method {method!r} must be in {'(' if above_lo else '['}{lo}, {hi}"
                         f"{')' if math.isinf(hi) else ']'}, got {value}")
