"""The sparse backend trains exactly like the masked one: same masks, weights and optimizer state, for every method.

Tolerance: weights, biases, outputs and gradients agree to rtol 1e-4, atol 1e-5 (float32 sums in a
different order); masks and budgets agree exactly.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import OPTIMIZERS, TinyNet, fast_options, make_data
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import bidst
from bidst.backend import supports
from bidst.methods import METHODS
from bidst.methods.common import magnitude_drop
from bidst.methods.rigl import RigL
from bidst.scores import drop_lowest
from bidst.sparse import SparseConv2d, SparseLinear
from bidst.sparse.layout import BatchInnermostLinear

SPARSE_METHODS = [m for m in bidst.list_methods() if supports(METHODS.get(m), "sparse")]
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs on one torch thread."""


def build(backend: str, method: str, opt_name: str, steps: int, model_fn=TinyNet, sparsity: float = 0.8, **options):
    """A seeded model, optimizer and Sparsifier on `backend`."""
    torch.manual_seed(0)
    model = model_fn()
    opt = OPTIMIZERS[opt_name](model.parameters())
    x, y = make_data(64)
    sp = bidst.sparsify(model, opt, method, sparsity, total_steps=steps, seed=0, init_batch=(x[:32], y[:32]),
                        backend=backend, **{**fast_options(method), **options})
    return model, opt, sp


def dense_states(sp, opt, name: str) -> list[torch.Tensor]:
    """Per-weight optimizer state of layer `name` as dense tensors (zeros at inactive positions)."""
    param, layer = sp.params[name], sp.sparse_layers.get(name)
    values = [v for v in opt.state.get(param, {}).values() if torch.is_tensor(v) and v.shape == param.shape]
    return values if layer is None else [layer.structure.to_dense(v) for v in values]


def biases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if n.endswith("bias")}


@pytest.mark.parametrize(
    "method,opt_name", [(m, "sgd") for m in SPARSE_METHODS] + [("rigl", "adam"), ("mest", "adamw")]
)
def test_sparse_backend_follows_masked_step_for_step(method, opt_name):
    steps = 12
    runs = [build(b, method, opt_name, steps) for b in ("masked", "sparse")]
    (dm, dopt, dsp), (sm, sopt, ssp) = runs
    assert set(ssp.sparse_layers) == {n for n in ssp.sparse_names() if ssp.target_densities[n] < 1.0}
    x, y = make_data(256)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        outs = []
        for model, opt, sp in runs:
            opt.zero_grad()
            out = model(x[idx])
            nn.functional.cross_entropy(out, y[idx]).backward()
            outs.append(out.detach())
            sp.step()
        torch.testing.assert_close(outs[1], outs[0], **TOL)
        assert dsp.budgets == ssp.budgets
        for name in dsp.masks:
            assert torch.equal(dsp.masks[name], ssp.masks[name]), name
            torch.testing.assert_close(ssp.weight(name), dsp.weight(name), **TOL)
            for a, b in zip(dense_states(dsp, dopt, name), dense_states(ssp, sopt, name), strict=True):
                torch.testing.assert_close(b, a, **TOL)
        for name, bias in biases(dm).items():
            torch.testing.assert_close(biases(sm)[name], bias, **TOL)
    assert ssp.topology_changes == dsp.topology_changes
    for name, layer in ssp.sparse_layers.items():  # parameter and optimizer memory follow the active count
        assert layer.values.numel() == ssp.budgets[name]
        assert all(v.numel() == ssp.budgets[name] for v in sopt.state[layer.values].values() if v.dim())
    assert (ssp.rebuild_seconds > 0) == (ssp.topology_changes > 0) and dsp.rebuild_seconds == 0


