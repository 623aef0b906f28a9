"""Model registry: `list_models()` and `create_model(name, num_classes=, in_channels=, image_size=)`, timm style."""

from __future__ import annotations

from torch import nn

from . import mobilenet, resnet, small, vgg  # noqa: F401  (modules register their models on import)
from .common import MODELS

__all__ = ["create_model", "list_models"]


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.names()


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The named model for in_channels x image_size x image_size inputs; an unknown name raises BidstError."""
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
