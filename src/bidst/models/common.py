"""What the architecture modules share: the model name registry, conv+BN building block and He initialisation."""

from __future__ import annotations

from torch import nn

from ..registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free 'same'-padded convolution followed by batch norm."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)]


def kaiming_init(model: nn.Module) -> nn.Module:
    """He et al. (2015) init as in the ResNet papers: kaiming-normal conv (fan-out) and linear (fan-in) weights,
    unit BN scales, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def small_init_classifier(model: nn.Module) -> nn.Module:
    """Re-draw the Linear layers' weights from N(0, 0.01^2) with zero biases, as GraSP's and MEST's CIFAR models do
    (the models those DST papers' tables come from)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
