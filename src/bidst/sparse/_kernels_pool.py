"""Numba kernels for max pooling of batch-innermost activations, stored (C, H, W, N): SIMD runs over the batch.

PyTorch has no pooling kernel for that layout; viewing it as a (1, C, H, W, N) volume for max_pool3d
works but is slower than PyTorch's own NCHW pooling. The window offsets of the maxima are int32,
the width of the values, so that the select of value and offset vectorizes together. Offsets are
computed in uint64 so that Numba emits no negative-index wraparound checks.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64


@njit(inline="always")
def _inside(start: int, k: int, n: int) -> tuple[int, int]:
    """The offsets d in [lo, hi) of a k-long window starting at `start` whose position start + d lies in 0..n-1."""
    return max(0, -start), min(k, n - start)


@njit(parallel=True, cache=True)
def max_pool(x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, y: np.ndarray, arg: np.ndarray) -> None:
    """y[c, i, j, :] = max of x[c, h, w, :] over the window of output (i, j), arg = its offset dh * kw + dw.

    As PyTorch: the window is clipped to the input (padding is never a candidate), the first maximum
    in row-major window order wins a tie, and a NaN is taken over any number (the last NaN wins).
    """
    c_n, h_n, w_n, n = x.shape
    ho_n, wo_n = y.shape[1], y.shape[2]
    xf = x.ravel()
    yf = y.ravel()
    af = arg.ravel()
    nb = uint64(n)
    for t in prange(c_n * ho_n):
        c = uint64(t // ho_n)
        i = t % ho_n
        for j in range(wo_n):
            yo = ((c * uint64(ho_n) + uint64(i)) * uint64(wo_n) + uint64(j)) * nb
            first = True
            h0, w0 = i * sh - ph, j * sw - pw
            for dh in range(*_inside(h0, kh, h_n)):
                for dw in range(*_inside(w0, kw, w_n)):
                    xo = ((c * uint64(h_n) + uint64(h0 + dh)) * uint64(w_n) + uint64(w0 + dw)) * nb
                    o = np.int32(dh * kw + dw)
                    if first:
                        for b in range(nb):
                            yf[yo + b] = xf[xo + b]
                            af[yo + b] = o
                        first = False
                    else:
                        for b in range(nb):
                            v = xf[xo + b]
                            best = yf[yo + b]
                            take = (v > best) | np.isnan(v)
                            yf[yo + b] = v if take else best
                            af[yo + b] = o if take else af[yo + b]


@njit(parallel=True, cache=True)
def max_pool_backward(
    gy: np.ndarray, arg: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, gx: np.ndarray
) -> None:
    """gx = the gradient of max_pool: each gy[c, i, j, b] added at its window's maximum arg[c, i, j, b]; zero elsewhere.

    One task per channel, so overlapping windows accumulate without races.
    """
    c_n, h_n, w_n, n = gx.shape
    ho_n, wo_n = gy.shape[1], gy.shape[2]
    gyf = gy.ravel()
    af = arg.ravel()
    gxf = gx.ravel()
    nb = uint64(n)
    plane = uint64(h_n) * uint64(w_n) * nb
    for ci in prange(c_n):
        c = uint64(ci)
        for k in range(plane):
            gxf[c * plane + k] = 0.0
        for i in range(ho_n):
            for j in range(wo_n):
                yo = ((c * uint64(ho_n) + uint64(i)) * uint64(wo_n) + uint64(j)) * nb
                h0, w0 = i * sh - ph, j * sw - pw
                for dh in range(*_inside(h0, kh, h_n)):
                    for dw in range(*_inside(w0, kw, w_n)):
                        xo = ((c * uint64(h_n) + uint64(h0 + dh)) * uint64(w_n) + uint64(w0 + dw)) * nb
                        o = np.int32(dh * kw + dw)
                        for b in range(nb):
                            g = gyf[yo + b]
                            gxf[xo + b] += g if af[yo + b] == o else np.float32(0.0)
