"""Layer-wise densities: uniform, ER and ERK (with the capacity re-solve) meet their formulas."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bidst import BidstError, layer_densities
from bidst.density import check_sparsity, layer_budgets

SHAPES = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "fc": (10, 512)}


def overall(shapes, dens):
    total = sum(math.prod(s) for s in shapes.values())
    return sum(dens[n] * math.prod(s) for n, s in shapes.items()) / total


def test_erk_matches_formula_without_capacity_issue():
    shapes = {"a": (64, 64, 3, 3), "b": (128, 64, 3, 3), "c": (256, 128, 3, 3)}
    dens = layer_densities(shapes, 0.1, "erk")
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    ratios = {n: dens[n] / raw[n] for n in shapes}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))
    assert overall(shapes, dens) == pytest.approx(0.1)


def test_erk_capacity_resolve_makes_overflowing_layers_dense_and_resolves_the_rest():
    # "small" overflows first; after the re-solve "fc" overflows too; "big" takes the rest
    shapes = {"small": (4, 2, 3, 3), "big": (256, 256, 3, 3), "fc": (10, 4096)}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    dens = layer_densities(shapes, 0.2, "erk")
    assert dens["small"] == 1.0 and dens["fc"] == 1.0
    expected_big = (0.2 * sum(numel.values()) - numel["small"] - numel["fc"]) / numel["big"]
    assert dens["big"] == pytest.approx(expected_big)
    assert overall(shapes, dens) == pytest.approx(0.2)


def test_er_ignores_kernel():
    shapes = {"a": (8, 4, 3, 3), "b": (8, 4, 5, 5)}
    dens = layer_densities(shapes, 0.3, "er")
    assert dens["a"] == pytest.approx(dens["b"])


def test_uniform_keeps_dense_layers_dense():
    dens = layer_densities(SHAPES, 0.1, "uniform", dense={"conv1", "fc"})
    assert dens == {"conv1": 1.0, "conv2": 0.1, "fc": 1.0}


def test_erk_with_forced_dense_layer_still_meets_target():
    dens = layer_densities(SHAPES, 0.6, "erk", dense={"fc"})
    assert dens["fc"] == 1.0
    assert overall(SHAPES, dens) == pytest.approx(0.6)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.9", True])
def test_bad_sparsity_is_a_clear_error(bad):
    with pytest.raises(BidstError, match="sparsity"):
        check_sparsity(bad)


def test_unknown_distribution_lists_known():
    with pytest.raises(BidstError, match="uniform, er, erk"):
        layer_densities(SHAPES, 0.1, "erx")


def test_too_low_density_for_dense_layers():
    with pytest.raises(BidstError, match="too low"):
        layer_densities({"a": (100, 100), "b": (10, 10)}, 0.001, "erk", dense={"a"})


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3, 5])), min_size=1, max_size=6
    ),
    density=st.floats(0.01, 1.0),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
)
def test_densities_are_valid_and_meet_target(shapes, density, distribution):
    named = {f"l{i}": (o, i_, k, k) for i, (o, i_, k) in enumerate(shapes)}
    dens = layer_densities(named, density, distribution)
    assert all(0.0 < d <= 1.0 + 1e-12 for d in dens.values())
    if distribution != "uniform":
        assert overall(named, dens) == pytest.approx(density, rel=1e-9)
    budgets = layer_budgets({n: math.prod(s) for n, s in named.items()}, dens)
    assert all(1 <= budgets[n] <= math.prod(named[n]) for n in named)
