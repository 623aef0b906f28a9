"""The three-line API in a training loop and on a model that bidst has never seen."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import Branchy
from torch import nn

import bidst


class NeverSeen(nn.Module):
    """A net of Conv1d, Conv2d and Linear layers with a skip connection, unknown to bidst."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.mix = nn.Conv1d(12, 12, 1)
        self.head = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x)).flatten(2)  # (B, 12, H*W)
        h = h + self.mix(h)
        return self.head(h.mean(2))


def test_user_loop_three_lines():
    torch.manual_seed(0)
    x = torch.randn(192, 3, 6, 6)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    model = NeverSeen()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier = bidst.sparsify(model, optimizer, method="rigl", sparsity=0.7, total_steps=150,
                                distribution="erk", interval=10)
    first = None
    for step in range(150):
        idx = torch.randint(0, 192, (32,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        sparsifier.step()
    assert set(sparsifier.masks) == {"stem.weight", "mix.weight", "head.0.weight", "head.2.weight"}
    assert sparsifier.topology_changes > 0
    assert abs(sparsifier.measured_sparsity() - 0.7) < 0.01
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y)
    assert float(final) < first * 0.7
    for r in sparsifier.report():
        assert int(torch.count_nonzero(dict(model.named_parameters())[r.name])) <= r.active


def test_filter_fn_chooses_layers():
    model = NeverSeen()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "static", 0.5, total_steps=10,
                        filter_fn=lambda module, name: isinstance(module, nn.Linear))
    assert set(sp.masks) == {"head.0.weight", "head.2.weight"}


def test_filter_selecting_nothing_is_an_error():
    model = NeverSeen()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        bidst.sparsify(model, opt, "static", 0.5, total_steps=10, filter_fn=lambda m, n: False)
    except bidst.BidstError as exc:
        assert "no layer to sparsify" in str(exc)
    else:
        raise AssertionError("expected a BidstError")


@pytest.mark.parametrize("kwargs,match", [
    ({"seed": "x"}, "seed must be an integer, got 'x'"),
    ({"total_steps": 2.5}, "total_steps must be an integer, got 2.5"),
    ({"total_steps": True}, "total_steps must be an integer, got True"),
    ({"total_steps": 0}, "total_steps must be a positive integer, got 0"),
])
def test_bad_step_counts_and_seeds_are_clear_errors(kwargs, match):
    model = NeverSeen()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(bidst.BidstError, match=match):
        bidst.sparsify(model, opt, "static", 0.5, **{"total_steps": 10, **kwargs})


def test_an_interval_in_epochs_without_steps_per_epoch_is_refused_at_sparsify():
    """MEST counts its interval in epochs by default: without steps_per_epoch that failed at the first step()."""
    model = NeverSeen()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(bidst.BidstError, match="counts its interval in epochs.*needs steps_per_epoch"):
        bidst.sparsify(model, opt, "mest", 0.5, total_steps=10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was masked
    assert bidst.sparsify(model, opt, "mest", 0.5, total_steps=10, interval_unit="steps", interval=2).step_count == 0


def test_lazy_and_meta_weights_are_clear_errors():
    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(bidst.BidstError, match="0.weight is not initialized yet .a lazy layer.: run one forward pass"):
        bidst.sparsify(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), "rigl", 0.5, total_steps=10)
    lazy(torch.randn(2, 5))
    assert bidst.sparsify(lazy, torch.optim.SGD(lazy.parameters(), lr=0.1), "rigl", 0.5, total_steps=10).masks
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(bidst.BidstError, match="0.weight is on the meta device"):
        bidst.sparsify(meta, torch.optim.SGD(meta.parameters(), lr=0.1), "rigl", 0.5, total_steps=10)


def test_unknown_layer_names_and_foreign_states_are_clear_errors():
    model = NeverSeen()
    sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.5, total_steps=10)
    known = ", ".join(sp.masks)
    for call in (lambda: sp.weight("head.0"), lambda: sp.active_weights("head.0"), lambda: sp.grad("head.0"),
                 lambda: sp.change("head.0", torch.tensor([0]), torch.tensor([1]))):
        with pytest.raises(KeyError, match=f"no sparsified weight 'head.0'; the sparsified weights are {known}"):
            call()
    with pytest.raises(bidst.BidstError, match="not a Sparsifier state_dict: it lacks masks, budgets, step"):
        sp.load_state_dict({"method": "rigl"})


