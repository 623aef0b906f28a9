"""Weight gradients at chosen positions only (SDDMM): what BiDST's mask learning pays instead of a dense gradient.

`sampled_weight_grad` takes a layer's input and output gradient, as captured from the ordinary
forward and backward pass, and returns dL/dW at a list of flat weight positions, at a cost of
2·(output positions)·(batch) FLOPs per position. It is pure torch; a sparse backend can serve the
same call with a kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BidstError
from .sparse import SparseLinear

LINEAR = (nn.Linear, SparseLinear)  # output features last; every other layer here has channels at dim 1
# each weight of a transposed convolution meets every input position (of an ordinary one, every output position)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

CHUNK_ELEMENTS = {"cpu": 1 << 18}  # elements of one gathered block (positions x row length): cache-sized on CPU
DEVICE_CHUNK_ELEMENTS = 1 << 25  # on accelerators: large blocks, few kernel launches
LONG_ROW = 4096  # from this row length on, one dot product per position beats gathering copies


def _row_products(
    left: torch.Tensor, right: torch.Tensor, rows_left: torch.Tensor, rows_right: torch.Tensor
) -> torch.Tensor:
    """sum_j left[rows_left[p], j] * right[rows_right[p], j] for every p (float32).

    Short rows are gathered in cache-sized chunks; long rows (convolutions) are read in place, one
    dot product per position, which moves far less memory than gathering them.
    """
    left, right = left.float(), right.float()
    if left.shape[1] >= LONG_ROW and left.device.type == "cpu":
        pairs = zip(rows_left.tolist(), rows_right.tolist())
        return torch.stack([torch.dot(left[i], right[j]) for i, j in pairs])
    out = torch.empty(rows_left.numel(), dtype=torch.float32, device=left.device)
    chunk = max(1, CHUNK_ELEMENTS.get(left.device.type, DEVICE_CHUNK_ELEMENTS) // max(1, left.shape[1]))
    for start in range(0, rows_left.numel(), chunk):
        a = left.index_select(0, rows_left[start : start + chunk])
        b = right.index_select(0, rows_right[start : start + chunk])
        out[start : start + chunk] = torch.linalg.vecdot(a, b)
    return out


def _linear(
    module: nn.Linear,
    x: torch.Tensor,
    g: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """dL/dW[o, i] = sum over all leading dims (or over the rows `rows` of them) of g[..., o] * x[..., i]."""
    x2, g2 = x.reshape(-1, module.in_features), g.reshape(-1, module.out_features)
    if rows is not None:
        x2, g2 = x2.index_select(0, rows), g2.index_select(0, rows)
    if weights is not None:
        g2 = g2.float() * weights.unsqueeze(1)
    xt = x2.t().contiguous()  # (in, rows)
    gt = g2.t().contiguous()  # (out, rows)
    return _row_products(gt, xt, pos // module.in_features, pos % module.in_features)


Pair = tuple[int, int]


def _conv_geometry(module: nn.Conv1d | nn.Conv2d) -> tuple[Pair, Pair, Pair, tuple[int, int, int, int]]:
    """Kernel, stride, dilation and (left, right, top, bottom) padding of a Conv1d/Conv2d, as 2-d values."""
    one_d = isinstance(module, nn.Conv1d)

    def pair(value: tuple[int, ...] | int, unit: int) -> Pair:
        values = (value,) if isinstance(value, int) else tuple(value)
        return (unit, values[0]) if one_d else (values[0], values[1])

    kernel, stride, dilation = pair(module.kernel_size, 1), pair(module.stride, 1), pair(module.dilation, 1)
    if module.padding == "valid":
        (top, bottom), (left, right) = (0, 0), (0, 0)
    elif module.padding == "same":  # PyTorch's asymmetric 'same': the extra pixel goes right/bottom
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        (top, bottom), (left, right) = ((t // 2, t - t // 2) for t in totals)
    else:
        ph, pw = pair(module.padding, 0)  # type: ignore[arg-type]  # str paddings are handled above
        (top, bottom), (left, right) = (ph, ph), (pw, pw)
    return kernel, stride, dilation, (left, right, top, bottom)


def batched(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A convolution's unbatched input or output gradient ((C, L) for Conv1d, (C, H, W) for Conv2d, as PyTorch
    accepts) with a batch of one in front; anything else as it is."""
    unbatched = {nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4, nn.ConvTranspose1d: 2, nn.ConvTranspose2d: 3,
                 nn.ConvTranspose3d: 4}.get(type(module))
    return t.unsqueeze(0) if unbatched is not None and t.dim() == unbatched else t


