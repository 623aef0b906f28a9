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
def _unpack(col: int, kk: int, kw: int) -> tuple[int, int, int]:
    """(input channel in group, ky, kx) of a weight column index ci * kh * kw + ky * kw + kx."""
    ci = col // kk
    r = col - ci * kk
    ky = r // kw
    return ci, ky, r - ky * kw


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


@njit(cache=True)
def _kx_order(indptr: np.ndarray, cols: np.ndarray, kk: int, kw: int) -> np.ndarray:
    """Slot order that lists each row's slots by kernel column kx (a stable counting sort per row):
    slots of one kx cover the same output columns, so consecutive ones can share a pass."""
    order = np.empty(cols.shape[0], np.int64)
    for o in range(indptr.shape[0] - 1):
        q = indptr[o]
        for kx in range(kw):
            for p in range(indptr[o], indptr[o + 1]):
                if cols[p] % kk % kw == kx:
                    order[q] = p
                    q += 1
    return order


@njit(inline="always", fastmath=FASTMATH)
def _axpy_group(
    acc: np.ndarray, src: np.ndarray, g: int, s0: int, s1: int, s2: int, s3: int, v0: float, v1: float, v2: float, v3: float,
    sw: int, x0: int, x1: int, n: int,
) -> None:
    """acc[x*n + b] += sum over the first g (1-4) slots of v_i * src[s_i + x*sw*n + b], x in [x0, x1), b < n.

    Bases s_i are uint64 and may have wrapped below zero: only the sums with x >= x0 are used.
    """
    if sw == 1:  # one contiguous run per slot
        a0 = uint64(x0) * n
        t0, t1, t2, t3 = s0 + a0, s1 + a0, s2 + a0, s3 + a0
        ln = uint64(x1 - x0) * n
        if g == 4:
            for k in range(ln):
                acc[a0 + k] += (v0 * src[t0 + k] + v1 * src[t1 + k]) + (v2 * src[t2 + k] + v3 * src[t3 + k])
        elif g == 3:
            for k in range(ln):
                acc[a0 + k] += (v0 * src[t0 + k] + v1 * src[t1 + k]) + v2 * src[t2 + k]
        elif g == 2:
            for k in range(ln):
                acc[a0 + k] += v0 * src[t0 + k] + v1 * src[t1 + k]
        else:
            for k in range(ln):
                acc[a0 + k] += v0 * src[t0 + k]
    else:
        for x in range(x0, x1):
            ao = uint64(x) * n
            so = uint64(x * sw) * n
            for b in range(n):
                t = v0 * src[s0 + so + b]
                if g > 1:
                    t += v1 * src[s1 + so + b]
                if g > 2:
                    t += v2 * src[s2 + so + b]
                if g > 3:
                    t += v3 * src[s3 + so + b]
                acc[ao + b] += t


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
    nchunk: int,
) -> None:
    """y (NCHW) = sparse conv of xt (CHWN); tasks (output channel, output row) in `nchunk` contiguous chunks.

    A task's slots are visited by kernel column (_kx_order); up to four in-range slots of one kx,
    which cover the same output columns, share each pass over the output row.
    """
    hh, ww, nn = xt.shape[1], xt.shape[2], xt.shape[3]
    oo, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    n = uint64(nn)
    rowlen = uint64(ww) * n
    plane = uint64(hh) * rowlen
    kk = kh * kw
    xf = xt.ravel()
    yf = y.ravel()
    order = _kx_order(indptr, cols, kk, kw)
    tasks = oo * ho
    for t in prange(nchunk):
        acc = np.empty(wo * nn, np.float32)
        for task in range(t * tasks // nchunk, (t + 1) * tasks // nchunk):
            o = task // ho
            oy = task - o * ho
            acc[:] = bias[o]
            cbase = (o // cout_g) * cin_g
            g, gkx = 0, -1
            s0 = s1 = s2 = s3 = uint64(0)
            v0 = v1 = v2 = v3 = values[0] if values.shape[0] else np.float32(0.0)
            for q in range(indptr[o], indptr[o + 1]):
                p = order[q]
                col = cols[p]
                ci, ky, kx = _unpack(col, kk, kw)
                iy = oy * sh + ky - ph
                if iy < 0 or iy >= hh:
                    continue
                if g > 0 and kx != gkx:  # flush the group of the previous kernel column
                    x0, x1 = _x_range(gkx, pw, sw, ww, wo)
                    if x0 < x1:
                        _axpy_group(acc, xf, g, s0, s1, s2, s3, v0, v1, v2, v3, sw, x0, x1, n)
                    g = 0
                gkx = kx
                src = uint64(cbase + ci) * plane + uint64(iy) * rowlen + uint64((kx - pw) * nn)
                if g == 0:
                    s0, v0 = src, values[p]
                elif g == 1:
                    s1, v1 = src, values[p]
                elif g == 2:
                    s2, v2 = src, values[p]
                else:
                    s3, v3 = src, values[p]
                g += 1
                if g == 4:
                    x0, x1 = _x_range(kx, pw, sw, ww, wo)
                    if x0 < x1:
                        _axpy_group(acc, xf, 4, s0, s1, s2, s3, v0, v1, v2, v3, sw, x0, x1, n)
                    g = 0
            if g > 0:
                x0, x1 = _x_range(gkx, pw, sw, ww, wo)
                if x0 < x1:
                    _axpy_group(acc, xf, g, s0, s1, s2, s3, v0, v1, v2, v3, sw, x0, x1, n)
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
            _, ky, kx = _unpack(in_cols[q], kk, kw)
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
        ci, ky, kx = _unpack(col, kk, kw)
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
