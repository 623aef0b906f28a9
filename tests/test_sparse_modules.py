"""Sparse layers: equivalence with masked dense modules, training, topology updates, checkpoints."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from conftest import TinyNet, make_data
from torch import nn

from bidst.sparse import (
    SparseConv2d,
    SparseLinear,
    _common,
    remap_optimizer_state,
    to_dense_modules,
    to_sparse_modules,
)


def random_masks(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Masks with exactly round(density * numel) random active weights for every Linear / Conv2d."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            flat = torch.zeros(m.weight.numel(), dtype=torch.bool)
            flat[torch.randperm(flat.numel(), generator=gen)[: round(density * flat.numel())]] = True
            masks[f"{name}.weight"] = flat.reshape(m.weight.shape)
    return masks


def masked_dense_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            dense.get_submodule(name.rpartition(".")[0]).weight.mul_(mask)
    return dense


def test_from_dense_layers_match_their_masked_dense_modules():
    gen = torch.Generator().manual_seed(0)
    cases = [
        (nn.Linear(9, 7), torch.randn(4, 9, generator=gen)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(2, 4, 9, 9, generator=gen)),
        (nn.Conv2d(5, 5, 3, padding="same", groups=5, bias=False), torch.randn(2, 5, 7, 7, generator=gen)),
        (nn.Conv2d(3, 4, 3, dilation=2), torch.randn(2, 3, 9, 9, generator=gen)),
    ]
    for dense, x in cases:
        mask = torch.rand(dense.weight.shape, generator=gen) < 0.2
        sparse = SparseLinear.from_dense(dense, mask) if isinstance(dense, nn.Linear) else SparseConv2d.from_dense(dense, mask)
        with torch.no_grad():
            dense.weight.mul_(mask)
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sparse.dense_weight(), dense.weight)
        assert torch.equal(sparse.mask(), mask)
        back = sparse.to_dense_module()
        torch.testing.assert_close(back(x), dense(x), rtol=1e-4, atol=1e-5)
        assert "density" in repr(sparse)


def test_sparse_training_equals_masked_dense_training():
    """SGD with momentum on the compact values follows masked dense training step for step."""
    torch.manual_seed(0)
    model = TinyNet()
    masks = random_masks(model, 0.2, seed=1)
    dense = masked_dense_copy(model, masks)
    sparse = copy.deepcopy(model)
    to_sparse_modules(sparse, masks)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9)
    x, y = make_data(64)
    for _ in range(4):
        for net, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            if net is dense:
                for name, mask in masks.items():
                    dense.get_submodule(name.rpartition(".")[0]).weight.grad.mul_(mask)
            opt.step()
    for name in masks:
        mod = name.rpartition(".")[0]
        torch.testing.assert_close(sparse.get_submodule(mod).dense_weight(), dense.get_submodule(mod).weight, rtol=1e-4, atol=1e-5)
    to_dense_modules(sparse)
    assert all(type(m) in (nn.Linear, nn.Conv2d) for n, m in sparse.named_children() if n in ("conv1", "fc2"))
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)


def test_update_topology_remaps_values_grad_and_optimizer_state():
    gen = torch.Generator().manual_seed(2)
    layer = SparseLinear.from_dense(nn.Linear(6, 5), torch.rand(5, 6, generator=gen) < 0.2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 6, generator=gen)).sum().backward()
    opt.step()
    before = layer.dense_weight().reshape(-1).clone()
    exp_avg = layer.structure.to_dense(opt.state[layer.values]["exp_avg"]).reshape(-1).clone()
    active = torch.from_numpy(layer.structure.flat)
    inactive = (~layer.mask()).reshape(-1).nonzero().reshape(-1)
    drop, grow = active[:2], inactive[:3]
    delta = layer.update_topology(drop, grow, grown_values=torch.tensor([1.0, 2.0, 3.0]))
    remap_optimizer_state(opt, layer.values, delta)
    after = layer.dense_weight().reshape(-1)
    expected = before.clone()
    expected[drop] = 0
    expected[grow] = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(after, expected)
    assert layer.values.grad.shape == layer.values.shape
    new_avg = layer.structure.to_dense(opt.state[layer.values]["exp_avg"]).reshape(-1)
    exp_avg[drop] = 0
    assert torch.equal(new_avg, exp_avg)
    assert opt.state[layer.values]["step"].dim() == 0
    layer(torch.randn(3, 6, generator=gen)).sum().backward()
    opt.step()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_resized_values_train_while_an_old_graph_is_alive(kind):
    """A loss kept from before a size-changing topology change (as a loop that logs it later does) must not
    make the next backward expect the old size; the values stay the same Parameter, in the optimizer."""
    gen = torch.Generator().manual_seed(4)
    dense, x = ((nn.Linear(6, 5), torch.randn(3, 6, generator=gen)) if kind == "linear"
                else (nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 5, 5, generator=gen)))
    layer = (SparseLinear if kind == "linear" else SparseConv2d).from_dense(dense, torch.rand(dense.weight.shape, generator=gen) < 0.5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    values = layer.values
    kept = layer(x).square().sum()  # its graph holds the values' gradient accumulator
    kept.backward()
    opt.step()
    delta = layer.update_topology(torch.from_numpy(layer.structure.flat)[:3], torch.zeros(0, dtype=torch.long))
    remap_optimizer_state(opt, layer.values, delta)
    opt.zero_grad()
    layer(x).square().sum().backward()
    assert layer.values is values and layer.values.grad.shape == (layer.structure.nnz,)
    assert opt.param_groups[0]["params"][0] is values and opt.state[values]["momentum_buffer"].shape == values.shape
    opt.step()
    del kept
    watcher = weakref.ref(values)  # a weak reference (as torch.compile holds) rules the swap out: data is set instead
    delta = layer.update_topology(torch.from_numpy(layer.structure.flat)[:2], torch.zeros(0, dtype=torch.long))
    remap_optimizer_state(opt, layer.values, delta)
    assert watcher() is layer.values and layer.values.shape == (layer.structure.nnz,)
    layer(x).square().sum().backward()
    assert layer.values.grad.shape == layer.values.shape


def test_state_dict_carries_the_topology():
    torch.manual_seed(3)
    model = TinyNet()
    masks = random_masks(model, 0.2, seed=3)
    a = copy.deepcopy(model)
    layers = to_sparse_modules(a, masks)
    fc1 = layers["fc1.weight"]
    active = torch.from_numpy(fc1.structure.flat)
    inactive = (~fc1.mask()).reshape(-1).nonzero().reshape(-1)
    fc1.update_topology(active[:10], inactive[:4])
    b = copy.deepcopy(model)
    to_sparse_modules(b, masks)
    b.load_state_dict(a.state_dict())
    x, _ = make_data(8)
    assert torch.equal(b.fc1.mask(), a.fc1.mask())
    torch.testing.assert_close(b(x), a(x))
    with pytest.raises(RuntimeError, match="active_positions"):
        b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.endswith("active_positions")})


def test_swapping_rejects_what_it_cannot_make_sparse():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="BatchNorm1d"):
        to_sparse_modules(model, {"1.weight": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="weight"):
        to_sparse_modules(model, {"0.bias": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), torch.ones(2, 2, 3, 3, dtype=torch.bool))


def test_the_layers_above_run_on_the_kernels():
    """The densities used in this file stay below DENSE_ABOVE, so the tests above exercise the kernels."""
    model = TinyNet()
    for seed in (1, 3):
        for name, mask in random_masks(model, 0.2, seed).items():
            assert mask.float().mean() <= _common.DENSE_ABOVE, name


def test_a_layer_first_run_under_inference_mode_still_trains():
    # density 0.5 takes the masked dense path, whose cached index tensor is first made here under inference mode
    torch.manual_seed(0)
    mask = torch.zeros(24, dtype=torch.bool)
    mask[::2] = True
    layer = SparseLinear.from_dense(nn.Linear(6, 4), mask.view(4, 6))
    layer.update_topology(torch.tensor([0, 2]), torch.tensor([1, 3]))  # a new structure, no index tensor made yet
    x = torch.randn(3, 6)
    with torch.inference_mode():
        expected = layer(x)
    out = layer(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape


def test_reading_a_sparse_layers_weight_says_what_it_has_instead():
    layer = SparseLinear.from_dense(nn.Linear(6, 4), torch.rand(4, 6) < 0.5)
    with pytest.raises(AttributeError, match="no dense 'weight': backend 'sparse' trains `values`"):
        layer.weight  # noqa: B018  (user code that reads .weight, e.g. F.linear(x, layer.weight))
    assert getattr(layer, "weight", None) is None and layer.values is layer._parameters["values"]
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        layer.nothing  # noqa: B018
