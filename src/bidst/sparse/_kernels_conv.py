"""Numba kernels for direct sparse Conv2d (no im2col) over a batch-innermost CHWN layout.

Why CHWN: with the batch innermost, every active weight (o, c, ky, kx) multiplies whole contiguous
runs of memory (for stride 1 an entire output row, Wo * N floats), so loops vectorize regardless of
the image size (8x8 maps would give 8-float rows in NCHW). Padding is never materialized: each
weight's valid output range is computed once. Outputs and input gradients are written straight
back to NCHW from a per-task row held in L1, so the only layout copies are the input and the output
gradient (one pass each). Offsets are uint64 to keep Numba's wraparound checks out of hot loops.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from ._kernels_linear import FASTMATH


@njit(inline="always")
def _x_range(kx: int, pw: int, sw: int, w: int, wo: int) -> tuple[int, int]:
    """Output columns x whose input column x*sw + kx - pw lies inside [0, w)."""
    x0 = max(0, (pw - kx + sw - 1) // sw)
    x1 = min(wo, (w - 1 + pw - kx) // sw + 1)
    return x0, x1


@njit(inline="always")
def _axpy_columns(
    acc: np.ndarray, a_base: int, a_step: int, src: np.ndarray, s_base: int, s_step: int, v: float, x0: int, x1: int, n: int
) -> None:
    """acc[a_base + x*a_step*n + b] += v * src[s_base + x*s_step*n + b] for x in [x0, x1), b < n.

    With both steps 1 this is one contiguous run. Bases are uint64 and may have wrapped below zero:
    only the sums with x >= x0 are used, and they are in range.
    """
    if a_step == 1 and s_step == 1:
        ao = a_base + uint64(x0) * n
        so = s_base + uint64(x0) * n
        for k in range(uint64(x1 - x0) * n):
            acc[ao + k] += v * src[so + k]
    else:
        for x in range(x0, x1):
            ao = a_base + uint64(x * a_step) * n
            so = s_base + uint64(x * s_step) * n
            for b in range(n):
                acc[ao + b] += v * src[so + b]


@njit(parallel=True, cache=True)
def nchw_to_chwn(x: np.ndarray, out: np.ndarray) -> None:
    """out[c, h, w, n] = x[n, c, h, w]; per (c, h) task, contiguous reads and an L1-resident (w, n) block."""
    nn, cc, hh, ww = x.shape
    for task in prange(cc * hh):
        c = task // hh
        h = task - c * hh
        block = out[c, h]
        for b in range(nn):
            src = x[b, c, h]
            for w in range(ww):
                block[w, b] = src[w]


@njit(inline="always")
def _store_row_nchw(acc: np.ndarray, yf: np.ndarray, n: int, ch: int, nch: int, h: int, nh: int, w: int) -> None:
    """Writes a (w, n) row held batch-innermost into row h of channel ch of an NCHW array."""
    for b in range(uint64(n)):
        dst = ((b * uint64(nch) + uint64(ch)) * uint64(nh) + uint64(h)) * uint64(w)
        for x in range(uint64(w)):
            yf[dst + x] = acc[x * uint64(n) + b]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_forward(
    indptr: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    bias: np.ndarray,
    xt: np.ndarray,
    y: np.ndarray,
    sh: int,
    sw: int,
    ph: int,
    pw: int,
    kh: int,
    kw: int,
    cout_g: int,
    cin_g: int,
) -> None:
    """y (NCHW) = sparse conv of xt (CHWN); one task per (output channel, output row)."""
    hh, ww, nn = xt.shape[1], xt.shape[2], xt.shape[3]
    oo, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    n = uint64(nn)
    rowlen = uint64(ww) * n
    plane = uint64(hh) * rowlen
    kk = kh * kw
    xf = xt.ravel()
    yf = y.ravel()
    for task in prange(oo * ho):
        o = task // ho
        oy = task - o * ho
        acc = np.empty(wo * nn, np.float32)
        acc[:] = bias[o]
        cbase = (o // cout_g) * cin_g
        for p in range(indptr[o], indptr[o + 1]):
            col = cols[p]
            ci = col // kk
            r = col - ci * kk
            ky = r // kw
            kx = r - ky * kw
            iy = oy * sh + ky - ph
            if iy < 0 or iy >= hh:
                continue
            x0, x1 = _x_range(kx, pw, sw, ww, wo)
            if x0 >= x1:
                continue
            src = uint64(cbase + ci) * plane + uint64(iy) * rowlen
            _axpy_columns(acc, uint64(0), 1, xf, src + uint64((kx - pw) * nn), sw, values[p], x0, x1, n)
        _store_row_nchw(acc, yf, nn, o, oo, oy, ho, wo)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_input_grad(
    in_ptr: np.ndarray,
    in_rows: np.ndarray,
    in_cols: np.ndarray,
    in_values: np.ndarray,
    dyt: np.ndarray,
    dx: np.ndarray,
    sh: int,
    sw: int,
    ph: int,
    pw: int,
    kh: int,
    kw: int,
) -> None:
    """dx (NCHW) of a strided conv from dyt (CHWN); slots listed by input channel (CSC-like).

    One task per (input channel, input row) gathers every contribution to that row: no atomics.
    (Stride-1 input gradients run as a forward conv with the transposed, flipped weight.)
    """
    ho, wo, nn = dyt.shape[1], dyt.shape[2], dyt.shape[3]
    cc, hh, ww = dx.shape[1], dx.shape[2], dx.shape[3]
    n = uint64(nn)
    rowlen = uint64(wo) * n
    plane = uint64(ho) * rowlen
    kk = kh * kw
    df = dyt.ravel()
    xf = dx.ravel()
    for task in prange(cc * hh):
        c = task // hh
        iy = task - c * hh
        acc = np.zeros(ww * nn, np.float32)
        for q in range(in_ptr[c], in_ptr[c + 1]):
            r = in_cols[q] % kk
            ky = r // kw
            kx = r - ky * kw
            t = iy + ph - ky
            if t < 0:
                continue
            oy = t // sh
            if oy * sh != t or oy >= ho:
                continue
            x0, x1 = _x_range(kx, pw, sw, ww, wo)
            if x0 >= x1:
                continue
            src = uint64(in_rows[q]) * plane + uint64(oy) * rowlen
            _axpy_columns(acc, uint64((kx - pw) * nn), sw, df, src, 1, in_values[q], x0, x1, n)
        _store_row_nchw(acc, xf, nn, c, cc, iy, hh, ww)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_sampled_grad(
    rows: np.ndarray,
    cols: np.ndarray,
    dyt: np.ndarray,
    xt: np.ndarray,
    out: np.ndarray,
    sh: int,
    sw: int,
    ph: int,
    pw: int,
    kh: int,
    kw: int,
    cout_g: int,
    cin_g: int,
) -> None:
    """out[k] = dL/dW at position (rows[k], cols[k]) from dyt and xt (both CHWN); positions in parallel."""
    ho, wo, nn = dyt.shape[1], dyt.shape[2], dyt.shape[3]
    hh, ww = xt.shape[1], xt.shape[2]
    n = uint64(nn)
    orow = uint64(wo) * n
    oplane = uint64(ho) * orow
    irow = uint64(ww) * n
    iplane = uint64(hh) * irow
    kk = kh * kw
    df = dyt.ravel()
    xf = xt.ravel()
    for k in prange(rows.shape[0]):
        o = rows[k]
        col = cols[k]
        ci = col // kk
        r = col - ci * kk
        ky = r // kw
        kx = r - ky * kw
        c = (o // cout_g) * cin_g + ci
        x0, x1 = _x_range(kx, pw, sw, ww, wo)
        total = 0.0  # float64 across rows; float32 (vectorized) within a row
        for oy in range(ho if x0 < x1 else 0):
            iy = oy * sh + ky - ph
            if iy < 0 or iy >= hh:
                continue
            dsrc = uint64(o) * oplane + uint64(oy) * orow
            xsrc = uint64(c) * iplane + uint64(iy) * irow
            s = np.float32(0.0)
            if sw == 1:
                do = dsrc + uint64(x0) * n
                xo = xsrc + uint64(x0 + kx - pw) * n
                for j in range(uint64(x1 - x0) * n):
                    s += df[do + j] * xf[xo + j]
            else:
                for x in range(x0, x1):
                    do = dsrc + uint64(x) * n
                    xo = xsrc + uint64(x * sw + kx - pw) * n
                    for b in range(n):
                        s += df[do + b] * xf[xo + b]
            total += s
        out[k] = total
