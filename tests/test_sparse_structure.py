"""SparseStructure: CSR fields, the per-input-channel index, incremental updates and value remapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bidst.sparse import SparseStructure, sparse_conv2d, sparse_linear, uses_kernels

SHAPES = [(7, 5), (6, 4, 3, 3), (8, 1, 3, 3)]


def test_csr_fields_and_dense_round_trip():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 2, 3, 3, generator=gen) < 0.4
    mask[2] = False
    s = SparseStructure.from_mask(mask, groups=2)
    w = torch.randn(6, 2, 3, 3, generator=gen)
    v = s.gather(w)
    assert s.nnz == int(mask.sum()) == v.numel() and s.density == pytest.approx(s.nnz / mask.numel())
    assert s.indptr[2] == s.indptr[3]
    for row in range(6):
        expect = mask[row].reshape(-1).nonzero().reshape(-1).numpy()
        assert np.array_equal(s.cols[s.indptr[row] : s.indptr[row + 1]], expect)
    assert torch.equal(s.to_dense(v), w * mask)
    assert torch.equal(s.mask(), mask)
    assert s.in_channels == 4 and s.kernel_size == (3, 3) and s.row_size == 18


def test_input_index_lists_every_slot_by_input_channel():
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(6, 2, 3, 3, generator=gen) < 0.5
    s = SparseStructure.from_mask(mask, groups=3)
    idx = s.by_input()
    assert sorted(idx.perm.tolist()) == list(range(s.nnz))
    for c in range(s.in_channels):
        slots = idx.perm[idx.ptr[c] : idx.ptr[c + 1]]
        group = c // 2
        assert np.all(s.rows[slots] // 2 == group)
        assert np.all(s.cols[slots] // 9 == c - group * 2)
    assert np.array_equal(idx.rows, s.rows[idx.perm]) and np.array_equal(idx.cols, s.cols[idx.perm])


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    drop_frac=st.floats(0, 1),
    grow_frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_incremental_update_equals_rebuild(shape, density, drop_frac, grow_frac, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < density
    s = SparseStructure.from_mask(mask)
    active = torch.from_numpy(s.flat)
    inactive = (~mask).reshape(-1).nonzero().reshape(-1)
    drop = active[torch.randperm(active.numel(), generator=gen)[: int(drop_frac * active.numel())]]
    grow = inactive[torch.randperm(inactive.numel(), generator=gen)[: int(grow_frac * inactive.numel())]]
    new, delta = s.updated(drop, grow)
    expected = mask.clone().reshape(-1)
    expected[drop] = False
    expected[grow] = True
    rebuilt = SparseStructure.from_mask(expected.reshape(shape))
    for field in ("flat", "indptr", "rows", "cols"):
        assert np.array_equal(getattr(new, field), getattr(rebuilt, field))
    assert np.array_equal(new.by_input().perm, rebuilt.by_input().perm)
    # values: kept weights move with their position, grown ones take the given values
    w = torch.randn(shape, generator=gen)
    grown_values = torch.randn(grow.numel(), generator=gen)
    remapped = delta.remap(s.gather(w), grown_values)
    dense = (w * mask).reshape(-1)
    dense[drop] = 0
    dense[grow] = grown_values
    assert torch.equal(new.to_dense(remapped).reshape(-1), dense)


def test_update_rejects_invalid_changes():
    mask = torch.tensor([[True, False, True], [False, True, False]])
    s = SparseStructure.from_mask(mask)
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="dropped"):
        s.updated(torch.tensor([1]), empty)
    with pytest.raises(ValueError, match="dropped"):
        s.updated(torch.tensor([0, 0]), empty)
    with pytest.raises(ValueError, match="grown"):
        s.updated(empty, torch.tensor([2]))
    with pytest.raises(ValueError, match="grown"):
        s.updated(empty, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="grown"):
        s.updated(torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="lie in"):
        s.updated(empty, torch.tensor([6]))
    with pytest.raises(ValueError):
        SparseStructure((2, 3), np.array([3, 1]))
    with pytest.raises(TypeError):
        SparseStructure.from_mask(mask.int())


def test_kernels_agree_with_reference_before_and_after_an_update():
    gen = torch.Generator().manual_seed(4)
    for shape in [(12, 10), (8, 4, 3, 3)]:
        mask = torch.rand(shape, generator=gen) < 0.2
        s = SparseStructure.from_mask(mask)
        assert uses_kernels(structure=s)
        w = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        x = torch.randn((5, 10) if len(shape) == 2 else (3, 4, 6, 6), generator=gen)
        for _ in range(2):
            v = s.gather(w).requires_grad_(True)
            if len(shape) == 2:
                y, y_ref = sparse_linear(x, v, s), F.linear(x, w * s.mask())
            else:
                y, y_ref = sparse_conv2d(x, v, s, padding=1), F.conv2d(x, w * s.mask(), padding=1)
            torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
            y.sum().backward()
            wd = (w * s.mask()).requires_grad_(True)
            (F.linear(x, wd) if len(shape) == 2 else F.conv2d(x, wd, padding=1)).sum().backward()
            torch.testing.assert_close(v.grad, wd.grad[s.mask()], rtol=1e-4, atol=1e-5)
            active = torch.from_numpy(s.flat)
            inactive = (~s.mask()).reshape(-1).nonzero().reshape(-1)
            s, _ = s.updated(active[: active.numel() // 3], inactive[-(active.numel() // 3) :])


def test_derived_values_are_built_once_per_structure():
    """Kernel orderings kept on a structure are reused, and a topology change starts a new structure without them."""
    s = SparseStructure.from_mask(torch.tensor([[True, False], [False, True]]))
    calls = []
    build = lambda: calls.append(1) or len(calls)
    assert s.derived("k", build) == 1 and s.derived("k", build) == 1 and len(calls) == 1
    new, _ = s.updated(np.array([0]), np.array([1]))
    assert new.derived("k", build) == 2


def test_index_arrays_are_named_once_each_and_sum_to_nbytes():
    """`arrays` (what benchmarks/index_memory.py splits memory by) holds every index array once: a Linear input
    index shares `tcols` with its `rows`."""
    mask = torch.rand(16, 32, generator=torch.Generator().manual_seed(0)) < 0.2
    s = SparseStructure.from_mask(mask)
    assert set(s.arrays()) == {"flat", "indptr", "rows", "cols"}
    s.by_input()
    names = set(s.arrays())
    assert {"by_input.perm", "by_input.rows"} <= names and "by_input.tcols" not in names  # the same array as rows
    assert s.nbytes() == sum(a.nbytes for a in s.arrays().values())
