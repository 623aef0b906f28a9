"""Real sparse compute for dynamic sparse training: sparse weights, CPU kernels, layers.

A sparse weight is a `SparseStructure` (the active positions of a (out, in) or
(out, in/groups, kh, kw) weight, CSR by output channel) plus a 1-D tensor of compact `values`,
one per active position, in the structure's slot order; the optimizer trains `values`.

Functions (autograd-aware; gradients w.r.t. input, compact values and bias):

- `sparse_linear(x, values, structure, bias=None) -> Tensor`
- `sparse_conv2d(x, values, structure, bias=None, stride=1, padding=0, dilation=1) -> Tensor`
  (zero padding; groups, depthwise included, come from the structure)

On CPU float32 tensors (`uses_kernels(...)`) they run Numba kernels: SpMM, transposed SpMM and
SDDMM with the batch innermost for Linear (the last two fused into one sweep when both gradients
are needed); direct convolution for Conv2d (no im2col) on
batch-innermost activations (N, C, H, W stored as C, H, W, N), the layout their outputs keep and
the dense twins of `layout.use_batch_innermost` pass on.
`set_threads(n)` sets torch's and the kernels' thread counts, in the order that keeps both.
On any other device or dtype, and for dilated convolutions, they compute the same thing as
masked dense PyTorch ops. The kernels run on torch's thread count (`torch.set_num_threads`).

Layers: `SparseLinear.from_dense(nn.Linear, mask)`, `SparseConv2d.from_dense(nn.Conv2d, mask)`;
`to_sparse_modules(model, masks)` swaps them in, in place, for the weights named in a dict of bool
masks keyed "<module>.weight" (the trainable weight becomes "<module>.values": build the optimizer
after the swap), and gives the model's dense layers their batch-innermost twins; `to_dense_modules(model)`
swaps the sparse layers back.

Topology changes: `structure.updated(dropped, grown) -> (new_structure, TopologyDelta)` merges flat
positions in O(nnz) without touching a dense tensor; `delta.remap(tensor, grown=0.0)` carries
values or optimizer state over. On a layer, `layer.update_topology(dropped, grown, grown_values=0.0)`
does both for its values and grad; `remap_optimizer_state(optimizer, layer.values, delta)` for the
optimizer's per-weight state.

Gradients at other positions (RigL growth, BiDST candidates): `structure.request_sampled_grad(positions)`
(flat positions; None for all, computed with PyTorch's dense kernel) makes the following backward
passes accumulate dL/dW at those positions into `structure.sampled_grad`;
`structure.take_sampled_grad()` returns it and ends the request (`layer.request_sampled_grad` /
`layer.take_sampled_grad` forward to the layer's structure).

Conversions to dense are on demand only: `structure.to_dense(values)`, `structure.mask()`,
`layer.dense_weight()`, `layer.to_dense_module()`. A layer's state_dict also stores its active
positions ("<module>.active_positions"), so loading a checkpoint restores the topology.
"""

from ._common import grad_cleared, set_threads, uses_kernels
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
    "grad_cleared",
    "remap_optimizer_state",
    "set_threads",
    "sparse_conv2d",
    "sparse_linear",
    "to_dense_modules",
    "to_sparse_modules",
    "uses_kernels",
]