class Net(nn.Module):
    """A random Conv2d + Linear net for the property test."""

    def __init__(self, cout: int, k: int, stride: int, groups: int, hidden: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * groups, cout * groups, k, stride=stride, padding=k // 2, groups=groups)
        out = (size + 2 * (k // 2) - k) // stride + 1
        self.fc1 = nn.Linear(cout * groups * out * out, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cout=st.integers(1, 6), k=st.sampled_from([1, 3]), stride=st.integers(1, 2), groups=st.integers(1, 2),
    hidden=st.integers(3, 20), sparsity=st.floats(0.5, 0.97), method=st.sampled_from(["rigl", "set", "snfs"]),
)
def test_random_shapes_outputs_and_gradients_match_around_topology_changes(cout, k, stride, groups, hidden, sparsity,
                                                                          method):
    size = 6
    x = torch.randn(8, 2 * groups, size, size, generator=torch.Generator().manual_seed(cout))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(k))
    runs = [build(b, method, "sgd", 9, lambda: Net(cout, k, stride, groups, hidden, size), sparsity, interval=3)
            for b in ("masked", "sparse")]
    for _ in range(9):
        results = []
        for model, opt, sp in runs:
            opt.zero_grad()
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            nn.functional.cross_entropy(out, y).backward()
            results.append((out.detach(), xi.grad, {n: sp.grad(n) for n in sp.masks}))
            sp.step()
        (out_d, gx_d, gw_d), (out_s, gx_s, gw_s) = results
        torch.testing.assert_close(out_s, out_d, **TOL)
        torch.testing.assert_close(gx_s, gx_d, **TOL)
        for name in gw_d:
            torch.testing.assert_close(gw_s[name], gw_d[name], **TOL)
            assert torch.equal(runs[0][2].masks[name], runs[1][2].masks[name])
    assert runs[1][2].topology_changes == runs[0][2].topology_changes
    assume(runs[0][2].topology_changes > 0)  # layers too small to swap a weight make no example of this test


def test_sparse_layers_replace_the_dense_ones_and_the_optimizer_entries():
    model, opt, sp = build("sparse", "rigl", "sgd", 10, dense_first=True)
    assert isinstance(model.conv1, nn.Conv2d) and "conv1.weight" not in sp.sparse_layers  # kept dense
    assert isinstance(model.conv2, SparseConv2d) and isinstance(model.fc1, SparseLinear)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    assert sp.params["fc1.weight"] is model.fc1.values and sp.modules["fc1.weight"] is model.fc1
    assert [r.shape for r in sp.report()] == [(8, 1, 3, 3), (16, 8, 3, 3), (32, 256), (4, 32)]


def test_layers_at_density_one_stay_dense_and_dense_linears_take_batch_innermost_inputs():
    """ERK puts conv1 (72 weights) at density 1: it is not swapped; fc2, kept dense, becomes a BatchInnermostLinear."""
    model, opt, sp = build("sparse", "rigl", "sgd", 10, sparsity=0.5, distribution="erk", dense_last=True)
    assert sp.target_densities["conv1.weight"] == 1.0 and type(model.conv1) is nn.Conv2d
    assert "conv1.weight" not in sp.sparse_layers and isinstance(model.conv2, SparseConv2d)
    assert isinstance(model.fc2, BatchInnermostLinear)
    x = torch.randn(16, 32).t().contiguous().t().requires_grad_(True)  # batch-innermost, as sparse layers emit
    reference = nn.functional.linear(x.detach().contiguous(), model.fc2.weight, model.fc2.bias)
    out = model.fc2(x)
    torch.testing.assert_close(out, reference)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * reference @ model.fc2.weight)
    torch.testing.assert_close(model.fc2.weight.grad, 2 * reference.t() @ x.detach())
    torch.testing.assert_close(model.fc2.bias.grad, 2 * reference.sum(0))
    # the backward is differentiable: a gradient penalty through the batch-innermost Linear, as through nn.Linear
    plain = nn.Linear(32, 4)
    plain.load_state_dict(model.fc2.state_dict())
    model.fc2.weight.grad = None
    for layer, inp in ((model.fc2, x), (plain, x.detach().contiguous().requires_grad_(True))):
        (g,) = torch.autograd.grad(layer(inp).square().sum(), inp, create_graph=True)
        g.square().sum().backward()
    torch.testing.assert_close(model.fc2.weight.grad, plain.weight.grad)
    # and an in-place op may follow it, as after nn.Linear
    x.grad = None
    model.fc2(x).relu_().sum().backward()
    torch.testing.assert_close(x.grad, (reference > 0).float() @ model.fc2.weight)
    # under bfloat16 autocast as nn.Linear under it
    grads = []
    x.grad = None
    for layer, inp in ((model.fc2, x), (plain, x.detach().contiguous().requires_grad_(True))):
        layer.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(inp)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        grads.append((out, inp.grad, layer.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bfloat16 products, summed in another order


def test_sparse_checkpoint_roundtrip_continues_identically():
    model, opt, sp = build("sparse", "rigl", "adam", 12)
    x, y = make_data(64)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()})
    model2, opt2, sp2 = build("sparse", "rigl", "adam", 12)
    with pytest.raises(bidst.BidstError, match="load the model's state_dict first"):
        sp2.load_state_dict(state["sp"])
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sp2.load_state_dict(state["sp"])
    for _ in range(6):
        for m, o, s in ((model, opt, sp), (model2, opt2, sp2)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            s.step()
    for name in sp.masks:
        assert torch.equal(sp.masks[name], sp2.masks[name])
        torch.testing.assert_close(sp2.weight(name), sp.weight(name))


def test_a_model_state_loaded_without_the_sparsifier_state_is_refused_at_the_next_step():
    """model.load_state_dict alone gave the sparse layers the checkpoint's positions while the Sparsifier kept its
    own masks: the next update failed deep inside ("drop picked an inactive position"), after a step on stale masks."""
    model, opt, sp = build("sparse", "rigl", "sgd", 12)
    x, y = make_data(64)
    for _ in range(6):  # a topology change at step 5
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    assert sp.topology_changes == 1
    state = copy.deepcopy(model.state_dict())
    model.load_state_dict(state)  # the same positions: nothing to refuse
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    sp.step()
    model2, opt2, sp2 = build("sparse", "rigl", "sgd", 12)  # the initial masks
    model2.load_state_dict(state)
    opt2.zero_grad()
    nn.functional.cross_entropy(model2(x), y).backward()
    with pytest.raises(bidst.BidstError, match="got active positions other than this Sparsifier's masks"):
        sp2.step()


def test_in_place_activations_after_sparse_layers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(inplace=True), nn.Linear(16, 4), nn.ReLU(inplace=True))
    sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.5, total_steps=4, backend="sparse")
    x = make_data(8)[0].requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and sp.params["1.weight"].grad.shape == (sp.budgets["1.weight"],)


