"""The masking invariants of design.md, for every registered method and several optimizers."""

from __future__ import annotations

import copy
import gc
import math

import numpy as np
import pytest
import torch
from conftest import OPTIMIZERS, TinyNet, fast_options, make_data
from torch import nn

import bidst
from bidst.backend import supports
from bidst.engine import all_finite

METHODS = bidst.list_methods()
DYNAMIC = {"set", "rigl", "snfs", "mest", "granet", "gmp", "bidst"}
CONSTANT_BUDGET = {"static", "set", "rigl", "mest", "snip", "grasp", "synflow", "bidst"}
STEPS = 40


def run(method: str, opt_name: str, seed: int = 0, steps: int = STEPS, check=None, backend: str = "masked"):
    torch.manual_seed(seed)
    model = TinyNet()
    opt = OPTIMIZERS[opt_name](model.parameters())
    x, y = make_data()
    sp = bidst.sparsify(model, opt, method, 0.8, total_steps=steps, seed=seed, init_batch=(x[:32], y[:32]),
                        backend=backend, **fast_options(method))
    sp.initial_budgets = dict(sp.budgets)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        before = {n: m.clone() for n, m in sp.masks.items()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        sp.step()
        if check:
            check(sp, opt, before)
    return sp, model


def _state_tensors(sp, opt, name):
    """Per-weight optimizer state of layer `name`, as dense tensors under either backend."""
    param, layer = sp.params[name], sp.sparse_layers.get(name)
    values = [v for v in opt.state.get(param, {}).values() if torch.is_tensor(v) and v.shape == param.shape]
    return values if layer is None else [layer.structure.to_dense(v) for v in values]


CASES = [
    (method, opt_name, backend)
    for method in METHODS
    for opt_name, backend in [("sgd", "masked"), ("sgd_nesterov", "masked"), ("adam", "masked"), ("adamw", "masked"),
                              ("sgd", "sparse")]
    if supports(bidst.methods.METHODS.get(method), backend)  # unsupported pairs are refused (test_backend.py)
]


@pytest.mark.parametrize("method,opt_name,backend", CASES)
def test_invariants_after_every_step(method, opt_name, backend, one_thread):

    def check(sp, opt, before):
        for name in sp.params:
            mask, param = sp.masks[name], sp.weight(name)
            assert mask.dtype == torch.bool and mask.device == param.device
            # inactive weights are exactly zero (weight decay, AdamW decay and momentum revive nothing)
            assert torch.count_nonzero(param[~mask]) == 0, name
            # every layer holds exactly its budget
            assert int(mask.sum()) == sp.budgets[name], name
            grown = mask & ~before[name]
            for state in _state_tensors(sp, opt, name):
                # optimizer state is zero at inactive positions and starts at zero for regrown ones
                assert torch.count_nonzero(state[~mask]) == 0, name
                assert torch.count_nonzero(state[grown]) == 0, name
            # regrown weights start at zero
            assert torch.count_nonzero(param[grown]) == 0, name

    sp, _ = run(method, opt_name, check=check, backend=backend)
    if method in CONSTANT_BUDGET:
        assert sp.budgets == sp.initial_budgets == sp.target_budgets()
    if method == "snfs":
        assert sum(sp.budgets.values()) == sum(sp.target_budgets().values())
    if method in ("gmp", "granet"):
        assert sp.budgets == sp.target_budgets()  # the schedule has reached its target
    assert sp.measured_sparsity() == pytest.approx(0.0 if method == "dense" else 0.8, abs=0.01)


@pytest.mark.parametrize("method", METHODS)
def test_dst_methods_change_masks_static_ones_do_not(method):
    changes = []

    def check(sp, opt, before):
        changes.append(any(bool((sp.masks[n] != before[n]).any()) for n in sp.masks))

    sp, _ = run(method, "sgd", check=check)
    if method in DYNAMIC:
        assert any(changes) and sp.topology_changes == sum(changes)
    else:
        assert not any(changes) and sp.topology_changes == 0


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_masks_other_seed_other_masks(method):
    a, _ = run(method, "sgd", seed=1, steps=20)
    b, _ = run(method, "sgd", seed=1, steps=20)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    if method != "dense":
        c, _ = run(method, "sgd", seed=2, steps=20)
        assert any(not torch.equal(a.masks[n], c.masks[n]) for n in a.masks)


def test_nesterov_and_dense_first_last():
    torch.manual_seed(0)
    model = TinyNet()
    opt = OPTIMIZERS["sgd_nesterov"](model.parameters())
    sp = bidst.sparsify(model, opt, "rigl", 0.5, total_steps=10, dense_first=True, dense_last=True, interval=2)
    assert bool(sp.masks["conv1.weight"].all()) and bool(sp.masks["fc2.weight"].all())
    x, y = make_data(64)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    assert bool(sp.masks["conv1.weight"].all()) and bool(sp.masks["fc2.weight"].all())
    assert sp.topology_changes > 0


def test_unknown_method_and_option_errors():
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(bidst.BidstError, match="unknown method 'rigel'; known: .*rigl"):
        bidst.sparsify(model, opt, "rigel", 0.9, total_steps=10)
    with pytest.raises(bidst.BidstError, match="unknown option.*drop_frac.*drop_fraction"):
        bidst.sparsify(model, opt, "rigl", 0.9, total_steps=10, drop_frac=0.3)
    with pytest.raises(bidst.BidstError, match="sparsity must be in"):
        bidst.sparsify(model, opt, "rigl", 1.0, total_steps=10)
    with pytest.raises(bidst.BidstError, match="init_batch"):
        bidst.sparsify(model, opt, "snip", 0.9, total_steps=10)


class TiedLM(nn.Module):
    """An embedding tied to the classifier: the tensor is named after the sparsified layer (head), not its first owner."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.hid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hid(self.emb(tokens))))


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_pruning_at_init_scores_tied_and_compiled_models(method):
    """They scored a copy by parameter name: a tied weight named after another layer, or a compiled model's
    `_orig_mod.` names, raised KeyError. A compiled model gets the masks of the bare one."""
    if method != "synflow":  # synflow's all-ones input cannot feed token ids: refused
        tokens = torch.randint(0, 50, (32,))
        model = TiedLM()
        sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), method, 0.5, total_steps=10,
                            init_batch=(tokens, tokens.flip(0)))
        assert set(sp.masks) == {"hid.weight", "head.weight"} and sp.measured_sparsity() == pytest.approx(0.5, abs=0.01)
        assert model.emb.weight is model.head.weight and bool((model.emb.weight[~sp.masks["head.weight"]] == 0).all())
    else:
        model = TiedLM()
        with pytest.raises(bidst.BidstError, match="synflow feeds the model an all-ones float input"):
            bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), method, 0.5, total_steps=10,
                           init_batch=(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)))
    x, y = make_data()
    masks = []
    for wrap in (lambda m: m, torch.compile):
        torch.manual_seed(0)
        model = TinyNet()
        sp = bidst.sparsify(wrap(model), torch.optim.SGD(model.parameters(), lr=0.1), method, 0.8, total_steps=10,
                            init_batch=(x, y))
        masks.append(sp.masks)
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


@pytest.mark.parametrize("steps_per_epoch", [-3, 0, True, 2.5, "10"])
def test_steps_per_epoch_must_be_a_positive_integer(steps_per_epoch):
    """-3 and True were taken (an interval of one epoch then changed the topology at every step), "10" crashed."""
    model = TinyNet()
    with pytest.raises(bidst.BidstError, match="steps_per_epoch must be"):
        bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.8, total_steps=10,
                       steps_per_epoch=steps_per_epoch)


@pytest.mark.parametrize("sparsity", [np.float32(0.8), torch.tensor(0.8), np.float64(0.8), torch.tensor([0.8]),
                                      np.array(0.8)])
def test_sparsity_may_be_a_numpy_scalar_or_a_one_element_tensor(sparsity):
    model = TinyNet()
    sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "rigl", sparsity, total_steps=10)
    assert sp.sparsity == 0.8  # float32's 0.8 read as 0.8, not 0.800000011920929


def test_an_unscale_before_step_names_prepare_gradients():
    """PyTorch's AMP clipping recipe (scaler.unscale_, clip, step) failed with PyTorch's own RuntimeError."""
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "rigl", 0.8, total_steps=10)
    scaler = torch.amp.GradScaler("cpu")
    x, y = make_data()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(bidst.BidstError, match=r"already unscaled.*prepare_gradients\(scaler\).*scaler.update\(\)"):
        sp.step(scaler)


def test_a_resumed_pruning_at_init_run_keeps_its_scored_layer_targets():
    """SNIP's layer targets come from its scoring batch: a resumed process scoring another batch reported its own
    targets beside the checkpoint's active counts."""
    x, y = make_data()
    runs = []
    for batch in (slice(0, 32), slice(32, 64)):
        torch.manual_seed(0)
        model = TinyNet()
        runs.append(bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "snip", 0.8, total_steps=10,
                                   init_batch=(x[batch], y[batch])))
    first, resumed = runs
    assert resumed.target_densities != first.target_densities
    resumed.model.load_state_dict(first.model.state_dict())
    resumed.load_state_dict(first.state_dict())
    assert resumed.target_densities == first.target_densities
    assert [r.active for r in resumed.report()] == [r.active for r in first.report()]


