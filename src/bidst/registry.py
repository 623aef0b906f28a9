"""A tiny name -> factory registry (timm style) whose unknown-name error lists the known names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import BidstError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; `kind` names what is registered, for error messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator that registers a factory under `name`."""

        def wrap(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return wrap

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., T]:
        """The factory for `name`; an unknown name raises BidstError listing the known ones."""
        try:
            return self._items[name]
        except KeyError:
            raise BidstError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items
