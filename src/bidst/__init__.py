"""bidst: dynamic sparse training for PyTorch, with BiDST and every standard baseline on one engine."""

from .density import layer_densities
from .engine import LayerReport, Sparsifier, sparsify
from .errors import BidstError
from .methods import Method, create_method, list_methods, method_options

__all__ = [
    "BidstError",
    "LayerReport",
    "Method",
    "Sparsifier",
    "create_method",
    "layer_densities",
    "list_methods",
    "method_options",
    "sparsify",
]
__version__ = "0.1.0"