def _conv(
    module: nn.Conv1d | nn.Conv2d,
    x: torch.Tensor,
    g: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """dL/dW[o, c, a, b] = sum_{n, y, x} g[n, o, y, x] * xpad[n, ch(o, c), y*s + a*d, x*s + b*d].

    With `rows`, the sum runs over those output rows (flat indices of (n, y, x)) only.

    Only the kernel offsets and input channels that some position needs are gathered, one offset
    at a time, so the cost is that of the products at `pos`, never a dense weight gradient.
    """
    x, g = batched(module, x), batched(module, g)
    if isinstance(module, nn.Conv1d):
        x, g = x.unsqueeze(-2), g.unsqueeze(-2)
    (kh, kw), (sh, sw), (dh, dw), pads = _conv_geometry(module)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    xpad = F.pad(x, pads, mode=mode) if any(pads) else x
    out_ch, ho, wo = g.shape[1:]
    cin_g = module.in_channels // module.groups
    gt = g.permute(1, 0, 2, 3).reshape(out_ch, -1)  # (out, rows)
    gt = (gt if rows is None else gt.index_select(1, rows)).contiguous()
    if weights is not None:
        gt = gt.float() * weights.unsqueeze(0)
    o = pos // (cin_g * kh * kw)
    rest = pos % (cin_g * kh * kw)
    channel = (o // (out_ch // module.groups)) * cin_g + rest // (kh * kw)
    offset = rest % (kh * kw)
    out = torch.empty(pos.numel(), dtype=torch.float32, device=g.device)
    for off in torch.unique(offset).tolist():
        where = (offset == off).nonzero().squeeze(1)
        a, b = divmod(off, kw)
        window = xpad[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh, b * dw : b * dw + sw * (wo - 1) + 1 : sw]
        needed, which = torch.unique(channel[where], return_inverse=True)
        xt = window.index_select(1, needed).permute(1, 0, 2, 3).reshape(needed.numel(), -1)  # (needed, rows)
        if rows is not None:
            xt = xt.index_select(1, rows)
        out[where] = _row_products(gt, xt, o[where], which)
    return out


def sampled_weight_grad(
    module: nn.Module,
    inputs: torch.Tensor,
    grad_output: torch.Tensor,
    flat_positions: torch.Tensor,
    rows: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dW of `module` at `flat_positions` of its weight, from its input and output gradient.

    Supports nn.Linear (any leading dims) and nn.Conv1d/nn.Conv2d (stride, padding, dilation,
    groups, padding modes). Returns a float32 tensor of len(flat_positions) values. `rows`, if
    given, restricts the sum to those output rows (flat indices into output positions × batch, in
    the order of `output_rows`): the partial sum over a row subset, at 2·len(rows) FLOPs per position
    (rows may repeat); `row_weights` (one per row of `rows`) weights each row's term.
    """
    pos = flat_positions.to(grad_output.device, torch.long)
    if rows is not None:
        rows = rows.to(grad_output.device, torch.long)
    weights = None if row_weights is None else row_weights.to(grad_output.device, torch.float32)
    if pos.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=grad_output.device)
    if isinstance(module, nn.Linear):
        return _linear(module, inputs, grad_output, pos, rows, weights)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv(module, inputs, grad_output, pos, rows, weights)
    raise BidstError(f"sampled weight gradients support Linear, Conv1d and Conv2d, not {type(module).__name__}")


def output_row_norms(module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each output row's gradient (over output features/channels), in `rows` order."""
    if isinstance(module, LINEAR):
        return grad_output.reshape(-1, grad_output.shape[-1]).float().norm(dim=1)
    grad_output = batched(module, grad_output)
    channels = grad_output.shape[1]
    return grad_output.movedim(1, -1).reshape(-1, channels).float().norm(dim=1)


def output_rows(module: nn.Module, grad_output: torch.Tensor) -> int:
    """Output positions times batch of one call: the FLOPs of one sampled position are twice this."""
    channels = grad_output.shape[-1] if isinstance(module, LINEAR) else batched(module, grad_output).shape[1]
    return grad_output.numel() // channels


@contextmanager
def rows_counted(layers: Iterable[tuple[str, nn.Module]]) -> Iterator[dict[str, int]]:
    """Within the block, the output rows (`output_rows`; the input rows of a transposed convolution) of every
    forward call of the (name, layer) pairs, summed per name (layers sharing a name, as a tied weight's, sum into
    one entry)."""
    layers = list(layers)
    rows = dict.fromkeys((name for name, _ in layers), 0)

    def counter(name: str) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(module, TRANSPOSED):  # input positions times batch
                rows[name] += args[0].numel() // batched(module, args[0]).shape[1]
            else:
                rows[name] += output_rows(module, output)

        return hook

    handles = [module.register_forward_hook(counter(name)) for name, module in layers]
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()
