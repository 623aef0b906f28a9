"""Batch-innermost activations: sparse convs emit them, the dense twins keep them, results are unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from bidst.sparse import SparseStructure, sparse_conv2d, to_sparse_modules
from bidst.sparse.layout import TWINS, is_batch_innermost, use_batch_innermost


def batch_innermost(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


@pytest.mark.parametrize("contiguous_input", [True, False])
def test_sparse_conv_emits_batch_innermost_and_returns_the_input_gradient_in_the_input_layout(contiguous_input):
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 4, 3, 3, generator=gen) < 0.2  # below DENSE_ABOVE: the kernels run
    structure = SparseStructure.from_mask(mask)
    values = structure.gather(torch.randn(6, 4, 3, 3, generator=gen)).requires_grad_(True)
    x = torch.randn(5, 4, 9, 9, generator=gen)
    x = (x if contiguous_input else batch_innermost(x)).requires_grad_(True)
    y = sparse_conv2d(x, values, structure, padding=1)
    assert is_batch_innermost(y) and not y._is_view()  # so an in-place ReLU after it is allowed
    (dx,) = torch.autograd.grad(y, x, torch.randn(y.shape, generator=gen))
    assert dx.is_contiguous() == contiguous_input and is_batch_innermost(dx) != contiguous_input


def test_a_dense_fallback_conv_keeps_a_batch_innermost_chain():
    """Above DENSE_ABOVE a sparse conv runs PyTorch's dense conv; a batch-innermost input still gets a batch-innermost output."""
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(6, 4, 3, 3, dtype=torch.bool)
    structure = SparseStructure.from_mask(mask)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    x = batch_innermost(torch.randn(5, 4, 9, 9, generator=gen))
    y = sparse_conv2d(x, structure.gather(w), structure, padding=1)
    assert is_batch_innermost(y) and not y._is_view()
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1))


TWIN_CASES = [
    lambda: nn.BatchNorm2d(4),
    lambda: nn.BatchNorm2d(4, affine=False, momentum=None),
    lambda: nn.ReLU(inplace=True),
    lambda: nn.ReLU6(inplace=True),
    lambda: nn.MaxPool2d(2),
    lambda: nn.MaxPool2d(3, 2, padding=1),
    lambda: nn.MaxPool2d(2, ceil_mode=True),
    lambda: nn.AdaptiveAvgPool2d(1),
    lambda: nn.AdaptiveAvgPool2d((2, 3)),
    lambda: nn.Flatten(),
]