def test_numpy_integers_count_as_integers():
    model = NeverSeen()
    sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.5,
                        total_steps=np.int64(10), seed=np.int32(3))
    assert sp.total_steps == 10 and type(sp.total_steps) is int


def test_sparsifying_a_sparse_backend_model_again_says_so():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bidst.sparsify(model, opt, "rigl", 0.5, total_steps=10, backend="sparse")
    with pytest.raises(bidst.BidstError, match="already sparse-backend twins"):
        bidst.sparsify(model, opt, "rigl", 0.5, total_steps=10, backend="sparse")


def test_repr_says_what_the_sparsifier_is_doing():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "set", 0.5, total_steps=10)
    model(torch.randn(4, 8)).sum().backward()
    sp.step()
    assert repr(sp) == ("Sparsifier(method='set', sparsity=0.5, layers=2, measured_sparsity=0.5000, step=1/10, "
                        "topology_changes=0, backend='masked')")
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", 0.9999999, total_steps=10)
    assert "sparsity=0.9999999," in repr(sp)  # ':g' printed 1



def _branchy_steps(method: str, backend: str, steps: int, **options: object) -> tuple[bidst.Sparsifier, dict]:
    """`steps` steps of Branchy (the middle layer unused at even steps); the masks before the first step."""
    torch.manual_seed(0)
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = bidst.sparsify(model, opt, method, 0.9, total_steps=100, backend=backend, **options)
    before = {n: m.clone() for n, m in sp.masks.items()}
    for _ in range(steps):
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sp.step()
    return sp, before


@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize("method", ["rigl", "granet"])
def test_gradient_growth_leaves_alone_a_layer_the_step_did_not_use(method, backend):
    """An update step whose loss skipped a layer has a zero gradient there: growth by gradient filled that
    layer's lowest free positions (a contiguous block of 73 in the probe). Now the layer grows nothing."""
    sp, before = _branchy_steps(method, backend, 4, interval=2)  # updates at steps 2 and 4, both without b
    assert sp.topology_changes == 2
    assert not bool((sp.masks["b.weight"] & ~before["b.weight"]).any())
    assert bool((sp.masks["a.weight"] & ~before["a.weight"]).any())


def test_bidst_explores_a_layer_at_random_where_the_step_gave_it_no_gradient():
    """BiDST's first candidates by gradient in a layer step 1 did not use were its lowest free positions."""
    torch.manual_seed(0)
    model = Branchy()
    model.calls = 1  # step 1 skips b
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "bidst", 0.9, total_steps=100, learn_every=1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
    sp.step()
    state = sp.method._layers["b.weight"]
    free = (~sp.masks["b.weight"].view(-1)).nonzero().squeeze(1)
    candidates = state["pos"][~sp.masks["b.weight"].view(-1)[state["pos"]]].sort().values
    assert candidates.numel() > 10 and not torch.equal(candidates, free[: candidates.numel()])


