"""ResNets of He et al. (2016): CIFAR resnet20/32/56 and ImageNet resnet34/50 (torchvision-equivalent)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn

from .common import MODELS, conv_bn, kaiming_init, small_init_classifier


class Residual(nn.Module):
    """relu(body(x) + shortcut(x)); the shortcut is the identity, or 1x1 conv + BN (option B) if the shape changes."""

    def __init__(self, body: list[nn.Module], in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)
        self.shortcut = (
            nn.Identity() if stride == 1 and in_ch == out_ch else nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride))
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def basic_block(in_ch: int, width: int, stride: int) -> Residual:
    """Two 3x3 convolutions (output channels = width)."""
    body = [*conv_bn(in_ch, width, 3, stride), nn.ReLU(inplace=True), *conv_bn(width, width, 3)]
    return Residual(body, in_ch, width, stride)


def bottleneck(in_ch: int, width: int, stride: int) -> Residual:
    """1x1 reduce, 3x3 carrying the stride (torchvision's ResNet v1.5), 1x1 expand to 4*width."""
    body = [
        *conv_bn(in_ch, width, 1), nn.ReLU(inplace=True),
        *conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
        *conv_bn(width, 4 * width, 1),
    ]  # fmt: skip
    return Residual(body, in_ch, 4 * width, stride)


def resnet(
    stem: list[nn.Module],
    stem_ch: int,
    block: Callable[[int, int, int], Residual],
    expansion: int,
    depths: list[int],
    num_classes: int,
) -> nn.Module:
    """Stem, stages of blocks doubling the width (stride 2 from stage 2 on), global average pool, linear classifier."""
    parts: OrderedDict[str, nn.Module] = OrderedDict(stem=nn.Sequential(*stem))
    in_ch = stem_ch
    for stage, depth in enumerate(depths):
        width = stem_ch * 2**stage
        blocks = []
        for i in range(depth):
            blocks.append(block(in_ch, width, 2 if stage > 0 and i == 0 else 1))
            in_ch = width * expansion
        parts[f"stage{stage + 1}"] = nn.Sequential(*blocks)
    parts.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(in_ch, num_classes))
    return kaiming_init(nn.Sequential(parts))


def cifar_resnet(depth: int, num_classes: int, in_channels: int, width: int = 16) -> nn.Module:
    """The 6n+2-layer CIFAR ResNet: a 3x3 stem and three stages of n basic blocks with width/2x/4x channels."""
    stem = [*conv_bn(in_channels, width, 3), nn.ReLU(inplace=True)]
    return resnet(stem, width, basic_block, 1, [(depth - 2) // 6] * 3, num_classes)


def imagenet_resnet(
    block: Callable[[int, int, int], Residual], expansion: int, num_classes: int, in_channels: int
) -> nn.Module:
    """The ImageNet ResNet with [3, 4, 6, 3] blocks: a 7x7 stride-2 stem with max-pooling, widths 64..512."""
    stem = [*conv_bn(in_channels, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, padding=1)]
    return resnet(stem, 64, block, expansion, [3, 4, 6, 3], num_classes)


@MODELS.register("resnet20")
def resnet20(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-20 (0.27M parameters)."""
    return cifar_resnet(20, num_classes, in_channels)


@MODELS.register("resnet32")
def resnet32(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-32 (0.47M parameters)."""
    return cifar_resnet(32, num_classes, in_channels)


@MODELS.register("resnet32x2")
def resnet32x2(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-32 at twice the width, 32/64/128 channels (1.86M parameters), as in GraSP's and MEST's code.

    It is the "ResNet-32" whose CIFAR tables the DST papers (BiDST's included) report."""
    return small_init_classifier(cifar_resnet(32, num_classes, in_channels, width=32))


@MODELS.register("resnet56")
def resnet56(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-56 (0.86M parameters)."""
    return cifar_resnet(56, num_classes, in_channels)


@MODELS.register("resnet34")
def resnet34(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """ImageNet ResNet-34 (21.8M parameters)."""
    return imagenet_resnet(basic_block, 1, num_classes, in_channels)


@MODELS.register("resnet50")
def resnet50(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """ImageNet ResNet-50 v1.5 (25.6M parameters)."""
    return imagenet_resnet(bottleneck, 4, num_classes, in_channels)