class DenseOnly:
    """A method that does not declare the sparse backend."""

    name = "dense-only"
    default_distribution = "uniform"


def test_backend_errors():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(bidst.BidstError, match="unknown backend 'spars'; known: masked, sparse"):
        bidst.sparsify(model, opt, "rigl", 0.9, total_steps=10, backend="spars")
    with pytest.raises(bidst.BidstError, match="does not support backend 'sparse'"):
        bidst.Sparsifier(model, opt, DenseOnly(), sparsity=0.9, total_steps=10, backend="sparse")
    conv1d = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(bidst.BidstError, match="Conv1d"):
        bidst.sparsify(conv1d, torch.optim.SGD(conv1d.parameters(), lr=0.1), "set", 0.5, total_steps=5, backend="sparse")
    with pytest.raises(bidst.BidstError, match="cannot train with Adafactor"):  # state by the weight's shape
        bidst.sparsify(model, torch.optim.Adafactor(model.parameters()), "set", 0.5, total_steps=5, backend="sparse")
    for backend in ("masked", "sparse"):  # its step needs a closure (the masked backend failed at the first step)
        with pytest.raises(bidst.BidstError, match="LBFGS cannot be sparsified: its step needs a closure"):
            bidst.sparsify(model, torch.optim.LBFGS(model.parameters()), "set", 0.5, total_steps=5, backend=backend)
    assert type(model.fc1) is nn.Linear
    bare = nn.Linear(8, 4)  # its twin could not replace the object the caller holds: it would train an orphan
    with pytest.raises(bidst.BidstError, match="cannot replace the model itself"):
        bidst.sparsify(bare, torch.optim.SGD(bare.parameters(), lr=0.1), "set", 0.5, total_steps=5, backend="sparse")
    assert type(bare) is nn.Linear and not list(bare.children())
    with pytest.raises(bidst.BidstError, match="without its DataParallel wrapper"):
        bidst.sparsify(nn.DataParallel(model), opt, "rigl", 0.9, total_steps=10, backend="sparse")


def tied_net() -> nn.Sequential:
    """An MLP whose two hidden Linear layers share one weight Parameter (distinct modules)."""
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), a, nn.ReLU(), b, nn.ReLU(), nn.Linear(16, 3))


def hooked(model: TinyNet) -> TinyNet:
    """`model` with a gradient hook on fc1's bias."""
    model.fc1.bias.register_hook(lambda g: g * 2)
    return model


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(4 * 36, 2)),
         "padding_mode='reflect'"),
        (lambda: nn.Sequential(nn.Conv2d(2, 4, 4, padding="same"), nn.Flatten(), nn.Linear(4 * 36, 2)), "asymmetric"),
        (tied_net, "cannot keep layer '2''s parameters shared with 4.weight"),
        (lambda: hooked(TinyNet()), "cannot carry the gradient hooks on layer 'fc1''s bias"),
    ],
)
def test_a_refused_sparse_backend_leaves_the_model_and_optimizer_as_they_were(make, match):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    params = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(bidst.BidstError, match=match):
        bidst.sparsify(model, opt, "rigl", 0.9, total_steps=10, backend="sparse")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no weight was masked
    assert [list(g["params"]) for g in opt.param_groups] == params


def test_biases_outside_the_optimizer_are_refused_before_any_change_and_frozen_ones_are_allowed():
    model = TinyNet()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    opt = torch.optim.SGD(weights, lr=0.1)  # the biases train in another optimizer
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(bidst.BidstError, match="needs layer '.*''s bias in the optimizer given to sparsify"):
        bidst.sparsify(model, opt, "rigl", 0.9, total_steps=10, backend="sparse")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert opt.param_groups[0]["params"] == weights and not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules())
    for n, p in model.named_parameters():
        p.requires_grad_(not n.endswith("bias"))  # frozen biases need no optimizer
    sp = bidst.sparsify(model, opt, "rigl", 0.9, total_steps=10, backend="sparse")
    assert sp.sparse_layers and all(not m.bias.requires_grad for m in sp.sparse_layers.values() if m.bias is not None)
    assert len(opt.param_groups[0]["params"]) == len(weights)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize(
    "make_opt,key,start",
    [(lambda ps: torch.optim.Rprop(ps, lr=0.01), "step_size", 0.01),
     (lambda ps: torch.optim.Adagrad(ps, lr=0.01, initial_accumulator_value=0.1), "sum", 0.1),
     (lambda ps: torch.optim.Adam(ps, lr=0.01), "exp_avg_sq", 0.0)],
    ids=["rprop", "adagrad", "adam"],
)
def test_grown_weights_start_with_a_fresh_weights_optimizer_state(backend, make_opt, key, start):
    model = TinyNet()
    opt = make_opt(model.parameters())
    sp = bidst.sparsify(model, opt, "set", 0.9, total_steps=20, interval=3, drop_fraction=0.3, backend=backend)
    name = "fc1.weight"
    x, y = make_data(32)
    grown = None
    for _ in range(6):
        before = sp.masks[name].clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
        if not torch.equal(sp.masks[name], before):
            grown = (sp.masks[name] & ~before).view(-1)
            break
    assert grown is not None and grown.any()
    state = opt.state[sp.params[name]][key].detach()
    layer = sp.sparse_layers.get(name)
    dense = (layer.structure.to_dense(state) if layer is not None else state).view(-1)
    assert torch.all(dense[grown] == start)  # an Rprop step size of 0 would freeze a grown weight for good
    assert torch.all(dense[~sp.masks[name].view(-1)] == 0)


