"""Small models for 28x28-class inputs: an MLP, the default Fashion-MNIST CNN and LeNet-5."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .common import MODELS, kaiming_init


def conv_pool(in_ch: int, out_ch: int, kernel: int, padding: int) -> nn.Sequential:
    """Convolution, ReLU, 2x2 max-pooling."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=padding), nn.ReLU(inplace=True), nn.MaxPool2d(2))


def classifier(widths: list[int]) -> OrderedDict[str, nn.Module]:
    """Flatten, then linear layers fc1..fcN through `widths` with ReLU between them."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        layers[f"fc{i}"] = nn.Linear(n_in, n_out)
        if i < len(widths) - 1:
            layers[f"relu{i}"] = nn.ReLU(inplace=True)
    return layers


@MODELS.register("mlp")
def mlp(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A 300-100 ReLU perceptron (LeNet-300-100, as in the pruning and DST papers)."""
    return kaiming_init(nn.Sequential(classifier([in_channels * image_size**2, 300, 100, num_classes])))


def conv_net(convs: list[nn.Sequential], features: int, widths: list[int]) -> nn.Module:
    """conv1..convN, then the classifier from `features` flattened values through `widths`."""
    layers: OrderedDict[str, nn.Module] = OrderedDict((f"conv{i}", conv) for i, conv in enumerate(convs, start=1))
    layers.update(classifier([features, *widths]))
    return kaiming_init(nn.Sequential(layers))


@MODELS.register("cnn")
def cnn(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The cheap default CNN: two 3x3 conv + max-pool stages (32, 64 channels) and a 256-unit hidden layer."""
    convs = [conv_pool(in_channels, 32, 3, padding=1), conv_pool(32, 64, 3, padding=1)]
    return conv_net(convs, 64 * (image_size // 4) ** 2, [256, num_classes])


@MODELS.register("lenet5")
def lenet5(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """LeNet-5 (6 and 16 5x5 conv channels, 120-84 hidden units) with ReLU and max-pooling."""
    convs = [conv_pool(in_channels, 6, 5, padding=2), conv_pool(6, 16, 5, padding=0)]
    return conv_net(convs, 16 * ((image_size // 2 - 4) // 2) ** 2, [120, 84, num_classes])
