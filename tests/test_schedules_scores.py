"""Schedules and drop/grow selection (pure functions), and the ranking of float64 scores (SynFlow on a deep network)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bidst
from bidst.methods.common import allocate
from bidst.schedules import cosine_decay, cubic_sparsity, is_update_step, linear_decay
from bidst.scores import _top, _top_torch, drop_lowest, grow_highest, set_drop


def test_cosine_decay_endpoints_and_midpoint():
    assert cosine_decay(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_decay(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_decay(100, 0.3, 100) == pytest.approx(0.0)
    assert cosine_decay(150, 0.3, 100) == pytest.approx(0.0)


def test_linear_decay():
    assert linear_decay(25, 0.2, 100) == pytest.approx(0.15)
    assert linear_decay(200, 0.2, 100) == 0.0


def test_update_steps_every_interval_until_stop():
    steps = [s for s in range(1, 1001) if is_update_step(s, 100, 750)]
    assert steps == [100, 200, 300, 400, 500, 600, 700]


def test_cubic_sparsity():
    assert cubic_sparsity(0, 0.0, 0.9, 0, 100) == 0.0
    assert cubic_sparsity(100, 0.0, 0.9, 0, 100) == 0.9
    assert cubic_sparsity(50, 0.0, 0.9, 0, 100) == pytest.approx(0.9 - 0.9 * 0.125)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 200), data=st.data())
def test_drop_only_active_grow_only_eligible(n, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    mask = torch.rand(n, generator=g) < 0.5
    scores = torch.randn(n, generator=g)
    k_drop = data.draw(st.integers(0, int(mask.sum())))
    k_grow = data.draw(st.integers(0, int((~mask).sum())))
    drop = drop_lowest(scores, mask, k_drop)
    grow = grow_highest(scores, ~mask, k_grow)
    assert bool(mask[drop].all()) and not bool(mask[grow].any())
    assert len(set(drop.tolist())) == k_drop and len(set(grow.tolist())) == k_grow
    if k_drop:
        assert scores[drop].max() <= scores[mask].sort().values[k_drop - 1]


def test_ties_are_broken_by_index():
    scores = torch.zeros(10)
    eligible = torch.ones(10, dtype=torch.bool)
    assert grow_highest(scores, eligible, 3).tolist() == [0, 1, 2]


SCORE = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 3e38, float("inf"), float("-inf")])


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(SCORE, st.floats(-1e6, 1e6, width=32)), min_size=1, max_size=300), data=st.data())
def test_numba_selection_equals_the_torch_reference(values, data):
    """bidst._select (CPU) and the torch path pick the same positions in the same order, ties and infinities included."""
    scores = torch.tensor(values, dtype=torch.float32)
    eligible = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    if not eligible.any():
        eligible[0] = True
    k = data.draw(st.integers(1, int(eligible.sum())))
    for largest in (True, False):
        chosen = _top(scores, eligible, k, largest)
        assert torch.equal(chosen, _top_torch(scores, eligible, k, largest))
        assert chosen.numel() == k and bool(eligible[chosen].all())
        worst = scores[chosen].min() if largest else scores[chosen].max()
        rest = scores[eligible & ~torch.isin(torch.arange(len(values)), chosen)]
        assert bool((rest <= worst).all() if largest else (rest >= worst).all())


def test_float64_scores_are_ranked_in_their_own_range():
    """SynFlow's scores on deep networks pass float32's range (1e70 on ResNet-50) or fall below it: ranked as
    float32 they all became inf (or 0) and tied, so the lowest indices won."""
    every = torch.ones(4, dtype=torch.bool)
    huge = torch.tensor([1e300, 1e200, 1e250, 1e45], dtype=torch.float64)
    assert grow_highest(huge, every, 2).tolist() == [0, 2]
    assert drop_lowest(huge, every, 2).tolist() == [3, 1]
    tiny = torch.tensor([1e-300, 3e-300, 2e-300, 1e-50], dtype=torch.float64)
    assert grow_highest(tiny, every, 2).tolist() == [3, 1]


def test_synflow_keeps_every_layer_of_a_deep_network():
    """Twenty layers with large weights: the path products reach about 1e60, and every layer keeps weights (ranked
    as float32, the first layers were kept whole and the later ones emptied)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(20)])
    with torch.no_grad():
        for layer in model:
            layer.weight.uniform_(50.0, 150.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bidst.sparsify(model, opt, "synflow", 0.9, total_steps=10, init_batch=(torch.randn(4, 16), torch.zeros(4)))
    kept = [int(m.sum()) for m in sp.masks.values()]
    assert sum(kept) == round(0.1 * 20 * 256) and min(kept) > 0 and max(kept) < 256, kept


def test_too_many_positions_raises():
    with pytest.raises(ValueError):
        grow_highest(torch.zeros(4), torch.tensor([True, False, False, False]), 2)


def test_set_drop_splits_by_sign():
    w = torch.tensor([0.1, 0.5, -0.05, -0.9, 0.2, -0.3])
    mask = torch.ones(6, dtype=torch.bool)
    dropped = set(set_drop(w, mask, 2).tolist())
    assert dropped == {0, 2}  # the smallest positive and the negative closest to zero


@settings(max_examples=50, deadline=None)
@given(total=st.integers(0, 500), shares=st.lists(st.floats(0, 10), min_size=1, max_size=6),
       caps=st.lists(st.integers(0, 200), min_size=6, max_size=6))
def test_allocate_respects_caps_and_total(total, shares, caps):
    names = [f"l{i}" for i in range(len(shares))]
    alloc = allocate(total, dict(zip(names, shares)), dict(zip(names, caps)))
    assert all(0 <= alloc[n] <= c for n, c in zip(names, caps))
    assert sum(alloc.values()) == min(total, sum(caps[: len(names)]))
