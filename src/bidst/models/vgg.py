"""CIFAR VGG-19 with batch norm as GraSP's and MEST's code build it: conv stack, global pooling, one classifier."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .common import MODELS, conv_bn, kaiming_init, small_init_classifier

# channels per 3x3 conv, "M" = 2x2 max-pool (ceil mode, so 28x28 inputs end at 2x2 too); no fifth pool: the last
# 2x2 map is averaged, as in GraSP's and MEST's VGG-19
VGG19: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
]  # fmt: skip


@MODELS.register("vgg19")
def vgg19(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR VGG-19-BN (20.0M parameters at 10 classes)."""
    layers: list[nn.Module] = []
    in_ch = in_channels
    for item in VGG19:
        if isinstance(item, str):
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [*conv_bn(in_ch, item, 3), nn.ReLU(inplace=True)]
            in_ch = item
    parts = OrderedDict(
        features=nn.Sequential(*layers),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(in_ch, num_classes),
    )
    return small_init_classifier(kaiming_init(nn.Sequential(parts)))
