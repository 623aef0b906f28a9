"""MobileNetV2 (Sandler et al. 2018) in its common CIFAR form: stride 1 in the stem and in the 24-channel stage."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .common import MODELS, conv_bn, kaiming_init

# (expansion t, output channels c, blocks n, first stride s); the ImageNet net has s=2 in the stem and the c=24 stage
CIFAR_STAGES = [
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]  # fmt: skip


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise conv, linear 1x1 projection; residual when the shape is kept."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        expand = [*conv_bn(in_ch, hidden, 1), nn.ReLU6(inplace=True)] if expansion != 1 else []
        self.body = nn.Sequential(
            *expand,
            *conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
            *conv_bn(hidden, out_ch, 1),
        )  # fmt: skip
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


@MODELS.register("mobilenetv2")
def mobilenetv2(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR MobileNetV2 (2.2M parameters at 10 classes)."""
    blocks: list[nn.Module] = []
    in_ch = 32
    for expansion, out_ch, n, stride in CIFAR_STAGES:
        for i in range(n):
            blocks.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expansion))
            in_ch = out_ch
    parts = OrderedDict(
        stem=nn.Sequential(*conv_bn(in_channels, 32, 3), nn.ReLU6(inplace=True)),
        blocks=nn.Sequential(*blocks),
        head=nn.Sequential(*conv_bn(in_ch, 1280, 1), nn.ReLU6(inplace=True)),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(1280, num_classes),
    )
    return kaiming_init(nn.Sequential(parts))
