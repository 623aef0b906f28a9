"""Real sparse compute for dynamic sparse training: sparse weights, CPU kernels, layers.

A sparse weight is a `SparseStructure` (the active positions of a (out, in) or
(out, in/groups, kh, kw) weight, CSR by output channel) plus a 1-D tensor of compact `values`,
one per active position, which is what the optimizer trains.

Functions (autograd-aware; gradients w.r.t. input, compact values and bias):

- `sparse_linear(x, values, structure, bias=None) -> Tensor`
- `sparse_conv2d(x, values, structure, bias=None, stride=1, padding=0, dilation=1) -> Tensor`
  (groups come from the structure; depthwise included)

On CPU float32 tensors they run Numba kernels (SpMM, transposed SpMM, SDDMM; direct convolution
over a batch-innermost layout, no im2col); on any other device or dtype, and for dilated
convolutions, they run the same computation as masked dense PyTorch ops (`uses_kernels(...)`
tells which path applies).

Layers: `SparseLinear.from_dense(nn.Linear, mask)`, `SparseConv2d.from_dense(nn.Conv2d, mask)`;
`to_sparse_modules(model, masks)` swaps them in for the weights named in a dict of bool masks
keyed "<module>.weight" and `to_dense_modules(model)` swaps back.

Topology changes: `structure.updated(dropped, grown) -> (new_structure, TopologyDelta)` merges
flat positions in O(nnz) without touching a dense tensor; `delta.remap(tensor)` carries values or
optimizer state over (grown slots start at zero). On a layer, `layer.update_topology(dropped,
grown)` does both for its values; `remap_optimizer_state(optimizer, layer.values, delta)` for the
optimizer.

Gradients at inactive positions (RigL growth, BiDST candidates):
`structure.request_sampled_grad(positions)` (flat positions, or None for all) makes the following
backward passes accumulate dL/dW at those positions into `structure.sampled_grad`;
`structure.take_sampled_grad()` returns it and ends the request.

Conversions to dense are on demand only: `structure.to_dense(values)`, `structure.mask()`,
`layer.dense_weight()`. A layer's state_dict stores its active positions ("active_positions").
"""

from ._common import uses_kernels
from .conv import sparse_conv2d
from .linear import sparse_linear
from .modules import (
    SparseConv2d,
    SparseLinear,
    SparseModule,
    remap_optimizer_state,
    to_dense_modules,
    to_sparse_modules,
)
from .structure import SparseStructure, TopologyDelta

__all__ = [
    "SparseConv2d",
    "SparseLinear",
    "SparseModule",
    "SparseStructure",
    "TopologyDelta",
    "remap_optimizer_state",
    "sparse_conv2d",
    "sparse_linear",
    "to_dense_modules",
    "to_sparse_modules",
    "uses_kernels",
]