def test_stepping_after_the_model_was_exported_is_refused_and_a_copy_exports_freely():
    """After to_dense_modules the optimizer held the orphaned twins' values: training went on, changing nothing."""
    x, y = make_data(16)
    model, opt, sp = build("sparse", "rigl", "sgd", 6, interval=2)
    exported = copy.deepcopy(model)
    bidst.sparse.to_dense_modules(exported)
    for _ in range(2):  # the copy's export leaves the run alone
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    bidst.sparse.to_dense_modules(model)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(bidst.BidstError, match="were swapped back to dense ones by to_dense_modules"):
        sp.step()


def test_an_exported_model_is_plain_pytorch_and_scripts():
    """to_dense_modules swapped the sparse layers back but left the other layers' batch-innermost twins, which
    torch.jit.script cannot compile."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bidst.sparsify(model, opt, "rigl", 0.8, total_steps=10, backend="sparse", distribution="uniform")
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    expected = model(x)
    bidst.sparse.to_dense_modules(model)
    assert all(type(m).__module__.startswith("torch.nn.") for m in model.modules())
    torch.testing.assert_close(torch.jit.script(model)(x), expected, **TOL)


def test_the_kernels_keep_the_thread_count_the_user_set(tmp_path):
    """The first kernel call starts Numba's OpenMP pool, which reset torch's thread count to every core (and the
    kernels ran on every core) whatever the user had set."""
    code = (
        "import torch, numba, bidst\n"
        "from torch import nn\n"
        "torch.set_num_threads(1)\n"
        "model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "sp = bidst.sparsify(model, opt, 'rigl', 0.9, total_steps=10, backend='sparse', distribution='uniform')\n"
        "nn.functional.cross_entropy(model(torch.randn(8, 32)), torch.zeros(8, dtype=torch.long)).backward()\n"
        "sp.step()\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_an_optimizer_built_from_named_parameters_names_the_twins_values():
    model = TinyNet()
    opt = torch.optim.SGD(model.named_parameters(), lr=0.1, momentum=0.9)
    bidst.sparsify(model, opt, "rigl", 0.9, total_steps=10, backend="sparse")
    group = opt.param_groups[0]
    named = dict(model.named_parameters())
    assert "fc1.values" in group["param_names"] and "fc1.weight" not in group["param_names"]
    assert all(named[n] is p for n, p in zip(group["param_names"], group["params"], strict=True))


def test_sparse_twins_keep_the_layers_forward_and_backward_hooks():
    model = TinyNet()
    seen: list[str] = []
    model.fc1.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    handle = model.fc1.register_forward_hook(lambda m, args, out: seen.append(f"fwd {tuple(out.shape)}"))
    model.conv2.register_full_backward_hook(lambda m, gin, gout: seen.append(f"bwd {tuple(gout[0].shape)}"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "set", 0.9, total_steps=10, backend="sparse")
    assert isinstance(model.fc1, SparseLinear) and isinstance(model.conv2, SparseConv2d)
    x, y = make_data(8)
    nn.functional.cross_entropy(model(x), y).backward()
    sp.step()
    assert seen == ["pre", "fwd (8, 32)", "bwd (8, 16, 4, 4)"]
    handle.remove()  # the user's handle still reaches the hook
    bidst.sparse.to_dense_modules(model)
    seen.clear()
    model(x)
    assert type(model.fc1) is nn.Linear and seen == ["pre"]


def test_a_weight_tied_between_layers_has_one_mask_on_the_masked_backend():
    model = tied_net()
    sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.75, total_steps=10,
                        distribution="uniform")
    assert sp.sparse_names() == ["0.weight", "2.weight", "6.weight"]
    assert int((model[4].weight != 0).sum()) == sp.budgets["2.weight"] == 64  # one mask, not two intersected


def shared_net() -> nn.Sequential:
    """An MLP that applies one hidden Linear module twice."""
    torch.manual_seed(0)
    hidden = nn.Linear(16, 16)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), hidden, nn.ReLU(), hidden, nn.ReLU(), nn.Linear(16, 3))


def test_a_layer_used_twice_is_one_sparse_layer_and_trains_as_on_the_masked_backend():
    runs = [build(b, "rigl", "sgd", 8, shared_net, interval=2) for b in ("masked", "sparse")]
    sparse_model = runs[1][0]
    assert isinstance(sparse_model[2], SparseLinear) and sparse_model[4] is sparse_model[2]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    for _ in range(8):
        for model, opt, sp in runs:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            sp.step()
    (dm, _, dsp), (sm, _, ssp) = runs
    assert ssp.topology_changes == dsp.topology_changes > 0
    torch.testing.assert_close(ssp.weight("2.weight"), dsp.weight("2.weight"), **TOL)
    torch.testing.assert_close(sm(x), dm(x), **TOL)
    bidst.sparse.to_dense_modules(sm)
    assert type(sm[2]) is nn.Linear and sm[4] is sm[2]
    torch.testing.assert_close(sm(x), dm(x), **TOL)


class SampledRigL(RigL):
    """RigL that also asks, every step, for the gradient at a few inactive positions of each layer."""

    def sampled_positions(self, step: int, sp) -> dict[str, torch.Tensor]:
        return {n: (~sp.masks[n]).view(-1).nonzero().squeeze(1)[step % 3 :: 5] for n in sp.sparse_names()}


@pytest.mark.parametrize("backend", ["sparse", "masked"])
def test_sampled_positions_come_back_as_the_dense_gradient_there(backend):
    """A method's `sampled_positions` are served by the sparse kernels, read off the dense `param.grad` of
    masked (and dense-kept) layers, or read off a captured dense gradient."""
    torch.manual_seed(0)
    model = TinyNet()
    dense = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.Sparsifier(model, opt, SampledRigL(interval=2), sparsity=0.8, total_steps=8, backend=backend)
    assert bool(sp.sparse_layers) == (backend == "sparse")
    x, y = make_data(32)
    for step in range(1, 7):
        positions = {n: p.clone() for n, p in sp._sampled_requested.items()}
        with torch.no_grad():  # the dense twin holds the sparse model's current weights
            for name, param in dense.named_parameters():
                param.copy_(sp.weight(name) if name in sp.sparse_layers else dict(model.named_parameters())[name])
        loss = nn.functional.cross_entropy(dense(x), y)
        grads = dict(zip(positions, torch.autograd.grad(loss, [dense.get_parameter(n) for n in positions])))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
        assert set(sp.sampled_grads) == set(positions) == set(sp.sparse_names()) and sp.captured_dense_grad == (step % 2 == 0)
        for name, pos in positions.items():
            torch.testing.assert_close(sp.sampled_grads[name], grads[name].reshape(-1)[pos], **TOL)


@pytest.mark.parametrize("hypergradient", ["first_order", "second_order_diag"])
def test_bidst_learns_the_same_scores_and_shadows_on_both_backends(hypergradient):
    """BiDST's candidates' gradients come from the kernels under `sparse` and from captures under `masked`."""
    steps = 16
    # SGD on the scores: Adam's m1/sqrt(m2) would amplify float rounding where a gradient is ~0
    options = {"learn_every": 1, "mask_interval": 4, "explore_ratio": 1.0, "hypergradient": hypergradient,
               "mask_optimizer": "sgd", "mask_lr": 10.0}
    runs = [build(b, "bidst", "sgd", steps, **options) for b in ("masked", "sparse")]
    x, y = make_data(256)
    for step in range(steps):
        for model, opt, sp in runs:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[step * 16 : step * 16 + 32]), y[step * 16 : step * 16 + 32]).backward()
            sp.step()
    (_, _, masked), (_, _, sparse) = runs
    assert sparse.topology_changes == masked.topology_changes >= 2 and sparse.costs == pytest.approx(masked.costs)
    for name, state in masked.method._layers.items():
        other = sparse.method._layers[name]
        assert torch.equal(state["pos"], other["pos"]) and torch.equal(masked.masks[name], sparse.masks[name])
        assert bool(masked.masks[name].all()) or state["psi"].abs().sum() > 0  # learned where there are candidates
        for key in ("psi", "shadow"):
            torch.testing.assert_close(other[key], state[key], rtol=1e-3, atol=1e-4)


def test_bidst_unrolled_needs_the_masked_backend():
    with pytest.raises(bidst.BidstError, match="unrolled.*backend 'masked'"):
        build("sparse", "bidst", "sgd", 10, hypergradient="unrolled")


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_magnitude_drop_ranks_the_active_weights_as_the_dense_weight_would(backend):
    """Among the active values only (the sparse backend's compact ones), ties at zero broken by position."""
    model, opt, sp = build(backend, "rigl", "sgd", 10)
    name = "fc1.weight"
    positions, values = sp.active_weights(name)
    assert torch.equal(positions, sp.masks[name].view(-1).nonzero().squeeze(1))
    assert torch.equal(values, sp.weight(name).view(-1)[positions])
    ties = torch.tensor([7, 1, 4])
    layer = sp.sparse_layers.get(name)
    with torch.no_grad():
        if layer is not None:
            layer.values[ties] = 0.0
        else:
            sp.params[name].view(-1)[positions[ties]] = 0.0
    dense = sp.weight(name).view(-1)
    for k in (1, 3, 5, 40):
        expected = drop_lowest(dense.abs(), sp.masks[name].view(-1), k)
        assert torch.equal(magnitude_drop(sp)(name, k), expected)
    assert magnitude_drop(sp)(name, 3).tolist() == positions[ties.sort().values].tolist()


@pytest.mark.parametrize("method", ["rigl", "bidst"])
def test_gradients_clipped_after_prepare_gradients_train_alike_on_both_backends(method):
    runs = [build(b, method, "sgd", 8, interval=2) if method == "rigl" else build(b, method, "sgd", 8, mask_interval=2)
            for b in ("masked", "sparse")]
    x, y = make_data(256)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        idx = torch.randint(0, len(x), (32,), generator=g)
        norms = []
        for model, opt, sp in runs:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            sp.prepare_gradients()
            norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), 0.05)))
            sp.step()
        assert norms[0] == pytest.approx(norms[1], rel=1e-4) and norms[0] > 0.05  # the clip binds
    (dm, _, dsp), (sm, _, ssp) = runs
    assert ssp.topology_changes == dsp.topology_changes > 0
    for name in dsp.masks:
        assert torch.equal(dsp.masks[name], ssp.masks[name])
        torch.testing.assert_close(ssp.weight(name), dsp.weight(name), **TOL)


