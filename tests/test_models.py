"""Every registered model builds for several input shapes, has the published size, registers layers in forward order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bidst.errors import BidstError
from bidst.models import create_model, list_models

SHAPES = [(1, 28, 10), (3, 32, 100)]  # (in_channels, image_size, num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_all_models() -> None:
    cifar = {"resnet20", "resnet32", "resnet32x2", "resnet56", "vgg19", "mobilenetv2"}
    expected = {"mlp", "cnn", "lenet5", "resnet34", "resnet50"} | cifar
    assert set(list_models()) == expected


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels,image_size,num_classes", SHAPES)
def test_forward_shape_and_layer_order(name: str, in_channels: int, image_size: int, num_classes: int) -> None:
    """Output is (B, classes); the DST engine takes the first and last Conv2d/Linear by registration order, so that
    order must match execution."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    registered = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    executed: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda m, _: executed.append(m)) for m in registered]
    out = model(torch.randn(2, in_channels, image_size, image_size))
    for h in hooks:
        h.remove()
    assert out.shape == (2, num_classes) and torch.isfinite(out).all()
    assert executed[0] is registered[0] and executed[-1] is registered[-1]
    assert isinstance(registered[-1], nn.Linear) and registered[-1].out_features == num_classes
    # within a residual block the shortcut projection may run before or after the body; every layer runs once
    assert sorted(map(id, executed)) == sorted(map(id, registered))


@pytest.mark.parametrize(
    "name,num_classes,expected,tolerance",
    [
        ("resnet20", 10, 0.27e6, 0.02),  # He et al. 2016, table 6
        ("resnet32", 10, 0.46e6, 0.02),
        ("resnet56", 10, 0.85e6, 0.02),
        ("resnet32x2", 10, 1_860_522, 0),  # GraSP's / MEST's resnet32 (32/64/128 channels, 1x1 projections)
        ("vgg19", 10, 20.04e6, 0.01),  # the CIFAR VGG-19-BN of the DST papers
        ("mobilenetv2", 10, 2.24e6, 0.01),
        ("resnet34", 1000, 21_797_672, 0),  # torchvision's exact counts
    ],
)
def test_parameter_counts(name: str, num_classes: int, expected: float, tolerance: float) -> None:
    model = create_model(name, num_classes=num_classes, in_channels=3, image_size=32)
    assert abs(n_params(model) - expected) <= tolerance * expected


def test_resnet50_imagenet() -> None:
    model = create_model("resnet50", num_classes=1000, in_channels=3, image_size=224).eval()
    assert n_params(model) == 25_557_032  # torchvision's exact count
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    model = create_model("resnet56", num_classes=10, in_channels=3, image_size=32)
    conv = model.stage3[0].body[3]  # a 64 -> 64 3x3 conv: fan_out = 64 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    bn = model.stage3[0].body[1]
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(BidstError, match="unknown model 'resnet18'.*resnet32"):
        create_model("resnet18", num_classes=10, in_channels=3, image_size=32)


def test_vgg19_averages_its_last_map_as_the_dst_codebases_do() -> None:
    """GraSP's and MEST's VGG-19 max-pool four times and average the last 2x2 map before the classifier."""
    torch.manual_seed(0)
    model = create_model("vgg19", num_classes=10, in_channels=3, image_size=32).eval()
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    with torch.no_grad():
        features = model.features(torch.randn(2, 3, 32, 32))
        assert features.shape == (2, 512, 2, 2)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), model.fc(model.features(x).mean((2, 3))))


@pytest.mark.parametrize("name", ["vgg19", "resnet32x2"])
def test_dst_codebase_models_draw_the_classifier_from_a_small_normal(name: str) -> None:
    """GraSP's and MEST's models draw Linear weights from N(0, 0.01^2) with zero bias."""
    torch.manual_seed(0)
    fc = create_model(name, num_classes=100, in_channels=3, image_size=32).fc
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.05) and torch.equal(fc.bias, torch.zeros(100))