def test_state_dict_roundtrip_and_mismatch():
    sp, model = run("snfs", "sgd", steps=12)
    state = sp.state_dict()
    other_model = TinyNet()
    other = bidst.sparsify(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), "snfs", 0.8,
                           total_steps=12, seed=5, interval=5)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(state)
    assert all(torch.equal(other.masks[n], sp.masks[n]) for n in sp.masks)
    assert other.step_count == sp.step_count and other.budgets == sp.budgets
    wrong = nn.Sequential(nn.Linear(3, 3))
    wrong_sp = bidst.sparsify(wrong, torch.optim.SGD(wrong.parameters(), lr=0.1), "snfs", 0.8, total_steps=5)
    with pytest.raises(bidst.BidstError, match="do not match"):
        wrong_sp.load_state_dict(state)
    for options, message in (({"sparsity": 0.9}, "sparsity 0.8, not 0.9"),
                             ({"distribution": "uniform"}, "distribution 'erk', not 'uniform'")):  # fmt: skip
        args = {"sparsity": 0.8, "total_steps": 12, "interval": 5, **options}
        fresh = TinyNet()
        elsewhere = bidst.sparsify(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), "snfs", **args)
        with pytest.raises(bidst.BidstError, match=message):  # its budgets would contradict this sparsifier's targets
            elsewhere.load_state_dict(state)