def frozen_tiny_net() -> nn.Module:
    """A TinyNet whose Conv/Linear weights are frozen (to be unfrozen after sparsify)."""
    model = TinyNet()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.requires_grad_(False)
    return model


SKIP_CASES = {
    "rigl": ("rigl", {"interval": 2}),
    "bidst": ("bidst", {"mask_interval": 2, "learn_every": 1}),
    "bidst-rows": ("bidst", {"mask_interval": 2, "learn_every": 1, "mask_rows": 0.5}),
    "rigl-unfrozen": ("rigl", {"interval": 2}),  # every weight frozen at sparsify, trained from the first step
}


@pytest.mark.parametrize(("case", "backend"), [(c, b) for c in SKIP_CASES for b in ("masked", "sparse")
                                               if not (c == "bidst-rows" and b == "sparse")])  # rows: masked only
def test_a_prepared_step_that_is_skipped_leaves_nothing_behind(case, backend):
    """Gradients prepared (for clipping) and then discarded (a non-finite norm, say: zero_grad, no step) are not
    taken for the next batch's: the run equals one that never saw the skipped batch. (The next prepare returned
    early, so the optimizer applied the new gradients unmasked and the method used the skipped batch's; BiDST's
    forward records kept the skipped batch's rows and inputs.)"""
    method, options = SKIP_CASES[case]
    unfrozen = case.endswith("unfrozen")
    if unfrozen:  # the default filter leaves frozen layers alone: name them
        options = {**options, "filter_fn": lambda m, _: isinstance(m, (nn.Conv2d, nn.Linear))}
    runs = [build(backend, method, "sgd", 8, model_fn=frozen_tiny_net if unfrozen else TinyNet, **options)
            for _ in range(2)]  # fmt: skip
    for _, _, sp in runs if unfrozen else []:
        for name in sp.params:
            sp.trainable(name).requires_grad_(True)
    x, y = make_data(256)
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        idx, skipped = (torch.randint(0, len(x), (32,), generator=g) for _ in range(2))
        for run, (model, opt, sp) in enumerate(runs):
            if run == 1 and step in (1, 3):  # a batch whose prepared gradients are thrown away
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[skipped] * 5.0), y[skipped]).backward()
                sp.prepare_gradients()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            sp.prepare_gradients()
            sp.step()
    (_, aopt, asp), (_, bopt, bsp) = runs
    assert asp.topology_changes == bsp.topology_changes > 0
    assert asp.costs == bsp.costs
    for name in asp.masks:
        assert torch.equal(asp.masks[name], bsp.masks[name]), name
        assert torch.equal(asp.weight(name), bsp.weight(name)), name
        for a, b in zip(dense_states(asp, aopt, name), dense_states(bsp, bopt, name)):
            assert torch.equal(a, b), name
    if method == "bidst":
        for name, layer in asp.method._layers.items():
            assert torch.equal(layer["psi"], bsp.method._layers[name]["psi"]), name