@pytest.mark.parametrize("make", TWIN_CASES)
@pytest.mark.parametrize("training", [True, False])
def test_twins_match_pytorch_and_keep_batch_innermost_inputs_so(make, training):
    """Same output, input gradient and buffers (running statistics) as the PyTorch layer, for a batch-innermost input."""
    ref = make().train(training)
    twin = copy.deepcopy(ref)
    use_batch_innermost(twin)
    assert type(twin) is TWINS[type(ref)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 7, 7, generator=gen)
    x_ref = x.clone().requires_grad_(True)
    x_bi = batch_innermost(x).requires_grad_(True)
    # a non-leaf input, as inside a network (in-place ReLU cannot act on a leaf)
    y_ref, y_twin = ref(x_ref * 1.0), twin(x_bi * 1.0)
    torch.testing.assert_close(y_twin, y_ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn(y_ref.shape, generator=gen)
    y_ref.backward(gy)
    y_twin.backward(gy)
    torch.testing.assert_close(x_bi.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(ref.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(b, a)
    if not isinstance(ref, nn.AdaptiveAvgPool2d) or ref.output_size == 1:
        batch_major = y_twin.dim() == 2 and y_twin.t().is_contiguous()  # Flatten: (N, F) stored as (F, N)
        assert is_batch_innermost(y_twin) or batch_major


def test_use_batch_innermost_changes_classes_only():
    """Parameters, buffers and state dict keys stay the same objects; subclasses of the layers are left alone."""

    class MyNorm(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), MyNorm(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    params = list(model.parameters())
    keys = list(model.state_dict())
    use_batch_innermost(model)
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    assert type(model[0]) is nn.Conv2d and type(model[2]) is MyNorm
    assert [type(model[i]) for i in (1, 3, 4, 5)] == [TWINS[nn.BatchNorm2d], TWINS[nn.ReLU], TWINS[nn.Flatten], TWINS[nn.Linear]]
    with pytest.raises(ValueError, match="expected 4D input"):  # as nn.BatchNorm2d
        model[1](torch.randn(2, 4, 5))


def test_to_sparse_modules_gives_the_dense_layers_their_twins():
    """Called directly (a trained model made sparse for inference), to_sparse_modules left batch norm, ReLU and
    pooling on PyTorch's slow paths for the kernels' layout (a ResNet-20 forward at 95%: 45 ms, with the twins 30)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    mask = torch.rand(8, 8, 3, 3) < 0.5
    with torch.no_grad():
        model[1].weight.mul_(mask)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    to_sparse_modules(model, {"1.weight": mask})
    dense = (nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear)
    assert [type(model[i]) for i in range(2, 7)] == [TWINS[kind] for kind in dense]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(2, 9),
    channels=st.integers(1, 5),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    ceil_mode=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batch_innermost_max_pool_kernels_equal_pytorch_exactly(batch, channels, height, width, kernel, stride, pad,
                                                                ceil_mode, seed):
    """The Numba max pool of a batch-innermost input gives PyTorch's outputs and input gradients bit for bit, ties
    (few distinct values), NaN and -inf included: the same maximum wins each window and takes its gradient."""
    pad = tuple(min(p, k // 2) for p, k in zip(pad, kernel))
    assume(all(k <= s + 2 * p for k, s, p in zip(kernel, (height, width), pad)))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (batch, channels, height, width), generator=gen).float()
    special = torch.rand(x.shape, generator=gen)
    x[special < 0.05] = float("nan")
    x[special > 0.95] = -float("inf")
    pool = nn.MaxPool2d(kernel, stride, pad, ceil_mode=ceil_mode)  # VGG-19's pools are in ceil mode
    twin = copy.deepcopy(pool)
    use_batch_innermost(twin)
    x_ref = x.clone().requires_grad_(True)
    x_bi = batch_innermost(x).requires_grad_(True)
    assume(is_batch_innermost(x_bi))  # a (N, 1, 1, 1) tensor is contiguous in both layouts
    y_ref, y_twin = pool(x_ref), twin(x_bi)
    assert type(y_twin.grad_fn).__name__ == "_MaxPoolFnBackward"  # the kernels ran, not the max_pool3d fallback
    torch.testing.assert_close(y_twin, y_ref, rtol=0, atol=0, equal_nan=True)
    gy = torch.randn(y_ref.shape, generator=gen)
    y_ref.backward(gy)
    y_twin.backward(batch_innermost(gy))
    torch.testing.assert_close(x_bi.grad, x_ref.grad, rtol=0, atol=0)
    assert x_bi.grad.stride() == x_bi.stride()


def test_batch_innermost_max_pool_falls_back_where_the_kernels_do_not_apply():
    """Dilation and float64 take the max_pool3d view, with PyTorch's results; bad geometry gets PyTorch's error."""
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    for pool, inp in [(nn.MaxPool2d(3, dilation=2, ceil_mode=True), x.float()), (nn.MaxPool2d(2), x)]:
        twin = copy.deepcopy(pool)
        use_batch_innermost(twin)
        y = twin(batch_innermost(inp))
        assert type(y.grad_fn).__name__ != "_MaxPoolFnBackward"
        torch.testing.assert_close(y, pool(inp))
    twin = nn.MaxPool2d(3, padding=2)
    use_batch_innermost(twin)
    with pytest.raises(RuntimeError, match="pad should be"):
        twin(batch_innermost(x.float()))