def test_a_compiled_model_names_its_layers_as_the_bare_model():
    """torch.compile's wrapper prefixed every name with `_orig_mod.`, so a Sparsifier state saved from a compiled
    model did not load into the same model uncompiled (and the reverse)."""
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sp = bidst.sparsify(torch.compile(bare), torch.optim.SGD(bare.parameters(), lr=0.1), "rigl", 0.5, total_steps=4)
    assert list(sp.masks) == ["0.weight", "2.weight"]
    state = sp.state_dict()
    del sp
    again = bidst.sparsify(bare, torch.optim.SGD(bare.parameters(), lr=0.1), "rigl", 0.5, total_steps=4, seed=1)
    again.load_state_dict(state)
    assert all(torch.equal(again.masks[n], state["masks"][n]) for n in state["masks"])
    with pytest.raises(bidst.BidstError, match="needs the model without its DataParallel wrapper"):
        wrapped = nn.Sequential(nn.Linear(8, 4))
        bidst.sparsify(torch.compile(nn.DataParallel(wrapped)), torch.optim.SGD(wrapped.parameters(), lr=0.1), "rigl",
                       0.5, total_steps=4, backend="sparse")


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")
def test_a_parametrized_weight_is_refused_not_left_dense():
    """A weight_norm/spectral_norm layer's weight is computed, not a Parameter: it was silently left dense, even
    when filter_fn picked it, so the model was less sparse than asked."""
    old_style = (nn.utils.spectral_norm, nn.utils.weight_norm)  # the old spectral_norm's weight did not train yet
    for wrap in (nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm, *old_style):
        model = nn.Sequential(wrap(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(bidst.BidstError, match="layer '0' computes its weight"):
            bidst.sparsify(model, opt, "rigl", 0.5, total_steps=4)
        sp = bidst.sparsify(model, opt, "rigl", 0.5, total_steps=4, filter_fn=lambda m, n: n != "0")
        assert list(sp.masks) == ["2.weight"]
        del sp


def test_what_a_filter_selects_but_bidst_cannot_mask_is_said_or_refused():
    """An LSTM's or attention's matrices (not named `weight`) were left dense without a word while the run reported
    its sparsity; a 1-D weight crashed ER (SET's default) and GMP pruned norm gains; a sparse-gradient embedding
    crashed at RigL's first update. Broad filters (`n != "fc"`) keep working: 1-D weights stay dense."""
    torch.manual_seed(0)
    for cell in (nn.LSTM(8, 8), nn.LSTMCell(8, 8), nn.MultiheadAttention(8, 2)):
        model = nn.ModuleDict({"cell": cell, "fc": nn.Linear(8, 2)})
        with pytest.warns(UserWarning, match=f"filter_fn selected {type(cell).__name__} 'cell', whose matrices .* stay dense"):
            sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.5, total_steps=4,
                                filter_fn=lambda m, n: True)
        assert sorted(sp.masks) == ["cell.out_proj.weight"] * isinstance(cell, nn.MultiheadAttention) + ["fc.weight"]
        del sp
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    for method in ("set", "gmp"):  # ER crashed on a 1-D weight; GMP's uniform distribution pruned the gains
        sp = bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), method, 0.5, total_steps=4,
                            filter_fn=lambda m, n: n != "3")
        assert list(sp.masks) == ["0.weight"] and bool((model[1].weight != 0).all())
        del sp
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a filter written for layers with a weight is not called where there is none
        lstm = nn.ModuleDict({"rnn": nn.LSTM(8, 8), "fc": nn.Linear(8, 2)})
        sp = bidst.sparsify(lstm, torch.optim.SGD(lstm.parameters(), lr=0.1), "rigl", 0.5, total_steps=4,
                            filter_fn=lambda m, n: m.weight.dim() == 2)
        del sp
    embedding = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Linear(8, 2))
    with pytest.raises(bidst.BidstError, match="'0' is an embedding with sparse gradients"):
        bidst.sparsify(embedding, torch.optim.SGD(embedding.parameters(), lr=0.1), "rigl", 0.5, total_steps=4,
                       filter_fn=lambda m, n: True)


def test_a_method_that_is_not_a_dataclass_is_one_line(monkeypatch):
    from bidst.methods.base import METHODS

    class Plain:
        name = "plain"
        default_distribution = "erk"

    monkeypatch.setattr(METHODS, "_items", {**METHODS._items, "plain": Plain})
    with pytest.raises(bidst.BidstError, match="method 'plain' is not a dataclass: declare it with @dataclass"):
        bidst.method_options("plain")
    model = nn.Linear(4, 4)
    with pytest.raises(bidst.BidstError, match="is not a dataclass"):
        bidst.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "plain", 0.5, total_steps=4)


def test_the_readmes_own_method_example_trains_on_both_backends(monkeypatch):
    """The README's example of a user's method runs as written and keeps the engine's guarantees."""
    from pathlib import Path

    from bidst.methods.base import METHODS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("**Your own method.**")[1].split("```python")[1].split("```")[0]
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    exec(code, {})  # noqa: S102 (the README's own text)
    for backend in ("masked", "sparse"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = bidst.sparsify(model, opt, "magrand", 0.9, total_steps=300, backend=backend, interval=10)
        for _ in range(20):
            loss = nn.functional.cross_entropy(model(torch.randn(32, 20)), torch.randint(0, 5, (32,)))
            opt.zero_grad()
            loss.backward()
            sp.step()
        assert sp.topology_changes == 2 and sp.measured_sparsity() == pytest.approx(0.9, abs=0.002)
        assert all(int(m.sum()) == sp.budgets[n] for n, m in sp.masks.items())