def test_torch_compile_of_a_sparse_backend_model_trains_as_eager(monkeypatch):
    """TorchDynamo cannot trace the Numba kernels (it crashed tracing into Numba's dispatcher): the sparse
    layers run eagerly inside a compiled model."""
    import bidst.sparse.conv as sparse_conv
    import bidst.sparse.linear as sparse_lin

    eager_calls = []
    for module, name in ((sparse_lin, "_eager_sparse_linear"), (sparse_conv, "_eager_sparse_conv2d")):
        run_eagerly = getattr(module, name)
        monkeypatch.setattr(module, name, torch.compiler.disable(
            lambda *a, _f=run_eagerly, _n=name, **k: eager_calls.append(_n) or _f(*a, **k)))
    x, y = make_data(32)
    outs = []
    for compiled in (True, False):  # compiled first: its tracing meets kernels not yet compiled by Numba
        model, opt, sp = build("sparse", "rigl", "sgd", 6, interval=2)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(run(x), y).backward()
            sp.step()
        outs.append((run(x).detach(), sp.topology_changes))
    assert outs[0][1] == outs[1][1] > 0
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
    assert {"_eager_sparse_linear", "_eager_sparse_conv2d"} <= set(eager_calls)  # the compiled model's sparse layers


def test_torch_export_of_a_sparse_backend_model_computes_the_same_function():
    """torch.export has no eager part to leave the Numba kernels to (the compile path recursed until Python's
    limit): the exported program computes the sparse layers with dense ops, from the same values."""
    x, y = make_data(32)
    model, opt, sp = build("sparse", "rigl", "sgd", 4, interval=2)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    assert sp.topology_changes > 0
    exported = torch.export.export(model, (x[:16],))
    assert any(spec.target.endswith(".values") for spec in exported.graph_signature.input_specs)
    torch.testing.assert_close(exported.module()(x[16:]), model(x[16:]), **TOL)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_frozen_layer_stays_dense_and_frozen(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    model[0].requires_grad_(False)  # e.g. a pretrained input layer
    frozen = model[0].weight.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "rigl", 0.8, total_steps=6, backend=backend, interval=2)
    assert sp.sparse_names() == ["2.weight", "4.weight"]  # the default filter leaves frozen weights alone
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    assert sp.topology_changes > 0 and torch.equal(model[0].weight, frozen)
    chosen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    chosen[0].weight.requires_grad_(False)  # selected by the user's filter: a sparse twin keeps it frozen
    bidst.sparsify(chosen, torch.optim.SGD(chosen.parameters(), lr=0.1), "static", 0.8, total_steps=5, backend=backend,
                   filter_fn=lambda module, name: isinstance(module, nn.Linear))
    assert [p.requires_grad for p in chosen.parameters()] == [False, True, True, True]
    assert backend == "masked" or isinstance(chosen[0], SparseLinear)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "granet", "bidst"])
