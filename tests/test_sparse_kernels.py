"""Sparse Linear / Conv2d kernels: outputs and every gradient equal the masked dense PyTorch reference.

The reference runs in float64 on the masked dense weight; the kernels run in float32 and must
agree within rtol 1e-4 / atol 1e-5 (inputs are scaled so that outputs are of order one). The
kernels are forced at every density here (DENSE_ABOVE = 1), dense weights included.
"""

from __future__ import annotations

import functools
import math
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bidst.sparse import (
    SparseStructure,
    _common,
    sparse_conv2d,
    sparse_linear,
    uses_kernels,
)
from bidst.sparse import _kernels_linear as KL
from bidst.sparse import conv as sparse_conv
from bidst.sparse import linear as sparse_linear_module

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True, scope="module")
def kernels_at_every_density():
    saved, _common.DENSE_ABOVE = _common.DENSE_ABOVE, 1.0
    yield
    _common.DENSE_ABOVE = saved
DENSITY = st.sampled_from([0.0, 0.1, 0.3, 0.7, 1.0])


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=ATOL)


def random_mask(shape: tuple[int, ...], density: float, gen: torch.Generator, empty_rows: bool) -> torch.Tensor:
    """Random mask at `density`; with `empty_rows`, every other output channel is left empty."""
    mask = torch.rand(shape, generator=gen) < density
    if empty_rows:
        mask[::2] = False
    return mask


def reference(fn, x, w, b, gy, mask):
    """Output and gradients (input, active weights, bias, dense weight) of the float64 masked dense op."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = (w.detach() * mask).double().requires_grad_(True)
    b64 = None if b is None else b.detach().double().requires_grad_(True)
    y = fn(x64, w64, b64)
    y.backward(gy.double())
    return y, x64.grad, w64.grad[mask], None if b is None else b64.grad, w64.grad


def check_against_reference(run, fn, x, w, b, mask, structure, gen, extra: torch.Tensor) -> None:
    """Runs `run` (the sparse op) and compares output and all gradients, sampled ones included."""
    values = structure.gather(w).requires_grad_(True)
    x = x.clone().requires_grad_(True)
    bias = None if b is None else b.clone().requires_grad_(True)
    structure.request_sampled_grad(extra)
    y = run(x, values, bias)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    y_ref, dx_ref, dv_ref, db_ref, dw_ref = reference(fn, x, w, b, gy, mask)
    close(y, y_ref)
    close(x.grad, dx_ref)
    close(values.grad, dv_ref)
    if b is not None:
        close(bias.grad, db_ref)
    close(structure.take_sampled_grad(), dw_ref.reshape(-1)[extra])


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 9),
    cin=st.integers(1, 40),
    cout=st.integers(1, 40),
    density=DENSITY,
    empty_rows=st.booleans(),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
    tiled=st.booleans(),
)
def test_linear_matches_masked_dense(batch, cin, cout, density, empty_rows, has_bias, seed, tiled):
    """With `tiled`, the kernels sweep the weight in column tiles of a few columns (as large layers do)."""
    m = sparse_linear_module
    sizes = (4, 8, 1) if tiled else (m.L2_BYTES, m.TILE_BYTES, m.TILE_MIN_SLOTS)
    with mock.patch.multiple(m, **dict(zip(("L2_BYTES", "TILE_BYTES", "TILE_MIN_SLOTS"), sizes))):
        check_linear(batch, cin, cout, density, empty_rows, has_bias, seed)


def check_linear(batch, cin, cout, density, empty_rows, has_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask((cout, cin), density, gen, empty_rows)
    w = torch.randn(cout, cin, generator=gen) / math.sqrt(cin)
    b = torch.randn(cout, generator=gen) if has_bias else None
    x = torch.randn(batch, cin, generator=gen)
    structure = SparseStructure.from_mask(mask)
    extra = torch.randint(0, cout * cin, (7,), generator=gen)
    check_against_reference(
        lambda x_, v, b_: sparse_linear(x_, v, structure, b_), F.linear, x, w, b, mask, structure, gen, extra
    )


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, True), (True, True, False), (False, False, True)])
def test_linear_any_subset_of_gradients(needs):
    """Only the requested gradients are computed (the others stay None), and those are right."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(24, 40, generator=gen) < 0.3
    structure = SparseStructure.from_mask(mask)
    w = torch.randn(24, 40, generator=gen) / math.sqrt(40)
    b = torch.randn(24, generator=gen)
    x = torch.randn(9, 40, generator=gen).requires_grad_(needs[0])
    values = structure.gather(w).requires_grad_(needs[1])
    bias = b.clone().requires_grad_(needs[2])
    y = sparse_linear(x, values, structure, bias)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    y_ref, dx_ref, dv_ref, db_ref, _ = reference(F.linear, x, w, b, gy, mask)
    close(y, y_ref)
    for tensor, ref, needed in ((x, dx_ref, needs[0]), (values, dv_ref, needs[1]), (bias, db_ref, needs[2])):
        if needed:
            close(tensor.grad, ref)
        else:
            assert tensor.grad is None