def test_report_lists_target_and_actual():
    sp, _ = run("rigl", "sgd", steps=10)
    rows = sp.report()
    assert [r.name for r in rows] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    for r in rows:
        assert r.active == int(sp.masks[r.name].sum())
        assert r.density == pytest.approx(r.target_density, abs=1.0 / r.numel + 1e-9)


@pytest.mark.parametrize(
    "values,finite",
    [
        ([1.0, -2.0, 0.0], True),
        ([3e38, 3e38, 3e38], True),  # the sum overflows, the entries are finite
        ([1.0, float("inf")], False),
        ([float("inf"), float("-inf")], False),
        ([0.0, float("nan")], False),
    ],
)
def test_all_finite_is_exact_where_the_sum_overflows(values, finite):
    assert all_finite([torch.tensor(values)]) is finite
    assert all_finite([torch.ones(3), torch.tensor(values), torch.zeros(0)]) is finite  # one check over several
    assert all_finite([])


@pytest.mark.parametrize("method", ["rigl", "bidst"])  # bidst: its forward hooks must not keep the Sparsifier alive
@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_model_is_sparsified_once_at_a_time(backend, method):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = bidst.sparsify(model, opt, method, 0.8, total_steps=10, backend=backend)
    x, y = make_data()
    nn.functional.cross_entropy(model(x), y).backward()
    first.step()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(bidst.BidstError, match="already sparsified by another Sparsifier"):
        bidst.sparsify(model, opt, "set", 0.5, total_steps=10)  # it would mask the weights a second time
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    del first
    gc.collect()
    assert not any(m._forward_hooks for m in model.modules())  # the method's hooks went with it
    if backend == "masked":  # once the first is gone, its model may be sparsified anew
        assert bidst.sparsify(model, opt, "set", 0.5, total_steps=10).measured_sparsity() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("epochs", [6, 12, 13])
def test_mest_ems_ends_at_the_target_sparsity(epochs):
    """EM&S starts below the target sparsity and must reach it at ems_end_fraction of training. It pruned only at
    mutations (every 5 epochs until 75% of training): with none between the end step and the stop, a run ended at
    0.80 (6 epochs: no mutation at all) or 0.8995 (12 epochs) instead of 0.9."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    steps_per_epoch = 10
    sp = bidst.sparsify(model, opt, "mest", 0.9, total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                        variant="ems")
    assert sp.budgets != sp.target_budgets()  # it starts denser
    x, y = make_data()
    for step in range(epochs * steps_per_epoch):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        sp.step()
        if step + 1 >= sp.method.ems_end(sp):
            assert sp.budgets == sp.target_budgets(), step + 1
    assert all(int(m.sum()) == sp.budgets[n] for n, m in sp.masks.items())


def test_granet_regenerates_on_a_cosine_over_the_whole_run(monkeypatch):
    """GraNet's code decays the regeneration fraction over the whole run, so its last pruning steps still
    regenerate; decayed over the pruning window instead, the fraction reached 0 at the window's end."""
    from bidst.methods import gradual

    fractions = {}
    original = gradual.prune_and_grow

    def spy(sp, fraction, *args, **kwargs):
        fractions[sp.step_count] = fraction
        return original(sp, fraction, *args, **kwargs)

    monkeypatch.setattr(gradual, "prune_and_grow", spy)
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = bidst.sparsify(model, opt, "granet", 0.9, total_steps=40, interval=5)
    x, y = make_data()
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        sp.step()
    assert sorted(fractions) == [5, 10, 15, 20, 25, 30]  # the window ends at 0.75 * 40
    for step, fraction in fractions.items():
        assert fraction == pytest.approx(0.25 * (1 + math.cos(math.pi * step / 40)))
    assert fractions[30] > 0.07


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_rolling_back_in_process_then_redoing_a_step_repeats_it(backend):
    """Loading the state saved after step 4 into the same Sparsifier and redoing step 5 (an update step) gives step
    5 again: the Sparsifier thought step 5's gradients were prepared already and gave RigL no dense gradient."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bidst.sparsify(model, opt, "rigl", 0.8, total_steps=20, interval=5, backend=backend)
    x, y = make_data()

    def step(i: int) -> bool:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        return sp.step()

    for i in range(4):
        step(i)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))
    assert step(4)  # step 5 changes the topology
    after = copy.deepcopy((model.state_dict(), sp.state_dict()["masks"]))
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sp.load_state_dict(saved[2])
    assert step(4)
    for key, value in after[0].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(torch.equal(sp.state_dict()["masks"][n], m) for n, m in after[1].items())