def test_a_layer_frozen_after_sparsify_keeps_its_topology_and_weights(method, backend):
    """Freezing a layer during training (requires_grad False) takes it out of the method's hands: before, the
    sparse backend's RigL and every backend's SET, SNFS, GraNet and BiDST kept swapping it, zeroing trained weights
    whose replacements could never train."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"mask_interval": 2, "learn_every": 1} if method == "bidst" else {"interval": 2}
    sp = bidst.sparsify(model, opt, method, 0.8, total_steps=10, backend=backend, **options)
    model[2].requires_grad_(False)  # the layer itself, or its sparse twin
    mask, weight = sp.masks["2.weight"].clone(), sp.weight("2.weight").clone()
    learned = {k: v.clone() for k, v in sp.method._layers["2.weight"].items()} if method == "bidst" else {}
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    assert sp.topology_changes > 0 and "2.weight" not in sp.sparse_names()
    assert torch.equal(sp.masks["2.weight"], mask) and torch.equal(sp.weight("2.weight"), weight)
    # BiDST leaves its scores and shadow weights alone too (the sparse backend still gave it candidate gradients)
    assert all(torch.equal(sp.method._layers["2.weight"][k], v) for k, v in learned.items())


def test_bidst_backends_agree_on_a_layer_frozen_and_unfrozen_mid_run():
    """A layer unfrozen again learns from the next step on, alike on both backends (the unfreezing step's
    candidate gradients were never asked for: that step failed with 'forward never ran')."""
    masks = []
    for backend in ("masked", "sparse"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=40, backend=backend, mask_interval=4, learn_every=1)
        g = torch.Generator().manual_seed(1)
        for step in range(16):
            if step in (3, 10):
                sp.trainable("2.weight").requires_grad_(step == 10)
            x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            sp.step()
        masks.append(sp.masks)
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_a_graph_kept_alive_across_a_resize_does_not_break_the_next_backward():
    """A grad-enabled forward kept across a step (a validation pass outside no_grad) pinned the sparse layers'
    values, so a step that resized them (GMP pruning) fell back to keeping the old gradient accumulator, and the
    next backward failed on its shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "gmp", 0.8, total_steps=8, interval=1, backend="sparse")
    kept, sizes = [], []
    for _ in range(6):
        x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
        sizes.append(sp.budgets["0.weight"])
        kept.append(model(torch.randn(4, 8)))  # never backpropagated
    assert len(set(sizes)) > 3 and sizes == sorted(sizes, reverse=True)


