"""BiDST: sampled gradients, score gradients against autograd, the three hypergradients, the flag, resume, costs."""

from __future__ import annotations

import copy

import math
import types

import pytest
import torch
from _runs import spawn
from conftest import TinyNet, make_data
from torch import nn

import bidst
from bidst.budget import matched_steps, model_rows, planned_flops
from bidst.methods import bidst as bidst_method
from bidst.sampled import output_row_norms, sampled_weight_grad
from bidst.sampled import output_rows as sampled_rows
from bidst.sparse import SparseLinear


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny layers gain nothing from threads, and a shared CPU makes them much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _capture(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output gradient of `module` for a random linear loss, plus the dense weight gradient."""
    store = {}

    def hook(mod, inputs, output):
        store["x"] = inputs[0]
        output.register_hook(lambda g: store.__setitem__("g", g))

    handle = module.register_forward_hook(hook)
    out = module(x)
    (out * torch.randn_like(out)).sum().backward()
    handle.remove()
    return store["x"], store["g"]


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.Linear(7, 5), (3, 4, 7)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 9, 8)),
        (nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)), (2, 4, 9, 8)),
        (nn.Conv2d(4, 8, 3, padding="same", dilation=2, padding_mode="reflect"), (2, 4, 9, 8)),
        (nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 7, 7)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 11)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 9, 8)),  # unbatched, as nn.Conv2d accepts
        (nn.Conv1d(4, 6, 3, padding=1), (4, 11)),
    ],
)
def test_sampled_weight_grad_equals_dense_gradient(module, shape):
    torch.manual_seed(0)
    x, g = _capture(module, torch.randn(shape))
    pos = torch.randperm(module.weight.numel())[:40]
    got = sampled_weight_grad(module, x, g, pos)
    torch.testing.assert_close(got, module.weight.grad.view(-1)[pos], rtol=1e-4, atol=1e-5)
    rows = g.numel() // module.out_channels if isinstance(module, (nn.Conv1d, nn.Conv2d)) else g.numel() // 5
    assert sampled_rows(module, g) == rows == output_row_norms(module, g).numel()


def test_sampled_weight_grad_long_rows_path():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x, g = _capture(conv, torch.randn(20, 3, 16, 16))  # 5120 rows: one dot product per position
    pos = torch.arange(conv.weight.numel())
    torch.testing.assert_close(sampled_weight_grad(conv, x, g, pos), conv.weight.grad.view(-1), rtol=1e-4, atol=1e-4)


class OneLayer(nn.Module):
    """A sparse layer followed by a fixed dense head, for checking score gradients."""

    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(features, 3)
        self.head.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(x)).flatten(1))


def _sparsified(layer: nn.Module, features: int, x_shape: tuple[int, ...], **options):
    torch.manual_seed(0)
    model = OneLayer(layer, features)
    opt = torch.optim.SGD([model.layer.weight, model.layer.bias], lr=0.1, weight_decay=1e-3)
    sp = bidst.sparsify(model, opt, "bidst", 0.7, total_steps=100, mask_interval=10,
                        filter_fn=lambda m, n: n == "layer", explore="random", learn_every=1, **options)
    method = sp.method
    state = method._layers["layer.weight"]
    explore = ~sp.masks["layer.weight"].view(-1)[state["pos"]]
    state["shadow"][explore] = torch.randn(int(explore.sum())) * 0.3  # non-zero candidate weights
    state["psi"].normal_()
    x = torch.randn(x_shape)
    y = torch.randint(0, 3, (x_shape[0],))
    return sp, model, method, state, x, y


def _backward(sp: bidst.Sparsifier, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """A training step's backward, and the gradients at the requested positions as `Sparsifier.step` takes them."""
    nn.functional.cross_entropy(model(x), y).backward()
    sp._take_sampled_grads(None, 1.0)


LAYERS = [
    (lambda: nn.Linear(6, 5), 5, (8, 6)),
    (lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), 3 * 3 * 3, (4, 2, 5, 5)),
]


def _relaxed_psi_grad(model, state, active, theta, rng, tau, x, y) -> torch.Tensor:
    """dL/dψ by autograd: the loss on (x, y) through the straight-through relaxed mask σ((ψ+G)/τ), with the
    logistic noise G drawn from generator state `rng` as score_grads draws it."""
    layer, pos = model.layer, state["pos"]
    noise = torch.rand(pos.numel(), generator=torch.Generator().set_state(rng)).clamp(1e-6, 1 - 1e-6)
    psi = state["psi"].clone().requires_grad_(True)
    relaxed = torch.sigmoid((psi + noise.log() - (-noise).log1p()) / tau)
    m = active.float() + relaxed - relaxed.detach()
    weight = torch.zeros(layer.weight.numel()).index_put((pos,), theta * m).view_as(layer.weight)
    if isinstance(layer, nn.Conv2d):
        out = layer._conv_forward(x, weight, layer.bias)
    else:
        out = nn.functional.linear(x, weight, layer.bias)
    loss = nn.functional.cross_entropy(model.head(torch.tanh(out).flatten(1)), y)
    return torch.autograd.grad(loss, psi)[0]