@st.composite
def conv_cases(draw):
    groups_kind = draw(st.sampled_from(["one", "two", "depthwise"]))
    cin_g = 1 if groups_kind == "depthwise" else draw(st.integers(1, 5))
    groups = {"one": 1, "two": 2, "depthwise": draw(st.integers(1, 6))}[groups_kind]
    cout = groups * draw(st.integers(1, 3 if groups_kind == "depthwise" else 5))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh = draw(st.integers(1, 3))
    sw = sh if draw(st.booleans()) else draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h = draw(st.integers(max(1, kh - 2 * ph), 11))
    w = draw(st.integers(max(1, kw - 2 * pw), 11))
    return {"cin": cin_g * groups, "cout": cout, "groups": groups, "k": (kh, kw), "stride": (sh, sw), "padding": (ph, pw), "hw": (h, w)}


@settings(max_examples=50, deadline=None)
@given(
    case=conv_cases(),
    batch_innermost=st.booleans(),
    batch=st.integers(1, 5),
    density=DENSITY,
    empty_rows=st.booleans(),
    has_bias=st.booleans(),
    seed=st.integers(0, 2**16),
    per_channel=st.booleans(),
)
def test_conv2d_matches_masked_dense(case, batch, density, empty_rows, has_bias, seed, batch_innermost, per_channel):
    """Inputs contiguous or batch-innermost (as a sparse layer before emits); outputs are batch-innermost.
    Both forward kernels (per output row, per output channel for small planes) are checked on every case."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case["cout"], case["cin"] // case["groups"], *case["k"])
    mask = random_mask(shape, density, gen, empty_rows)
    w = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    b = torch.randn(case["cout"], generator=gen) if has_bias else None
    x = torch.randn(batch, case["cin"], *case["hw"], generator=gen)
    if batch_innermost:
        x = x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    structure = SparseStructure.from_mask(mask, case["groups"])
    extra = torch.randint(0, mask.numel(), (7,), generator=gen)
    geo = {"stride": case["stride"], "padding": case["padding"]}

    def ref(x_, w_, b_):
        return F.conv2d(x_, w_, b_, groups=case["groups"], **geo)

    def run(x_, v, b_):
        y = sparse_conv2d(x_, v, structure, b_, **geo)
        assert y.permute(1, 2, 3, 0).is_contiguous()
        return y

    with mock.patch.object(sparse_conv, "PLANE_FLOATS", 2**62 if per_channel else 0):
        check_against_reference(run, ref, x, w, b, mask, structure, gen, extra)


def test_realistic_shapes_and_dense_sampled_grad():
    """A ResNet-like stride-2 conv and a wide Linear; a None request returns the whole dense gradient."""
    gen = torch.Generator().manual_seed(0)
    for shape, geo, x_shape in [
        ((32, 16, 3, 3), {"stride": 2, "padding": 1}, (16, 16, 16, 16)),
        ((16, 16, 3, 3), {"stride": 1, "padding": 1}, (8, 16, 16, 16)),
        ((16, 8, 3, 3), {"stride": 2, "padding": 1}, (4, 8, 32, 32)),
        ((16, 8, 1, 1), {"stride": 2, "padding": 0}, (4, 8, 31, 31)),
        ((64, 128), None, (32, 128)),
    ]:
        mask = torch.rand(shape, generator=gen) < 0.1
        w = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        x = torch.randn(x_shape, generator=gen)
        structure = SparseStructure.from_mask(mask)
        values = structure.gather(w).requires_grad_(True)
        structure.request_sampled_grad(None)
        if geo is None:
            y, fn = sparse_linear(x, values, structure), F.linear
        else:
            y, fn = sparse_conv2d(x, values, structure, **geo), functools.partial(F.conv2d, **geo)
        gy = torch.randn(y.shape, generator=gen) / math.sqrt(y.numel() / y.shape[1])  # keeps dW of order one
        y.backward(gy)
        y_ref, _, dv_ref, _, dw_ref = reference(fn, x, w, None, gy, mask)
        close(y, y_ref)
        close(values.grad, dv_ref)
        close(structure.take_sampled_grad(), dw_ref.reshape(-1))
        assert structure.sampled_grad is None and structure.sampled_positions is None


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, True), (True, True, False), (False, True, False)])
@pytest.mark.parametrize(
    "case",
    [
        ((8, 8, 3, 3), 1, 1, 1),  # same padding
        ((6, 4, 3, 3), 1, 0, 1),  # no padding
        ((6, 4, 2, 3), 1, 3, 1),  # padding beyond the kernel: some kernel rows and columns reach no output
        ((8, 4, 3, 3), 2, 1, 1),  # stride 2
        ((6, 1, 3, 3), 1, 1, 6),  # depthwise
    ],
)
def test_conv_any_subset_of_gradients(case, needs):
    """Input, weight and bias gradients each requested or not (e.g. no bias, as in ResNets)."""
    shape, stride, padding, groups = case
    need_x, need_w, has_bias = needs
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(shape, generator=gen) < 0.3
    w = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    x = torch.randn(5, shape[1] * groups, 13, 14, generator=gen).requires_grad_(need_x)
    b = torch.randn(shape[0], generator=gen).requires_grad_(True) if has_bias else None
    structure = SparseStructure.from_mask(mask, groups)
    values = structure.gather(w).requires_grad_(need_w)
    geo = {"stride": stride, "padding": padding}
    y = sparse_conv2d(x, values, structure, b, **geo)
    gy = torch.randn(y.shape, generator=gen)
    y.backward(gy)
    y_ref, dx_ref, dv_ref, db_ref, _ = reference(functools.partial(F.conv2d, groups=groups, **geo), x, w, b, gy, mask)
    close(y, y_ref)
    assert (x.grad is not None) == need_x and (values.grad is not None) == need_w
    if need_x:
        close(x.grad, dx_ref)
    if need_w:
        close(values.grad, dv_ref)
    if has_bias:
        close(b.grad, db_ref)


def test_sampled_grad_accumulates_until_taken():
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(8, 6, generator=gen) < 0.5
    structure = SparseStructure.from_mask(mask)
    values = structure.gather(torch.randn(8, 6, generator=gen)).requires_grad_(True)
    x = torch.randn(4, 6, generator=gen)
    assert structure.take_sampled_grad() is None
    structure.request_sampled_grad(torch.tensor([3, 10]))
    sparse_linear(x, values, structure).sum().backward()
    once = structure.sampled_grad.clone()
    sparse_linear(x, values, structure).sum().backward()
    close(structure.take_sampled_grad(), 2 * once)
    sparse_linear(x, values, structure).sum().backward()
    assert structure.sampled_grad is None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fallback_path_has_the_same_semantics(kind):
    """float64 tensors take the masked dense path (as CUDA tensors do): same values, grads, sampled grads."""
    gen = torch.Generator().manual_seed(2)
    shape = (6, 5) if kind == "linear" else (6, 5, 3, 3)
    mask = torch.rand(shape, generator=gen) < 0.4
    structure = SparseStructure.from_mask(mask)
    w = torch.randn(shape, generator=gen)
    x = torch.randn((3, 5) if kind == "linear" else (3, 5, 7, 7), generator=gen)
    extra = torch.tensor([0, 4, 17])
    results = []
    for dtype in (torch.float32, torch.float64):
        values = structure.gather(w).to(dtype).detach().requires_grad_(True)
        xi = x.to(dtype).detach().requires_grad_(True)
        assert uses_kernels(xi, values, structure=structure) == (dtype == torch.float32)
        structure.request_sampled_grad(extra)
        if kind == "linear":
            y = sparse_linear(xi, values, structure)
        else:
            y = sparse_conv2d(xi, values, structure, stride=2, padding=1)
        y.backward(torch.ones_like(y))
        results.append((y, xi.grad, values.grad, structure.take_sampled_grad()))
    for a, b in zip(*results):
        close(a, b)


def test_layouts_chain_without_copies_and_accept_any_strides():
    """A sparse_linear output (a transposed view) feeds the next one; channels-last conv input works."""
    gen = torch.Generator().manual_seed(3)
    s1 = SparseStructure.from_mask(torch.rand(16, 8, generator=gen) < 0.5)
    s2 = SparseStructure.from_mask(torch.rand(4, 16, generator=gen) < 0.5)
    v1 = s1.gather(torch.randn(16, 8, generator=gen)).requires_grad_(True)
    v2 = s2.gather(torch.randn(4, 16, generator=gen)).requires_grad_(True)
    x = torch.randn(5, 8, generator=gen)
    h = sparse_linear(x, v1, s1)
    assert h.t().is_contiguous()
    out = sparse_linear(torch.relu(h), v2, s2)
    ref = F.linear(torch.relu(F.linear(x, s1.to_dense(v1))), s2.to_dense(v2))
    close(out, ref)
    sc = SparseStructure.from_mask(torch.rand(4, 3, 3, 3, generator=gen) < 0.5)
    vc = sc.gather(torch.randn(4, 3, 3, 3, generator=gen))
    xc = torch.randn(2, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    close(sparse_conv2d(xc, vc, sc, padding=1), F.conv2d(xc, sc.to_dense(vc), padding=1))
    x3 = torch.randn(2, 3, 8, generator=gen)
    close(sparse_linear(x3, v1, s1), F.linear(x3, s1.to_dense(v1)))


def test_fused_backward_equals_the_two_kernels_it_replaces():
    """spmm_sddmm_t gives the input and weight gradients of spmm_t + sddmm_t, for inputs with 0 to 9 slots
    (the four-slot passes and every tail length), several rows per thread block included."""
    gen = torch.Generator().manual_seed(11)
    cin, cout, batch = 40, 12, 19
    mask = torch.zeros(cout, cin, dtype=torch.bool)
    for i in range(cin):  # input i gets i % 10 active weights
        mask[torch.randperm(cout, generator=gen)[: i % 10], i] = True
    s = SparseStructure.from_mask(mask)
    idx = s.by_input()
    values = torch.randn(s.nnz, generator=gen).numpy()
    dyt, xt = torch.randn(cout, batch, generator=gen).numpy(), torch.randn(cin, batch, generator=gen).numpy()
    dx_pair, dv_pair = np.empty((cin, batch), np.float32), np.empty(s.nnz, np.float32)
    KL.spmm_t(idx.ptr, 1, cin, idx.tcols, values[idx.perm], np.zeros(cin, np.float32), dyt, dx_pair)
    KL.sddmm_t(s.indptr, 1, cout, s.cols, dyt, xt, dv_pair)
    for per in (1, 7, cin):
        dx, dv = np.full((cin, batch), np.nan, np.float32), np.full(s.nnz, np.nan, np.float32)
        KL.spmm_sddmm_t(idx.ptr, per, idx.tcols, idx.perm, values, dyt, xt, dx, dv)
        np.testing.assert_allclose(dx, dx_pair, rtol=1e-5, atol=1e-5)  # rows of inputs without slots are zeroed
        np.testing.assert_allclose(dv, dv_pair, rtol=1e-5, atol=1e-5)  # every slot written once


def test_tile_pointers_split_each_row_by_column_tile():
    """Row i's slots reading column tile t are exactly tptr[i * nt + t] .. tptr[i * nt + t + 1]."""
    gen = torch.Generator().manual_seed(5)
    s = SparseStructure.from_mask(torch.rand(7, 50, generator=gen) < 0.4)
    nt = 4
    tptr = sparse_linear_module.tile_ptr(s.indptr, s.cols, 50, nt)
    for i in range(7):
        for t in range(nt):
            cols = s.cols[tptr[i * nt + t] : tptr[i * nt + t + 1]]
            expected = s.cols[s.indptr[i] : s.indptr[i + 1]]
            assert np.array_equal(cols, expected[(expected // 13) == t])
    before = s.nbytes()
    s.derived(("row_tiles", 1), lambda: s.indptr)  # one tile: the CSR pointer itself, not counted twice
    s.derived(("row_tiles", nt), lambda: tptr)
    assert s.nbytes() == before + tptr.nbytes  # kept tile pointers count as index memory
    with mock.patch.multiple(sparse_linear_module, L2_BYTES=512 * 1024, TILE_BYTES=128 * 1024):
        assert sparse_linear_module.column_tiles(1024, 1024, 104858, 256) == 8  # 90%, batch 256: 128 KB tiles
        assert sparse_linear_module.column_tiles(1024, 1024, 20972, 256) == 1  # 98%: too few slots a row
        assert sparse_linear_module.column_tiles(1024, 1024, 104858, 64) == 1  # a 256 KB input fits L2
    assert sparse_linear_module.l2_cache_bytes() >= 64 * 1024


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), layout=st.sampled_from(["contiguous", "transposed", "strided"]))
def test_transposed_copies_exactly(rows, cols, layout):
    """The tiled transpose (partial 8x8 tiles included) equals x.t() bit for bit, for any input strides."""
    x = torch.randn(rows, cols)
    if layout == "transposed":
        x = torch.randn(cols, rows).t()
    elif layout == "strided":
        x = torch.randn(rows, 2 * cols)[:, ::2]
    out = _common.transposed(x)
    assert out.is_contiguous() and torch.equal(out, x.t())


def test_bad_inputs_raise():
    s = SparseStructure.from_mask(torch.ones(4, 3, dtype=torch.bool))
    v = torch.zeros(12)
    with pytest.raises(ValueError):
        sparse_linear(torch.zeros(2, 5), v, s)
    with pytest.raises(ValueError):
        sparse_conv2d(torch.zeros(1, 3, 4, 4), v, s)
    sc = SparseStructure.from_mask(torch.ones(2, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        sparse_conv2d(torch.zeros(1, 3, 2, 2), torch.zeros(150), sc)
    with pytest.raises(ValueError):
        s.to_dense(torch.zeros(5))
    assert np.array_equal(s.mask().reshape(-1).nonzero().reshape(-1).numpy(), s.flat)


def test_dense_weights_take_the_dense_path(monkeypatch):
    s = SparseStructure.from_mask(torch.rand(8, 8, generator=torch.Generator().manual_seed(5)) < 0.5)
    x = torch.zeros(2, 8)
    assert uses_kernels(x, structure=s)
    monkeypatch.setattr(_common, "DENSE_ABOVE", 0.3)
    assert not uses_kernels(x, structure=s)
    # that path multiplies a batch-innermost input (a sparse layer's output) without copying it
    values = torch.randn(s.nnz, requires_grad=True)
    x = torch.randn(8, 5).t().requires_grad_(True)  # (batch 5, features 8), batch innermost
    bias = torch.randn(8)
    out = sparse_linear(x, values, s, bias)
    assert out.t().is_contiguous()  # batch innermost, as the kernels' outputs
    weight = s.to_dense(values)
    reference = torch.nn.functional.linear(x.detach().contiguous(), weight.detach(), bias)
    torch.testing.assert_close(out, reference)
    out.square().sum().backward()
    torch.testing.assert_close(x.grad, 2 * reference @ weight.detach())
    assert x.grad.t().is_contiguous()  # the layer before gets its output gradient in its own layout


def test_conv_empty_batch_runs_forward_and_backward_as_pytorch():
    """N = 0 made the input-gradient layout change ask reshape(-1, 0), which PyTorch refuses."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 4, 3, 3, generator=gen) < 0.2
    structure = SparseStructure.from_mask(mask)
    values = structure.gather(torch.randn(6, 4, 3, 3, generator=gen)).requires_grad_(True)
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    y = sparse_conv2d(x, values, structure, None, 1, 1)
    assert y.shape == (0, 6, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(values.grad, torch.zeros_like(values))


@pytest.mark.parametrize("stride,padding,message", [(1, -1, "padding at least 0"), (0, 1, "stride must be at least 1"),
                                                    (1, "same", "int or a pair")])  # fmt: skip
def test_conv_refuses_what_conv2d_refuses(stride, padding, message):
    """A negative padding gave a cropped result and stride 0 a ZeroDivisionError on the kernel path."""
    structure = SparseStructure.from_mask(torch.rand(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.2)
    with pytest.raises(ValueError, match=message):
        sparse_conv2d(torch.randn(2, 4, 5, 5), torch.randn(structure.nnz), structure, None, stride, padding)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cpu_autocast_computes_in_its_dtype_as_the_masked_ops(kind):
    """Under CPU autocast the kernels returned float32 where the masked ops (and the same layer above the density
    crossover) return bfloat16: a layer's output dtype changed during dense-to-sparse training."""
    gen = torch.Generator().manual_seed(0)
    shape = (6, 8) if kind == "linear" else (6, 4, 3, 3)
    mask = torch.rand(shape, generator=gen) < 0.2
    w = torch.randn(shape, generator=gen)
    structure = SparseStructure.from_mask(mask)
    values = structure.gather(w)
    x = torch.randn(2, 8) if kind == "linear" else torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", torch.bfloat16):
        if kind == "linear":
            y, expected = sparse_linear(x, values, structure, None), F.linear(x, w * mask)
        else:
            y, expected = sparse_conv2d(x, values, structure, None, 1, 1), F.conv2d(x, w * mask, padding=1)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