def test_gradient_hooks_and_attributes_on_values_survive_topology_changes():
    """The README tells users to register hooks on the twins' values after sparsify: a topology change (a resize of
    values) dropped them, so a layer frozen through its gradient hook trained again."""
    x, y = make_data(64)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bidst.sparsify(model, opt, "set", 0.8, total_steps=20, interval=3, backend="sparse")
    values = sp.trainable("fc1.weight")
    calls = {"hook": 0, "post": 0}

    def freeze(g):  # type: ignore[no-untyped-def]
        calls["hook"] += 1
        return g * 0

    values.register_hook(freeze)
    values.register_post_accumulate_grad_hook(lambda t: calls.__setitem__("post", calls["post"] + 1))
    values.tag = "fc1"
    changes = 0
    for _ in range(7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert float(values.grad.abs().sum()) == 0.0
        changes += bool(sp.step())
    assert changes >= 2 and calls == {"hook": 7, "post": 7} and values.tag == "fc1"


def rigl_first_update(backend: str, before_step, set_to_none: bool = True) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """RigL's masks after its first update (step 5) of a small MLP; `before_step(model, opt, x, y)` runs before each
    step's own zero_grad(set_to_none), forward and backward and returns the inputs that step trains on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = bidst.sparsify(model, opt, "rigl", 0.9, total_steps=100, interval=5, backend=backend, seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)
    for _ in range(5):
        inputs = before_step(model, opt, x, y)
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(inputs), y).backward()
        sp.step()
    assert sp.topology_changes == 1
    return {n: m.clone() for n, m in sp.masks.items()}


def reload_state(model, opt, x, y):  # type: ignore[no-untyped-def]
    model.load_state_dict(copy.deepcopy(model.state_dict()))
    return x


def discarded_backward(model, opt, x, y):  # type: ignore[no-untyped-def]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    return x


def discarded_backward_zeros_kept(model, opt, x, y):  # type: ignore[no-untyped-def]
    opt.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    return x


def input_gradient(model, opt, x, y):  # type: ignore[no-untyped-def]
    xa = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(nn.functional.cross_entropy(model(xa), y), xa)
    return x + 0.01 * gx.sign()


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_reloading_the_model_state_keeps_the_gradient_the_method_asked_for(backend):
    """model.load_state_dict with the same active positions (training weights put back after an evaluation) made
    the sparse layers new structures without the Sparsifier's standing dense-gradient request: RigL grew from zeros."""
    plain, reloaded = rigl_first_update(backend, lambda model, opt, x, y: x), rigl_first_update(backend, reload_state)
    assert all(torch.equal(plain[n], reloaded[n]) for n in plain)


@pytest.mark.parametrize("extra", [discarded_backward, input_gradient])
def test_a_backward_whose_weight_gradient_is_discarded_does_not_reach_the_method(extra):
    """The masked backend's methods read param.grad, the gradient the step applies; the sparse kernels added every
    backward since the request to the dense gradient RigL grows by, a discarded one (a skipped batch, SAM's first
    pass) or an input-only autograd.grad (adversarial examples) included."""
    masked, sparse = rigl_first_update("masked", extra), rigl_first_update("sparse", extra)
    assert all(torch.equal(masked[n], sparse[n]) for n in masked)


def test_a_discarded_backward_is_forgotten_when_zero_grad_keeps_zeros():
    """zero_grad(set_to_none=False) leaves .grad a tensor of zeros, which the sparse layers did not take for a
    zeroed gradient: the discarded backward stayed in the dense gradient RigL grows by."""
    plain = rigl_first_update("sparse", lambda model, opt, x, y: x, set_to_none=False)
    masked = rigl_first_update("masked", discarded_backward_zeros_kept, set_to_none=False)
    sparse = rigl_first_update("sparse", discarded_backward_zeros_kept, set_to_none=False)
    assert all(torch.equal(plain[n], masked[n]) for n in plain)
    assert all(torch.equal(plain[n], sparse[n]) for n in plain)


def test_rebuild_time_counts_the_index_orderings_a_new_structure_builds_on_its_first_use():
    """A topology change's input-channel index and kernel orderings are built lazily, on the next forward and
    backward: they are rebuild work, and were left out of `rebuild_seconds` (and so of its share of training)."""
    model, opt, sp = build("sparse", "rigl", "sgd", 100, interval=1)
    x, y = make_data(32)

    def train_step() -> bool:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return sp.step()

    assert train_step()  # a topology change: new structures, their orderings not built yet
    before = sp.rebuild_seconds
    built = {n: layer.structure.build_seconds for n, layer in sp.sparse_layers.items()}
    assert not any(built.values())
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # builds them
    built = sum(layer.structure.build_seconds for layer in sp.sparse_layers.values())
    assert built > 0 and sp.rebuild_seconds == pytest.approx(before + built)
    sp.step()
    state = sp.state_dict()
    assert state["rebuild_seconds"] == pytest.approx(sp.rebuild_seconds)  # a resumed run goes on from the total