# {}: E's gradient read off param.grad by the engine; mask_rows < 1 (all rows at this size): captured
# inputs and output gradients, products at E only (bidst.sampled), the path of the unrolled mode
@pytest.mark.parametrize("options", [{}, {"mask_rows": 0.9999}], ids=["engine", "captured"])
@pytest.mark.parametrize("make,features,x_shape", LAYERS)
def test_score_gradients_equal_autograd_of_relaxed_objective(make, features, x_shape, options):
    sp, model, method, state, x, y = _sparsified(make(), features, x_shape, **options)
    layer = model.layer
    pos, mask = state["pos"], sp.masks["layer.weight"].view(-1)
    active = mask[pos]
    theta = torch.where(active, layer.weight.detach().view(-1)[pos], state["shadow"])
    rng = sp.rng.get_state()
    _backward(sp, model, x, y)
    assert bool(method._captures) == bool(options) and bool(sp.sampled_grads) != bool(options)
    psi_grads, _ = method.score_grads(sp, step=1)
    expected = _relaxed_psi_grad(model, state, active, theta, rng, method.temperature(1, sp), x, y)
    torch.testing.assert_close(psi_grads["layer.weight"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make,features,x_shape", LAYERS)
def test_held_out_scores_follow_the_held_out_batch_and_shadows_the_training_batch(make, features, x_shape):
    """upper_data: holdout: dL/dψ is the relaxed objective's gradient on the held-out batch, while the
    shadow weights' gradient is still the training batch's and the training gradient is left as it was."""
    held = []

    def holdout_batches(j):
        g = torch.Generator().manual_seed(100 + j)
        held.append((torch.randn(x_shape, generator=g), torch.randint(0, 3, (x_shape[0],), generator=g)))
        return held[-1]

    sp, model, method, state, x, y = _sparsified(make(), features, x_shape, upper_data="holdout",
                                                 holdout_batches=holdout_batches)  # fmt: skip
    layer = model.layer
    active = sp.masks["layer.weight"].view(-1)[state["pos"]]
    theta = torch.where(active, layer.weight.detach().view(-1)[state["pos"]], state["shadow"])
    rng = sp.rng.get_state()
    _backward(sp, model, x, y)
    train_grad = layer.weight.grad.clone()
    psi_grads, grads = method.score_grads(sp, step=1)
    assert len(held) == 1 and method._holdout_draws == 1
    tau = method.temperature(1, sp)
    expected = _relaxed_psi_grad(model, state, active, theta, rng, tau, *held[0])
    torch.testing.assert_close(psi_grads["layer.weight"], expected, rtol=1e-4, atol=1e-6)
    on_train = _relaxed_psi_grad(model, state, active, theta, rng, tau, x, y)
    assert not torch.allclose(psi_grads["layer.weight"], on_train, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(grads["layer.weight"], train_grad.view(-1)[state["pos"]], rtol=1e-4, atol=1e-6)
    assert torch.equal(layer.weight.grad, train_grad)
    assert sp.costs["mask_learning"] > 0


def test_implicit_diag_matches_its_formula():
    make, features, x_shape = LAYERS[0]
    results = {}
    for mode in ("first_order", "implicit_diag"):
        torch.manual_seed(0)
        sp, model, method, state, x, y = _sparsified(make(), features, x_shape, hypergradient=mode)
        rng = sp.rng.get_state()
        _backward(sp, model, x, y)
        psi_grads, grads = method.score_grads(sp, step=1)
        results[mode] = psi_grads["layer.weight"]
    noise = torch.rand(state["pos"].numel(), generator=torch.Generator().set_state(rng)).clamp(1e-6, 1 - 1e-6)
    tau = method.temperature(1, sp)
    s = torch.sigmoid((state["psi"] + noise.log() - (-noise).log1p()) / tau)
    active = sp.masks["layer.weight"].view(-1)[state["pos"]].float()
    g = grads["layer.weight"]
    term = -(1 / 1e-3) * active * g * g * s * (1 - s) / tau  # 1/λ from the optimizer's weight decay
    torch.testing.assert_close(results["implicit_diag"] - results["first_order"], term, rtol=1e-4, atol=1e-7)


def test_unrolled_matches_finite_difference_of_unrolled_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    sp = bidst.sparsify(model, opt, "bidst", 0.5, total_steps=100, hypergradient="unrolled", explore="random",
                        explore_ratio=1.0, unroll_eps=1e-3, learn_every=1)
    method = sp.method
    for name, state in method._layers.items():
        explore = ~sp.masks[name].view(-1)[state["pos"]]
        state["shadow"][explore] = torch.randn(int(explore.sum())) * 0.3
    nn.functional.cross_entropy(model(x), y).backward()
    sp.batch = (x, y)
    entries = dict(method._captures)
    grads = {n: method.candidate_grads(sp, n, e, actives_from_grad=True) for n, e in entries.items()}
    thetas = {n: torch.where(sp.masks[n].view(-1)[method._layers[n]["pos"]],
                             sp.params[n].detach().view(-1)[method._layers[n]["pos"]], method._layers[n]["shadow"])
              for n in entries}
    got = method.unrolled_mask_grads(sp, grads, thetas, entries)

    # U(m) = L((θ − η·m⊙∇_v L(θ⊙m))⊙m) in float64, differentiated by central differences in m over C
    names = list(entries)
    pos = {n: method._layers[n]["pos"] for n in names}
    base = {n: sp.masks[n].view(-1)[pos[n]].double() for n in names}
    theta64 = {n: thetas[n].double() for n in names}
    biases = [model[0].bias.detach().double(), model[2].bias.detach().double()]
    shapes = {n: sp.params[n].shape for n in names}

    def loss_at(values: dict) -> torch.Tensor:
        w = [torch.zeros(shapes[n].numel(), dtype=torch.float64).index_put((pos[n],), values[n]).view(shapes[n])
             for n in names]
        h = torch.tanh(nn.functional.linear(x.double(), w[0], biases[0]))
        return nn.functional.cross_entropy(nn.functional.linear(h, w[1], biases[1]), y)

    def unrolled(m: dict) -> float:
        v = {n: (theta64[n] * m[n]).requires_grad_(True) for n in names}
        g = torch.autograd.grad(loss_at(v), [v[n] for n in names])
        virtual = {n: theta64[n] - 0.5 * m[n] * gi for n, gi in zip(names, g)}
        return float(loss_at({n: virtual[n] * m[n] for n in names}))

    h = 1e-5
    for n in names:
        expected = torch.zeros(pos[n].numel(), dtype=torch.float64)
        for i in range(pos[n].numel()):
            up = {k: v.clone() for k, v in base.items()}
            down = {k: v.clone() for k, v in base.items()}
            up[n][i] += h
            down[n][i] -= h
            expected[i] = (unrolled(up) - unrolled(down)) / (2 * h)
        torch.testing.assert_close(got[n].double(), expected, rtol=2e-3, atol=2e-5)
    # the extra passes restored the weights and left param.grad alone
    assert all(torch.count_nonzero(sp.params[n].detach()[~sp.masks[n]]) == 0 for n in names)


def _train(steps: int = 40, sparsity: float = 0.8, seed: int = 0, record=None, scale: float = 0.0, wrap=None,
           **options):
    """BiDST on TinyNet; `scale` > 0 runs the backward through a GradScaler with that (fixed) loss scale; `wrap`
    (nn.DataParallel, say) wraps the model before sparsify, and the wrapper is what trains and is returned."""
    torch.manual_seed(seed)
    model = TinyNet() if wrap is None else wrap(TinyNet())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = bidst.sparsify(model, opt, "bidst", sparsity, total_steps=steps, seed=seed, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6) if scale else None
    if record is not None:
        change = sp.change

        def recorded(name, drop, grow, grow_values=None):
            record.append((sp.step_count, name, grow.numel(), sp.budgets[name]))
            change(name, drop, grow, grow_values)

        sp.change = recorded
    x, y = make_data()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        (scaler.scale(loss) if scaler else loss).backward()
        sp.step(scaler, batch=(x[idx], y[idx]))
    return sp, model, opt


def _holdout_batches(j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out batch j for TinyNet: 16 items of other data than the training stream's."""
    x, y = make_data(64, seed=7)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(j))[:16]
    return x[idx], y[idx]


HOLDOUT = {"upper_data": "holdout", "holdout_batches": _holdout_batches}


@pytest.mark.parametrize("options", [{}, HOLDOUT, {"mask_rows": 0.5}], ids=["default", "holdout", "mask_rows"])
def test_a_loss_scale_leaves_scores_and_shadows_unchanged(options):
    """The candidates' gradients reach BiDST unscaled (fp16 training with a GradScaler learns the same), also where
    they are sampled from captured output gradients, which carry the scale (held-out scores left the shadow
    weights 65,536 times too large under fp16's default scale)."""
    plain, _, _ = _train(steps=30, mask_interval=5, learn_every=2, **options)
    scaled, _, _ = _train(steps=30, mask_interval=5, learn_every=2, scale=1024.0, **options)
    assert scaled.topology_changes == plain.topology_changes >= 2
    for name, state in plain.method._layers.items():
        other = scaled.method._layers[name]
        assert torch.equal(state["pos"], other["pos"])
        for key in ("psi", "shadow"):
            torch.testing.assert_close(other[key], state[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("options", [{"hypergradient": "unrolled"}], ids=["unrolled"])
def test_a_loss_scale_is_refused_where_captured_gradients_would_stay_scaled(options, tmp_path, capsys):
    with pytest.raises(bidst.BidstError, match="fp16 with a GradScaler is not supported"):
        _train(steps=3, scale=1024.0, **options)
    from bidst.cli import main

    args = ["model=mlp", "dataset=synthetic", "precision=fp16", "method=bidst", "progress=false",
            *(f"method_args.{k}={v}" for k, v in options.items())]  # fmt: skip
    assert main(["train", *args, "--run-dir", str(tmp_path / "r")]) == 2  # a recipe: before anything is made
    assert "use bf16 or fp32" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("swap,frac", [("forced", 0.1), ("capped", 0.0)])
def test_commit_only_when_flag_holds_and_active_count_fixed(swap, frac):
    record: list = []
    sp, _, _ = _train(steps=32, record=record, mask_interval=4, min_swap_fraction=frac, swap=swap, drop_fraction=0.3)
    assert record, "some layer should commit"
    for step, name, swaps, budget in record:
        assert step % 4 == 0 and step <= int(0.75 * 32)
        assert swaps >= max(1.0, frac * budget)
    assert sp.budgets == sp.target_budgets()
    if swap == "forced":  # α·k decays below 10% of the actives before the stop step: the flag stays down
        assert max(step for step, *_ in record) < int(0.75 * 32)


@pytest.mark.parametrize("learn_every", [10, 3])
def test_check_grad_steps_the_shadows_once_per_check(learn_every):
    """`check_grad` takes a shadow step with a check's dense gradient; at a check that is also a learning step the
    learning step has taken it already with the same gradient (it was taken twice)."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=40, mask_interval=20, learn_every=learn_every,
                        shadow_decay=0.0, check_grad=True, min_swap_fraction=1.0)  # no commit at step 20
    x, y = make_data()
    for step in range(1, 21):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[step : step + 32]), y[step : step + 32]).backward()
        if step == 20:
            before = {n: (st["pos"].clone(), st["shadow"].clone()) for n, st in sp.method._layers.items()}
            grads = {n: sp.params[n].grad.detach().clone().view(-1) for n in sp.params}
        sp.step()
    assert sp.topology_changes == 0
    for name, (pos, shadow) in before.items():
        explore = ~sp.masks[name].view(-1)[pos]
        assert torch.equal(sp.method._layers[name]["pos"], pos)
        delta = sp.method._layers[name]["shadow"][explore] - shadow[explore]
        torch.testing.assert_close(delta, -0.05 * grads[name][pos[explore]], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend,options", [("masked", {}), ("sparse", {}), ("masked", {"mask_rows": 0.5}),
                                            ("masked", {"hypergradient": "second_order_diag"})])  # fmt: skip
def test_a_validation_forward_with_grad_enabled_changes_nothing(backend, options):
    """A forward between steps outside no_grad (a validation pass) gets no gradient: it used to add its rows and
    batch to the next learning step (costs, and the second-order term), or, with captures, to drop the layer and
    raise a misleading error."""
    runs = []
    for validate in (False, True):
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=12, mask_interval=4, learn_every=2, backend=backend,
                            **options)
        x, y = make_data()
        for step in range(12):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[step : step + 32]), y[step : step + 32]).backward()
            sp.step()
            if validate:
                model(x[:16])  # kept until the next forward
        runs.append(sp)
    plain, validated = runs
    assert validated.costs == pytest.approx(plain.costs) and validated.topology_changes == plain.topology_changes > 0
    for name, state in plain.method._layers.items():
        for key in ("pos", "psi", "shadow"):
            torch.testing.assert_close(validated.method._layers[name][key], state[key], rtol=1e-5, atol=1e-7)


def test_explore_size_is_the_exact_ceiling():
    sp, _, _ = _train(steps=1, explore_ratio=0.55)
    name = max(sp.method._layers, key=lambda n: sp.numel[n])
    assert sp.numel[name] > 300 and sp.method.explore_size(sp, name, 100) == 55 and sp.method.explore_size(sp, name, 101) == 56


def test_flag_never_up_means_no_commit():
    none: list = []
    _train(steps=20, record=none, mask_interval=5, min_swap_fraction=0.5, drop_fraction=0.3)  # α·k < half the actives
    assert none == []


@pytest.mark.parametrize("options", [{}, {"allocate": "scores"}, HOLDOUT], ids=["default", "allocate", "holdout"])
def test_resume_mid_run_reproduces_uninterrupted_run(options):
    steps, cut = 20, 12
    full, full_model, _ = _train(steps=steps, mask_interval=5, **options)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=steps, seed=0, mask_interval=5, **options)
    x, y = make_data()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(x), (32,), generator=g) for _ in range(steps)]
    for idx in batches[:cut]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        sp.step()
    saved = (model.state_dict(), opt.state_dict(), sp.state_dict())
    model2 = TinyNet()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp2 = bidst.sparsify(model2, opt2, "bidst", 0.8, total_steps=steps, seed=3, mask_interval=5, **options)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sp2.load_state_dict(saved[2])
    for idx in batches[cut:]:
        opt2.zero_grad()
        nn.functional.cross_entropy(model2(x[idx]), y[idx]).backward()
        sp2.step()
    assert all(torch.equal(sp2.masks[n], full.masks[n]) for n in full.masks)
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), full_model.state_dict().values()))
    assert sp2.method.stats() == full.method.stats() and full.method.stats()["swap_decisions"] > 0
    assert sp2.budgets == full.budgets
    if "allocate" in options:  # the allocation really moved budget between layers
        assert full.method.stats()["budget_moved"] > 0 and full.budgets != full.target_budgets()
    if "upper_data" in options:  # the resumed run went on with the held-out batches it had not used
        assert sp2.method._holdout_draws == full.method._holdout_draws == full.method._learn_steps > 0


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_rollback_in_the_process_to_the_learning_phase_trains_as_before(backend):
    """Loading an earlier state into the same objects after the learning phase ended (which removes BiDST's hooks)
    failed at the next learning step ("got a gradient while its forward never ran"): the hooks come back, and the
    replayed steps equal the first pass."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=20, mask_interval=4, backend=backend)
    x, y = make_data()
    weights = []

    def run(steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[step : step + 32]), y[step : step + 32]).backward()
            sp.step()
            weights.append({k: v.clone() for k, v in model.state_dict().items()})

    run(range(5))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))
    run(range(5, 20))  # the learning phase ends at step 15
    assert not sp.method._hooks
    first = weights[5:12]
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sp.load_state_dict(saved[2])
    weights.clear()
    run(range(5, 12))
    assert sp.method._hooks and sp.topology_changes > 0
    for again, before in zip(weights, first, strict=True):
        assert all(torch.equal(again[k], before[k]) for k in before)


def test_held_out_costs_match_the_plan_and_scores_differ_from_training_data_scores():
    sp, model, _ = _train(steps=40, mask_interval=5, learn_every=2, **HOLDOUT)
    x, _ = make_data(32)
    rows = model_rows(model, x)
    plan = planned_flops(sp, sp.method, rows, sp.total_steps)
    assert sp.costs["mask_learning"] == pytest.approx(plan["mask_learning"])
    on_train, _, _ = _train(steps=40, mask_interval=5, learn_every=2)
    assert plan["mask_learning"] > planned_flops(on_train, on_train.method, rows, 40)["mask_learning"]
    assert sp.costs["mask_learning"] > on_train.costs["mask_learning"]
    assert any(not torch.equal(a["psi"], b["psi"]) for a, b in zip(sp.method._layers.values(),
                                                                      on_train.method._layers.values()))


@pytest.mark.parametrize("options", [HOLDOUT, {"hypergradient": "unrolled"}], ids=["holdout", "unrolled"])
def test_extra_passes_count_the_layers_kept_dense(options):
    """The held-out and unrolled passes also run through layers the scores do not learn on (here the classifier,
    kept dense): their recorded cost counts them, and equals the plan."""
    sp, model, _ = _train(steps=30, mask_interval=5, learn_every=2, dense_last=True, **options)
    assert "fc2.weight" not in sp.sparse_names()
    x, _ = make_data(32)
    rows = model_rows(model, x)
    phase = "unrolled" if "hypergradient" in options else "mask_learning"
    plan = planned_flops(sp, sp.method, rows, sp.total_steps)
    assert sp.costs[phase] == pytest.approx(plan[phase])
    # the other layers' share: forward and input gradient of their active weights on every extra pass
    passes = sp.method._learn_steps * (3 if phase == "unrolled" else 1)
    pass_rows = model_rows(model, _holdout_batches(0)[0]) if phase == "mask_learning" else rows
    learning = [n for n in sp.sparse_names() if sp.method.explore_size(sp, n) > 0]
    others = passes * sum(4.0 * sp.budgets[n] * r for n, r in pass_rows.items() if n not in learning)
    learning_only = {n: r for n, r in rows.items() if n in sp.sparse_names()}
    if phase == "unrolled":  # without the other layers' rows the plan refuses instead of undercounting
        with pytest.raises(bidst.BidstError, match="output rows of every Conv/Linear layer.*fc2.weight"):
            sp.method.planned_costs(sp, learning_only)
    with pytest.MonkeyPatch.context() as mp:  # the same plan without the other layers
        mp.setattr(bidst_method, "other_layers", lambda sp, names: {})
        without = planned_flops(sp, sp.method, rows, sp.total_steps)[phase]
    assert "fc2.weight" not in learning and plan[phase] - without == pytest.approx(others)


def test_plans_and_matched_steps_are_the_same_under_the_sparse_backend():
    """The sparse backend swaps Conv/Linear layers for sparse twins: the plan must still see their rows, so a run
    is held to the same FLOPs and steps as under masked compute (`match_flops` with `backend: sparse` failed)."""
    x, _ = make_data(32)
    runs = {b: _train(steps=30, mask_interval=5, learn_every=2, dense_last=True, backend=b) for b in ("masked", "sparse")}
    rows = {b: model_rows(model, x) for b, (_, model, _) in runs.items()}
    assert rows["sparse"] == rows["masked"] and set(rows["sparse"]) == {f"{n}.weight" for n in ("conv1", "conv2",
                                                                                               "fc1", "fc2")}
    (masked, _, _), (sparse, _, _) = runs["masked"], runs["sparse"]
    plan = planned_flops(sparse, sparse.method, rows["sparse"], 30)
    assert plan == pytest.approx(planned_flops(masked, masked.method, rows["masked"], 30))
    assert sparse.costs["mask_learning"] == pytest.approx(plan["mask_learning"])
    assert matched_steps(sparse, "rigl", rows["sparse"]) == matched_steps(masked, "rigl", rows["masked"]) < 30


class TiedNet(nn.Module):
    """A hidden layer applied twice with one weight (`b` holds `a`'s weight), between two untied layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(20, 12), nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 4)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x)))))))


@pytest.mark.parametrize("options", [{}, {"hypergradient": "unrolled"}, {"mask_rows": 0.5}],
                         ids=["default", "unrolled", "mask_rows"])  # fmt: skip
def test_a_tied_weight_is_learned_and_costed_over_all_its_layers(options):
    """A weight tied between layers has one mask and one candidate set: its scores learn from, and its costs count,
    the forwards of every layer holding it (only its first layer's were seen, and the plan of the extra passes
    refused the second layer as an unknown one)."""
    torch.manual_seed(0)
    model = TiedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bidst.sparsify(model, opt, "bidst", 0.7, total_steps=20, mask_interval=5, learn_every=2, **options)
    assert "b.weight" not in sp.params
    x, y = torch.randn(64, 20, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 4
    for step in range(20):
        batch = (x[step : step + 32], y[step : step + 32])
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        sp.step(batch=batch)
    rows = model_rows(model, x[:32])
    assert rows["a.weight"] == 2 * rows["inp.weight"]  # both uses
    plan = planned_flops(sp, sp.method, rows, 20)
    for phase in sp.costs:
        assert sp.costs[phase] == pytest.approx(plan[phase]), phase


def test_a_weight_tied_to_an_embedding_is_refused_where_gradients_come_from_captures():
    decoder = nn.Linear(8, 30)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Flatten(), decoder)
    model[0].weight = decoder.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(bidst.BidstError, match="2.weight is also used by a Embedding"):
        bidst.sparsify(model, opt, "bidst", 0.5, total_steps=10, mask_rows=0.5)
    assert bidst.sparsify(model, opt, "bidst", 0.5, total_steps=10).measured_sparsity() == pytest.approx(0.5)


def test_plans_and_extra_pass_costs_see_through_a_model_wrapper():
    """Under torchrun the recipe plans on the DDP-wrapped model, whose layer names start with `module.`: the plan's
    rows and the extra passes' other layers must still carry the Sparsifier's names (match_flops failed with a
    KeyError, and the held-out passes counted every learning layer once more as a dense one)."""
    x, _ = make_data(32)
    options = dict(steps=30, mask_interval=5, learn_every=2, dense_last=True, **HOLDOUT)
    bare, bare_model, _ = _train(**options)
    wrapped, wrapped_model, _ = _train(wrap=nn.DataParallel, **options)
    rows = model_rows(wrapped_model, x)
    assert rows == model_rows(bare_model, x) and set(rows) == set(wrapped.params)
    assert wrapped.costs["mask_learning"] == pytest.approx(bare.costs["mask_learning"])
    assert matched_steps(wrapped, "rigl", rows) == matched_steps(bare, "rigl", rows) < 30


@pytest.mark.parametrize("method,options", [("gmp", {}), ("granet", {}), ("mest", {"variant": "ems", "interval_unit": "steps"})])
def test_dense_to_sparse_plans_follow_the_pruning_schedule(method, options):
    """GMP and GraNet start dense and MEST's EM&S below the target, and prune on a schedule: their plan counts the
    active weights each step really has (so match_flops=rigl shortens them, against RigL at the run's target
    budgets), not constant budgets."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bidst.sparsify(model, opt, method, 0.8, total_steps=40, interval=5, **options)
    x, y = make_data()
    rows = model_rows(model, x[:32])
    # before the first step: a baseline with work of its own is planned at the run's target budgets too, not at
    # the (denser) ones it starts from
    torch.manual_seed(0)
    other = TinyNet()
    at_target = bidst.sparsify(other, torch.optim.SGD(other.parameters(), lr=0.05), "static", 0.8, total_steps=40,
                               distribution=sp.distribution)
    assert at_target.budgets == sp.target_budgets() != sp.budgets
    plan = planned_flops(sp, bidst.create_method("bidst"), rows, 40, sp.target_budgets())
    assert plan["mask_learning"] > 0 and plan == pytest.approx(planned_flops(at_target, bidst.create_method("bidst"),
                                                                            rows, 40))
    recorded = 0.0
    for step in range(40):
        recorded += sum(6.0 * int(sp.masks[n].sum()) * rows[n] for n in sp.params)  # forward + backward, active
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[step : step + 32]), y[step : step + 32]).backward()
        sp.step()
    assert sp.topology_changes > 0
    assert planned_flops(sp, sp.method, rows, 40)["train"] == pytest.approx(recorded)
    rigl = sum(planned_flops(sp, bidst.create_method("rigl"), rows, 40, sp.target_budgets()).values())
    steps = matched_steps(sp, "rigl", rows)
    assert steps < 40 and sum(planned_flops(sp, sp.method, rows, steps).values()) <= rigl


@pytest.mark.parametrize("method,options", [("snfs", {}), ("mest", {"interval_unit": "steps"}),
                                            ("mest", {"variant": "ems", "interval_unit": "steps"})])  # fmt: skip
def test_baselines_own_costs_match_their_plans(method, options):
    """SNFS's dense momentum and MEST's drop scores are planned as they are recorded (match_flops against them)."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bidst.sparsify(model, opt, method, 0.8, total_steps=40, interval=5, **options)
    x, y = make_data()
    for step in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[step : step + 32]), y[step : step + 32]).backward()
        sp.step()
    plan = planned_flops(sp, sp.method, model_rows(model, x[:32]), 40)
    assert sp.costs and all(plan[phase] == pytest.approx(flops) for phase, flops in sp.costs.items())


def test_output_rows_of_a_sparse_linear_layer_are_those_of_its_dense_twin():
    """Rows of a Linear output are all positions but the last dim, for a SparseLinear too (3-D input: not dim 1)."""
    dense = nn.Linear(7, 5)
    sparse = SparseLinear.from_dense(dense, torch.rand(5, 7) < 0.5)
    out = torch.randn(2, 3, 5)
    assert sampled_rows(sparse, out) == sampled_rows(dense, out) == 6
    assert torch.equal(output_row_norms(sparse, out), output_row_norms(dense, out))


def test_held_out_pass_leaves_batch_norm_statistics_to_the_training_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    shifted = lambda j: (torch.randn(16, 6) + 5.0, torch.randint(0, 3, (16,)))  # noqa: E731
    sp = bidst.sparsify(model, opt, "bidst", 0.5, total_steps=20, learn_every=1, upper_data="holdout",
                        holdout_batches=shifted, filter_fn=lambda m, n: isinstance(m, nn.Linear))  # fmt: skip
    nn.functional.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
    stats = [b.clone() for b in model[1].buffers()]
    sp.step()
    assert sp.method._holdout_draws == 1
    assert all(torch.equal(a, b) for a, b in zip(model[1].buffers(), stats))


def test_recorded_costs_match_the_plan_and_match_flops_shortens():
    sp, model, _ = _train(steps=40, mask_interval=5, learn_every=2)
    x, _ = make_data(32)
    rows = model_rows(model, x)
    plan = planned_flops(sp, sp.method, rows, sp.total_steps)
    assert sp.costs["mask_learning"] == pytest.approx(plan["mask_learning"])
    assert "dense_grad" not in sp.costs  # the training loop counts dense gradients for every method alike
    assert plan["dense_grad"] > 0
    assert not sp.method._hooks  # capture hooks are gone after the learning phase
    assert planned_flops(sp, bidst.create_method("static"), rows, 40) == {"train": plan["train"]}
    rigl = sum(planned_flops(sp, bidst.create_method("rigl"), rows, 40).values())
    steps = matched_steps(sp, "rigl", rows)
    assert steps < sp.total_steps
    assert sum(planned_flops(sp, sp.method, rows, steps).values()) <= rigl
    assert sum(planned_flops(sp, sp.method, rows, steps + 1).values()) > rigl
    # against RigL as its own recipe may run it (updates every 2 steps, more dense gradients): more steps, same rule
    frequent = bidst.create_method("rigl", interval=2)
    pricier = sum(planned_flops(sp, frequent, rows, 40).values())
    assert pricier > rigl
    assert sum(planned_flops(sp, sp.method, rows, sp.total_steps).values()) <= pricier
    assert matched_steps(sp, frequent, rows) == sp.total_steps  # the whole run fits that budget


@pytest.mark.parametrize("sampling", ["uniform", "grad_norm"])
@pytest.mark.parametrize("module,shape", [(nn.Linear(7, 5), (16, 7)), (nn.Conv2d(3, 4, 3, padding=1), (4, 3, 5, 5))])
def test_row_subset_estimate_is_unbiased_and_exact_at_full_rows(module, shape, sampling):
    torch.manual_seed(0)
    x, g = _capture(module, torch.randn(shape))
    g = g.clone()
    g[0] = 0.0  # some rows have no gradient
    pos = torch.arange(module.weight.numel())
    full = sampled_weight_grad(module, x, g, pos)
    sp = types.SimpleNamespace(rng=torch.Generator().manual_seed(1))
    method = bidst.create_method("bidst", mask_rows=1.0, row_sampling=sampling)
    assert method.row_subset(sp, module, g) == (None, None)  # mask_rows 1: every row, the exact gradient
    method = bidst.create_method("bidst", mask_rows=0.25, row_sampling=sampling)
    draws = []
    for _ in range(3000):
        rows, weights = method.row_subset(sp, module, g)
        assert rows.numel() == method.sub_rows(sampled_rows(module, g)) < sampled_rows(module, g)
        draws.append(sampled_weight_grad(module, x, g, pos, rows, weights))
    mean = torch.stack(draws).mean(0)
    spread = torch.stack(draws).std(0) / math.sqrt(len(draws))
    assert torch.all((mean - full).abs() <= 5 * spread + 1e-6), "the row-subset estimate must be unbiased"
    assert not torch.allclose(draws[0], full, atol=1e-4)  # and it is an estimate, not the full sum


@pytest.mark.parametrize("sampling", ["uniform", "grad_norm"])
def test_sub_batched_mask_learning_costs_match_the_plan(sampling):
    sp, model, _ = _train(steps=40, mask_interval=5, learn_every=1, mask_rows=0.2, row_sampling=sampling,
                          explore_ratio=1.0)
    x, _ = make_data(32)
    rows = model_rows(model, x)
    plan = planned_flops(sp, sp.method, rows, sp.total_steps)
    assert sp.costs["mask_learning"] == pytest.approx(plan["mask_learning"])
    full = bidst.create_method("bidst", learn_every=1, explore_ratio=1.0)
    assert plan["mask_learning"] < 0.5 * planned_flops(sp, full, rows, sp.total_steps)["mask_learning"]
    assert any(bool((s["shadow"] != 0).any()) for s in sp.method._layers.values())


@pytest.mark.parametrize("refresh", [0.0, 0.5, 1.0])
def test_explore_refresh_replaces_that_share_of_the_candidates_not_grown(refresh):
    sp, _, _ = _train(steps=8, mask_interval=100, learn_every=1, explore_refresh=refresh)
    method = sp.method
    dense = {n: torch.randn(sp.params[n].shape) for n in sp.sparse_names()}
    before = {n: set(s["pos"][~sp.masks[n].view(-1)[s["pos"]]].tolist()) for n, s in method._layers.items()}
    record: list = []
    change = sp.change
    sp.change = lambda name, drop, grow, values=None: (record.append((name, set(grow.tolist()))), change(name, drop, grow, values))
    assert method.commit(sp, 1, dense)
    for name, grown in record:
        state = method._layers[name]
        after = set(state["pos"][~sp.masks[name].view(-1)[state["pos"]]].tolist())
        kept = len(before[name] & after)
        rest = len(before[name]) - len(grown)
        assert kept == rest - int(refresh * rest)  # the stale ones left, refilled to the same size
        assert len(after) == len(before[name]) == method.explore_size(sp, name)
    assert all(torch.equal(sp.masks[n].sum(), torch.tensor(sp.budgets[n])) for n in sp.masks)


def test_check_grad_steps_shadows_with_the_dense_gradient_and_costs_match_the_plan():
    sp, model, _ = _train(steps=30, mask_interval=5, learn_every=3, check_grad=True, explore_refresh=0.3)
    x, _ = make_data(32)
    rows = model_rows(model, x)
    plan = planned_flops(sp, sp.method, rows, sp.total_steps)
    assert sp.costs["mask_learning"] == pytest.approx(plan["mask_learning"])
    without = planned_flops(sp, bidst.create_method("bidst", learn_every=3, mask_interval=5), rows, sp.total_steps)
    assert plan["mask_learning"] > without["mask_learning"]
    # after step 1 (no learning step yet: learn_every 3) the candidates already carry −η·g of that step
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=30, seed=0, learn_every=3, check_grad=True)
    x, y = make_data(32)
    nn.functional.cross_entropy(model(x), y).backward()
    sp.step()
    for name, state in sp.method._layers.items():
        explore = ~sp.masks[name].view(-1)[state["pos"]]
        assert bool((state["shadow"][explore] != 0).all())


def test_consistency_ranks_a_steady_candidate_above_a_noisy_one_of_equal_shadow():
    sp, _, _ = _train(steps=10, mask_interval=100, learn_every=1, consistency=1.0)
    method = sp.method
    name = max(method._layers, key=lambda n: method._layers[n]["pos"].numel())
    state = method._layers[name]
    explore = (~sp.masks[name].view(-1)[state["pos"]]).nonzero().squeeze(1)
    assert explore.numel() >= 2
    steady, noisy = explore[0], explore[1]
    state["shadow"][steady] = state["shadow"][noisy] = 0.1
    state["psi"][steady] = state["psi"][noisy] = 0.0
    state["sq"][steady], state["sq"][noisy] = 10 * 0.01**2, 0.1**2  # ten steps of 0.01 against noise of net 0.1
    rank = method.ranking(sp, name)
    assert rank[steady] > rank[noisy]
    assert float(rank[steady] - rank[noisy]) == pytest.approx(0.5 * math.log(10), rel=1e-4)
    method.consistency = 0.0
    plain = method.ranking(sp, name)
    assert float(plain[steady]) == float(plain[noisy])  # without it they tie
    # recorded costs still equal the plan with the extra accumulator
    sp, model, _ = _train(steps=30, mask_interval=5, learn_every=2, consistency=1.0)
    rows = model_rows(model, make_data(32)[0])
    plan = planned_flops(sp, sp.method, rows, sp.total_steps)
    assert sp.costs["mask_learning"] == pytest.approx(plan["mask_learning"])
    assert any(bool((s["sq"] > 0).any()) for s in sp.method._layers.values())


def test_stats_count_the_swaps_that_the_scores_decided():
    control, _, _ = _train(steps=20, mask_interval=5, mask_lr=0.0)
    assert control.method.stats()["swap_decisions"] > 0 and control.method.stats()["set_by_scores"] == 0.0
    sp, _, _ = _train(steps=20, mask_interval=5)
    method = sp.method
    name = max(method._layers, key=lambda n: method._layers[n]["pos"].numel())
    state = method._layers[name]
    active = sp.masks[name].view(-1)[state["pos"]]
    act_idx, exp_idx = active.nonzero().squeeze(1), (~active).nonzero().squeeze(1)
    state["psi"].zero_()
    weakest = act_idx[method.ranking(sp, name).index_select(0, act_idx).argmin()]
    state["psi"][weakest] = 100.0  # the scores alone keep the weakest active: one drop of n differs
    drop, grow = method.swap_candidates(method.ranking(sp, name), act_idx, exp_idx, 3, 3)
    assert weakest not in drop
    before = (method._swaps, method._set_by_scores)
    method.record_decisions(drop, grow, *method.swap_candidates(method.ranking(sp, name, scores=False), act_idx, exp_idx, 3, 3))
    assert method._swaps - before[0] == 6
    assert method._set_by_scores - before[1] == 1
    assert 0.0 < method.stats()["set_by_scores"] <= 1.0


@pytest.mark.parametrize("side,kept", [("both", True), ("drop", True), ("grow", False)])
def test_scores_decide_one_side_only(side, kept):
    """A score that keeps the weakest active: obeyed where the scores pick the drops, ignored where they pick grows only."""
    sp, _, _ = _train(steps=8, mask_interval=1000, explore="random", scores_decide=side)
    method = sp.method
    name = max(method._layers, key=lambda n: method._layers[n]["pos"].numel())
    state = method._layers[name]
    act_idx = sp.masks[name].view(-1)[state["pos"]].nonzero().squeeze(1)
    state["psi"].zero_()
    weakest = act_idx[method.ranking(sp, name).index_select(0, act_idx).argmin()]
    where = int(state["pos"][weakest])
    state["psi"][weakest] = 100.0
    assert method.commit(sp, 1, None)
    assert bool(sp.masks[name].view(-1)[where]) is kept
    assert sp.budgets == sp.target_budgets()


def test_no_capture_without_grad_and_control_keeps_scores_zero():
    sp, model, _ = _train(steps=20, mask_interval=5, mask_lr=0.0)
    assert all(bool((s["psi"] == 0).all()) for s in sp.method._layers.values())
    assert any(bool((s["shadow"] != 0).any()) for s in sp.method._layers.values())  # candidates still learn
    with torch.no_grad():
        model(make_data(8)[0])
    assert not sp.method._captures and not sp.method._forward


class AttentionNet(nn.Module):
    """Self-attention (whose out_proj weight is used outside out_proj's forward), then a head used on even calls only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8 * 4, 3)
        self.spare = nn.Linear(8 * 4, 3)  # a branch some steps do not take
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.attn(x, x, x, need_weights=False)[0].flatten(1)
        return self.head(h) + (self.spare(h) if self.calls % 2 == 0 else 0)


def test_a_weight_used_outside_its_module_is_refused_and_an_unused_branch_is_fine():
    """Scores are learned from module forwards: nn.MultiheadAttention's out_proj weight got gradients while its
    forward never ran, and BiDST silently learned nothing for it."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    for keep in (lambda m, n: isinstance(m, nn.Linear), lambda m, n: isinstance(m, nn.Linear) and "out_proj" not in n):
        model = AttentionNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=20, filter_fn=keep, learn_every=1, mask_interval=4)
        for _ in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if "attn.out_proj.weight" in sp.masks:
                with pytest.raises(bidst.BidstError, match="layer 'attn.out_proj' got a gradient while its forward never ran"):
                    sp.step()
                break
            sp.step()
        else:
            assert sp.topology_changes > 0 and set(sp.masks) == {"head.weight", "spare.weight"}
            assert all(bool((s["psi"] != 0).any()) for s in sp.method._layers.values())


def test_bad_options_are_clear_errors():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(bidst.BidstError, match="hypergradient"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, hypergradient="second")
    with pytest.raises(bidst.BidstError, match="explore_ratio"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, explore_ratio=-1.0)
    with pytest.raises(bidst.BidstError, match=r"option 'mask_lr' of method 'bidst' must be in \[0.0, inf\), got inf"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, mask_lr=float("inf"))
    with pytest.raises(bidst.BidstError, match="mask_rows"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, mask_rows=1.5)
    with pytest.raises(bidst.BidstError, match="row_sampling"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, row_sampling="importance")
    with pytest.raises(bidst.BidstError, match="scores_decide"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, scores_decide="neither")
    with pytest.raises(bidst.BidstError, match="upper_data 'holdout' needs held-out batches: set holdout_size"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, upper_data="holdout")
    with pytest.raises(bidst.BidstError, match="not 'unrolled'"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, hypergradient="unrolled", **HOLDOUT)
    with pytest.raises(bidst.BidstError, match="use backend 'masked'"):
        bidst.sparsify(model, opt, "bidst", 0.8, total_steps=10, backend="sparse", **HOLDOUT)


def test_every_bidst_recipe_loads_with_valid_options():
    from pathlib import Path

    from bidst.config import load_config
    from bidst.recipe import check_config

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("bidst-*.yaml"))
    assert len(recipes) >= 9
    for path in recipes:
        cfg = load_config(path)
        assert cfg.method == "bidst" and cfg.match_flops == "rigl"
        bidst.create_method(cfg.method, **cfg.method_args)
        # matched against the baseline as its own recipe runs it (the same file name without "bidst-")
        baseline = load_config(path.with_name(path.name.removeprefix("bidst-")))
        assert (baseline.method, baseline.method_args) == (cfg.match_flops, cfg.match_flops_args), path.name
        check_config(load_config(path, ["match_flops="]))  # matching can be turned off (the baseline's options unused)


def test_training_recipe_matches_rigl_flops(tmp_path):
    from bidst.config import load_config
    from bidst.recipe import train

    args = ["model=mlp", "dataset=synthetic", "epochs=2", "batch_size=128", "val_size=200", "progress=false",
            "train_subset=1280", "method=bidst", "match_flops=rigl", "method_args.mask_interval=4",
            "method_args.learn_every=1", "threads=1"]
    summary = train(load_config(None, args), tmp_path / "run")
    assert 0 < summary["steps"] < 2 * 10  # fewer steps than the 2 epochs of 10 that RigL takes
    rigl = train(load_config(None, [*args[:7], "method=rigl", "threads=1"]), tmp_path / "rigl")
    assert rigl["steps"] == 20
    # both against dense training of the whole 2 epochs: the shortened run shows that it cost no more than RigL
    assert summary["flops"]["dense_reference"] == rigl["flops"]["dense_reference"] > 0
    assert summary["flops"]["relative_to_dense"] <= rigl["flops"]["relative_to_dense"]
    assert summary["method_costs"]["mask_learning"] > 0 and summary["topology_changes"] > 0
    assert summary["method_stats"]["swap_decisions"] > 0 and 0.0 <= summary["method_stats"]["set_by_scores"] <= 1.0
    assert summary["measured_sparsity"] == pytest.approx(0.9, abs=0.002)
    # against RigL as its own recipe runs it (match_flops_args = its method_args): updates every 2 steps cost
    # more dense gradients, so BiDST may train longer, and still costs no more than that RigL
    frequent = train(load_config(None, [*args[:7], "method=rigl", "method_args.interval=2", "threads=1"]),
                     tmp_path / "rigl2")  # fmt: skip
    longer = train(load_config(None, [*args, "match_flops_args.interval=2"]), tmp_path / "run2")
    assert summary["steps"] < longer["steps"] <= 20
    assert rigl["flops"]["relative_to_dense"] < frequent["flops"]["relative_to_dense"]
    assert longer["flops"]["relative_to_dense"] <= frequent["flops"]["relative_to_dense"]


def test_recorded_dense_gradients_count_the_changeable_layers_as_the_plan_does(tmp_path):
    """A layer kept dense, or at density 1, gets its whole gradient from the ordinary backward: RigL's extra dense
    gradient is counted over the layers it may change below density 1 only (as `planned_flops` does)."""
    import math

    from bidst.config import load_config
    from bidst.recipe import train

    args = ["model=mlp", "dataset=synthetic", "epochs=2", "batch_size=128", "val_size=200", "progress=false",
            "train_subset=1280", "method=rigl", "method_args.interval=4", "threads=1", "sparsity=0.1"]
    runs = {d: train(load_config(None, [*args, f"dense_first={d}"]), tmp_path / str(d)) for d in ("false", "true")}
    # every Linear has `batch` output rows: a run's dense gradients cost in proportion to the weights of its layers
    # below density 1 (at 10% sparsity ERK makes fc2 and fc3 dense, and with dense_first fc2 sparse again)
    counted = {d: sum(math.prod(layer["shape"]) for layer in run["layers"] if layer["density"] < 1)
               for d, run in runs.items()}  # fmt: skip
    assert [layer["density"] == 1 for layer in runs["false"]["layers"]] == [False, True, True]
    assert runs["false"]["flops"]["dense_grad"] > 0
    assert runs["true"]["flops"]["dense_grad"] == pytest.approx(
        counted["true"] / counted["false"] * runs["false"]["flops"]["dense_grad"])


def test_methods_that_move_budgets_count_every_changeable_layer_as_planned(tmp_path):
    """SNFS moves budget out of a layer ERK made dense, which then needs a dense gradient that its plan (at the
    starting budgets) cannot foresee: where budgets move, plan and record count every changeable layer."""
    from bidst.config import load_config
    from bidst.data import dataset_info
    from bidst.models import create_model
    from bidst.recipe import train

    args = ["model=mlp", "dataset=synthetic", "epochs=1", "batch_size=128", "val_size=200", "progress=false",
            "train_subset=1280", "method=snfs", "method_args.interval=2", "threads=1", "sparsity=0.1"]
    run = train(load_config(None, args), tmp_path / "snfs")
    info = dataset_info("synthetic")
    model = create_model("mlp", num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size)
    sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "snfs", 0.1, total_steps=run["steps"],
                        interval=2)
    assert sp.budgets["fc3.weight"] == sp.numel["fc3.weight"] and run["layers"][-1]["density"] < 1  # budget moved
    x = torch.zeros(128, info.in_channels, info.image_size, info.image_size)
    plan = planned_flops(sp, sp.method, model_rows(model, x), run["steps"])
    assert plan["dense_grad"] == pytest.approx(run["flops"]["dense_grad"])  # was 27% above a plan without fc3


def _ddp_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a file rendezvous, as in test_scale_out: a free TCP port picked beforehand can be taken meanwhile
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = TinyNet()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = bidst.sparsify(ddp, opt, "bidst", 0.8, total_steps=20, seed=0, mask_interval=5, learn_every=1,
                            hypergradient="unrolled")
        x, y = make_data(128, seed=rank)  # every rank sees other data
        for step in range(20):
            idx = torch.arange(32) + 32 * (step % 4)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
            sp.step(batch=(x[idx], y[idx]))
        mine = torch.cat([m.view(-1).float() for m in sp.masks.values()]
                         + [s["psi"] for s in sp.method._layers.values()])
        first = mine.clone()
        dist.broadcast(first, 0)
        torch.save({"same": torch.equal(mine, first), "changes": sp.topology_changes}, f"{out}.{rank}")
        dist.barrier()  # as bidst.distributed.launch does: tearing gloo down while the other rank uses it can abort
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_masks_and_scores(tmp_path):
    spawn(_ddp_worker, (str(tmp_path / "store"), str(tmp_path / "rank")), 2,
          lambda: all((tmp_path / f"rank.{rank}").exists() for rank in range(2)))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank.{rank}", weights_only=True)
        assert result["same"] and result["changes"] > 0


def test_allocate_scores_moves_budget_to_the_layer_whose_candidates_score_highest():
    sp, _, _ = _train(steps=8, mask_interval=1000, explore="random", allocate="scores")
    method = sp.method
    names = [n for n in method._layers if method.explore_count(sp, n) > 0]
    assert len(names) >= 2
    favoured = names[-1]
    total = sum(sp.budgets.values())
    before = dict(sp.budgets)
    for name in names:
        state = method._layers[name]
        explore = ~sp.masks[name].view(-1)[state["pos"]]
        state["psi"].zero_()
        state["psi"][explore] = 5.0 if name == favoured else -5.0
    assert method.commit(sp, 1, None)
    assert sum(sp.budgets.values()) == total  # only the allocation moves: the active count never does
    assert sp.budgets[favoured] > before[favoured]
    assert all(sp.budgets[n] < before[n] for n in names if n != favoured)
    sp.check_invariants()
    assert method.stats()["budget_moved"] == sp.budgets[favoured] - before[favoured]
    assert all(method.explore_count(sp, n) == method.explore_size(sp, n) for n in names)  # E refilled to ⌈ρ·k⌉


def test_allocate_scores_control_keeps_every_layer_budget():
    """With mask_lr 0 the scores are all 0: the control of allocate: scores is the plain control, budgets fixed."""
    plain, _, _ = _train(steps=20, mask_interval=5, mask_lr=0.0)
    pooled, _, _ = _train(steps=20, mask_interval=5, mask_lr=0.0, allocate="scores")
    assert pooled.topology_changes == plain.topology_changes > 0
    assert pooled.budgets == plain.budgets == plain.target_budgets()
    assert all(torch.equal(pooled.masks[n], plain.masks[n]) for n in plain.masks)


def test_allocate_scores_needs_forced_swaps():
    with pytest.raises(bidst.BidstError, match="allocate"):
        _train(steps=2, allocate="scores", swap="capped")


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_compiled_model_learns_scores_without_recompiling_every_step(backend):
    """The forward hooks were registered at the first learning step, after torch.compile had traced the model
    (which ignores hooks added later): with learn_every 2 no score was learned and the first learning step
    failed. Traced, their step-dependent condition recompiled the model at every step (8 graphs in 12 steps)."""
    graphs = []

    def counting(gm: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    model = torch.compile(net, backend=counting)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=40, backend=backend, mask_interval=3, learn_every=2)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    for _ in range(12):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    assert sp.topology_changes == 4
    assert all(bool((s["psi"] != 0).any()) for n, s in sp.method._layers.items() if n != "2.weight")
    assert len(graphs) <= 3


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_gradient_accumulation_counts_every_micro_batch(backend):
    """Two micro-batches before a step must learn and cost what one batch of both does: the forward record kept
    the last micro-batch only, so mask learning was undercounted (67,248 FLOPs against 87,648) and
    second_order_diag's Fisher used half the batch."""
    results = []
    for micro in (1, 2):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sp = bidst.sparsify(net, opt, "bidst", 0.8, total_steps=40, backend=backend, mask_interval=3, learn_every=1,
                            hypergradient="second_order_diag")
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
            opt.zero_grad()
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (nn.functional.cross_entropy(net(xs), ys) / micro).backward()
            sp.step()
        results.append((sp.costs["mask_learning"], [s["psi"].clone() for s in sp.method._layers.values()]))
    (cost_one, psi_one), (cost_two, psi_two) = results
    assert cost_two == cost_one
    for a, b in zip(psi_one, psi_two):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_discarded_backward_teaches_nothing_when_zero_grad_keeps_zeros(backend):
    """A backward discarded by zero_grad(set_to_none=False) (its .grad zeros, not None) must not reach the scores,
    shadow weights or costs: the sparse layers kept its candidate gradients, the forward record its rows."""
    results = []
    for discard in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        sp = bidst.sparsify(net, opt, "bidst", 0.8, total_steps=40, backend=backend, mask_interval=3, learn_every=1)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
            if discard:
                opt.zero_grad(set_to_none=False)
                nn.functional.cross_entropy(net(3 * x), (y + 1) % 4).backward()
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(net(x), y).backward()
            sp.step()
        results.append((sp.costs["mask_learning"], sp.method.state_dict()["layers"], dict(sp.masks)))
    (cost, layers, masks), (cost_d, layers_d, masks_d) = results
    assert cost_d == cost
    for name, state in layers.items():
        assert torch.equal(masks_d[name], masks[name])
        for key in ("psi", "shadow"):
            torch.testing.assert_close(layers_d[name][key], state[key], rtol=1e-5, atol=1e-7)


def test_the_usual_loop_does_not_read_the_gradient_in_forward_hooks(monkeypatch):
    """Checking for a discarded backward reads the whole gradient (a host sync on an accelerator): it must happen
    only where a finished backward's records wait, not at every learning step of a loop that zeroes after the
    forward (as `bidst train` does)."""
    from bidst.methods import bidst as bidst_module

    reads = []
    real = bidst_module.grad_cleared
    monkeypatch.setattr(bidst_module, "grad_cleared", lambda t: reads.append(1) or real(t))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = bidst.sparsify(net, opt, "bidst", 0.8, total_steps=40, mask_interval=3, learn_every=1)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    for _ in range(4):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        sp.step()
    assert sp.method._learn_steps == 4 and reads == []
    for _ in range(2):  # two micro-batches: the second forward finds the first's records
        nn.functional.cross_entropy(net(x), y).backward()
    assert len(reads) == 2  # one per layer


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_step_the_grad_scaler_skips_teaches_nothing(backend):
    """fp16 training starts with loss scales that overflow: the GradScaler skips those optimizer steps, but BiDST
    learned from their inf gradients, and its scores and shadow weights stayed NaN for the rest of training."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = bidst.sparsify(net, opt, "bidst", 0.8, total_steps=40, backend=backend, mask_interval=3, learn_every=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**110)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    costs = []
    for step in range(6):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(net(x), y) * (1e8 if step < 2 else 1.0)).backward()
        sp.step(scaler)
        costs.append(sp.costs.get("mask_learning", 0.0))
    assert scaler.get_scale() < 2.0**110  # the first steps overflowed and were skipped
    assert sp.method._learn_steps == 4 and sp.topology_changes == 2  # the four finite steps learned; 3 and 6 committed
    per_step = [b - a for a, b in zip([0.0, *costs], costs)]
    assert per_step[:2] == [0.0, 0.0] and len(set(per_step[2:])) == 1  # the skipped steps' forwards not counted later
    for state in sp.method._layers.values():
        assert bool(torch.isfinite(state["psi"]).all()) and bool(torch.isfinite(state["shadow"]).all())


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_dense_layer_keeps_exploring_after_its_first_commit(backend):
    """At density 1/(1+ρ) or more every inactive weight is a candidate; the first commit grew them all, the refill
    excluded the just-dropped ones, and the layer was left with no candidate and a frozen topology for good (ERK
    gives such densities to small layers: the MLP's fc3 at 95%, the CNN's conv1 at 98%)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = bidst.sparsify(net, opt, "bidst", 0.8, total_steps=40, backend=backend, mask_interval=3, learn_every=1)
    assert 0.5 < sp.target_densities["2.weight"] < 1
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    candidates, masks = [], [sp.masks["2.weight"].clone()]
    for step in range(1, 13):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        if sp.step():
            masks.append(sp.masks["2.weight"].clone())
        candidates.append(sp.method.explore_count(sp, "2.weight"))
    assert len(masks) == 5 and all(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))  # every commit swaps
    assert set(candidates) == {sp.method.explore_size(sp, "2.weight")}  # E stays full: all 65 inactive weights


def test_candidate_slots_do_not_depend_on_the_order_of_near_equal_gradients():
    """Two processes whose averaged dense gradient rounds differently (DDP against one process) pick the same
    candidates, but the gradient's order among them used to give their slots, hence their noise draws and ties,
    another order: masks then parted at the next commit. The slots follow the positions."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "bidst", 0.9, total_steps=100)
    name = "fc1.weight"
    state = sp.method._layers[name]
    inactive = (~sp.masks[name].view(-1)).nonzero().squeeze(1)
    grads = torch.zeros(sp.masks[name].numel())
    grads[inactive] = torch.rand(inactive.numel(), generator=torch.Generator().manual_seed(1)) + 1.0
    slots = []
    for order in (1.0, -1.0):  # the same candidates by magnitude, ranked in opposite orders among themselves
        sp.method.remove_entries(state, (~sp.masks[name].view(-1)[state["pos"]]).nonzero().squeeze(1))
        top = inactive[grads[inactive].argsort(descending=True)[: sp.method.explore_size(sp, name)]]
        shuffled = grads.clone()
        shuffled[top] = 10.0 + order * torch.linspace(0, 1e-3, top.numel())
        sp.method.add_candidates(sp, name, state["pos"][:0], {name: shuffled.view_as(sp.masks[name])})
        slots.append(state["pos"].clone())
    assert set(slots[0].tolist()) == set(slots[1].tolist())
    assert torch.equal(slots[0], slots[1])


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_copy_of_the_model_leaves_the_sparsifier_alone_and_the_model_pickles(backend, tmp_path):
    """BiDST's forward hooks were local functions: torch.save(model) failed, and a deepcopy of the model, trained
    beside it, fed the original Sparsifier's score records and costs through the copied hooks."""
    x, y = make_data(64)

    def run(with_copy: bool) -> tuple[dict[str, torch.Tensor], dict[str, float], nn.Module, bidst.Sparsifier]:
        torch.manual_seed(0)
        model = TinyNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = bidst.sparsify(model, opt, "bidst", 0.8, total_steps=12, backend=backend, mask_interval=4, learn_every=2)
        twin = copy.deepcopy(model)
        for step in range(6):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
            if with_copy:
                nn.functional.cross_entropy(twin(x[32:]), y[32:]).backward()
            sp.step()
        return {n: s["psi"].clone() for n, s in sp.method._layers.items()}, dict(sp.costs), model, sp

    alone, costs_alone, _, _ = run(False)
    beside, costs_beside, model, sp = run(True)  # sp alive: its hooks stay on the model
    assert costs_beside == costs_alone and costs_alone.get("mask_learning", 0) > 0
    assert all(torch.equal(alone[n], beside[n]) for n in alone)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert any(m._forward_hooks for m in loaded.modules())  # inert, until the copy's first forward drops them
    torch.testing.assert_close(loaded(x), model(x))
    assert not any(m._forward_hooks for m in loaded.modules())  # a copy then scripts and compiles unhooked
