"""Every DST method, registered by name; importing this package registers them all."""

from . import bidst, gradual, mest, pai, rigl, set, simple, snfs  # noqa: F401  (registration)
from .base import METHODS, Method, create_method, list_methods, method_options, with_defaults

__all__ = ["METHODS", "Method", "create_method", "list_methods", "method_options", "with_defaults"]
