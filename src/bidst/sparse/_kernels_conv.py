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
    cc, hh, ww, nn = xt.shape
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
            v = values[p]
            src = uint64(cbase + ci) * plane + uint64(iy) * rowlen
            if sw == 1:
                so = src + uint64(x0 + kx - pw) * n
                ao = uint64(x0) * n
                for k in range(uint64(x1 - x0) * n):
                    acc[ao + k] += v * xf[so + k]
            else:
                for x in range(x0, x1):
                    so = src + uint64(x * sw + kx - pw) * n
                    ao = uint64(x) * n
                    for b in range(n):
                        acc[ao + b] += v * xf[so + b]
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
    oo, ho, wo, nn = dyt.shape
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
            v = in_values[q]
            src = uint64(in_rows[q]) * plane + uint64(oy) * rowlen
            if sw == 1:
                ao = uint64(x0 + kx - pw) * n
                so = src + uint64(x0) * n
                for k in range(uint64(x1 - x0) * n):
                    acc[ao + k] += v * df[so + k]
            else:
                for x in range(x0, x1):
                    ao = uint64(x * sw + kx - pw) * n
                    so = src + uint64(x) * n
                    for b in range(n):
                        acc[ao + b] += v * df[so + b]
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
    oo, ho, wo, nn = dyt.shape
    cc, hh, ww = xt.shape[0], xt.shape[1], xt.shape[2]
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


# Stride-1 kernels over zero-padded NCHW planes ("wide rows"): with a padded input of width Wp, the
# output pixel (oy, x) reads padded input (oy + ky, x + kx), i.e. flat offset ky * Wp + kx from
# k = oy * Wp + x. Computing outputs on a Ho x Wp grid (Wp - Wo columns are discarded) turns every
# active weight into ONE contiguous axpy/dot of length (Ho - 1) * Wp + Wo per image: long vectors
# for large maps, and the only layout work is padding (row copies, not transposes). The input
# gradient is conv_forward_wide of the padded output gradient with the transposed, flipped weight.


@njit(inline="always")
def _wide_offset(col: int, kk: int, kw: int, plane: int, wp: int) -> int:
    """Flat offset in the padded input of the (channel-in-group, ky, kx) encoded by `col`."""
    ci = col // kk
    r = col - ci * kk
    ky = r // kw
    return ci * plane + ky * wp + (r - ky * kw)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_forward_wide(
    indptr: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    bias: np.ndarray,
    xp: np.ndarray,
    y: np.ndarray,
    kh: int,
    kw: int,
    cout_g: int,
    cin_g: int,
) -> None:
    """y (NCHW) = stride-1 sparse conv of the zero-padded NCHW xp; one task per (image, output channel)."""
    nn, cc, hp, wp = xp.shape
    oo, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    kk = kh * kw
    plane = hp * wp
    span = uint64((ho - 1) * wp + wo)
    xf = xp.ravel()
    yf = y.ravel()
    for task in prange(nn * oo):
        n = task // oo
        o = task - n * oo
        acc = np.empty(ho * wp, np.float32)
        acc[:] = bias[o]
        base = (n * cc + (o // cout_g) * cin_g) * plane
        p = indptr[o]
        end = indptr[o + 1]
        # four slots per pass cut the loads and stores of the accumulator, the bottleneck of this loop
        while p + 4 <= end:
            s0 = uint64(base + _wide_offset(cols[p], kk, kw, plane, wp))
            s1 = uint64(base + _wide_offset(cols[p + 1], kk, kw, plane, wp))
            s2 = uint64(base + _wide_offset(cols[p + 2], kk, kw, plane, wp))
            s3 = uint64(base + _wide_offset(cols[p + 3], kk, kw, plane, wp))
            v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
            for k in range(span):
                acc[k] += (v0 * xf[s0 + k] + v1 * xf[s1 + k]) + (v2 * xf[s2 + k] + v3 * xf[s3 + k])
            p += 4
        while p < end:
            s0 = uint64(base + _wide_offset(cols[p], kk, kw, plane, wp))
            v0 = values[p]
            for k in range(span):
                acc[k] += v0 * xf[s0 + k]
            p += 1
        dst = uint64(task) * uint64(ho * wo)
        for oy in range(uint64(ho)):
            for x in range(uint64(wo)):
                yf[dst + oy * uint64(wo) + x] = acc[oy * uint64(wp) + x]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_sampled_grad_wide(
    rows: np.ndarray,
    cols: np.ndarray,
    dyw: np.ndarray,
    d_off: int,
    xp: np.ndarray,
    out: np.ndarray,
    kh: int,
    kw: int,
    cout_g: int,
    cin_g: int,
    nchunk: int,
) -> None:
    """out[k] = dL/dW at (rows[k], cols[k]) of a stride-1 conv, from padded xp and the output gradient.

    dyw holds the output gradient at flat offset d_off of each plane, with the padded input's row
    pitch and zeros in the extra columns (so they add nothing to the dot products). Images are split
    into one chunk per thread and each chunk visits every position: the planes of an image stay in
    cache while all positions read them, so the inputs are streamed once. `nchunk`: the thread count.
    """
    nn, oo, hd, wd = dyw.shape
    cc, hp, wp = xp.shape[1], xp.shape[2], xp.shape[3]
    ho = hp - kh + 1
    kk = kh * kw
    plane = hp * wp
    oplane = hd * wd
    span = uint64((ho - 1) * wp + wp - kw + 1)
    df = dyw.ravel()
    xf = xp.ravel()
    npos = rows.shape[0]
    offs = np.empty(npos, np.int64)
    for k in range(npos):
        offs[k] = (rows[k] // cout_g) * cin_g * plane + _wide_offset(cols[k], kk, kw, plane, wp)
    nchunk = max(1, min(nn, nchunk))
    partial = np.zeros((nchunk, npos))  # float64 across images; float32 (vectorized) within one
    for t in prange(nchunk):
        for n in range(t * nn // nchunk, (t + 1) * nn // nchunk):
            for k in range(npos):
                d0 = uint64((n * oo + rows[k]) * oplane + d_off)
                x0 = uint64(n * cc * plane + offs[k])
                s = np.float32(0.0)
                for j in range(span):
                    s += df[d0 + j] * xf[x0 + j]
                partial[t, k] += s
    for k in range(npos):
        out[k] = partial[:, k].sum()


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def pad_planes(x: np.ndarray, out: np.ndarray, top: int, left: int, sums: np.ndarray) -> None:
    """Copies NCHW x into the zeroed borders of out at (top, left); sums[n, c] = sum of plane (n, c) (float64)."""
    nn, cc, hh, ww = x.shape
    hp, wp = out.shape[2], out.shape[3]
    xf = x.ravel()
    of = out.ravel()
    w = uint64(ww)
    for task in prange(nn * cc):
        dst = uint64(task * hp * wp)
        for j in range(uint64(top * wp)):
            of[dst + j] = 0.0
        total = 0.0
        for y in range(hh):
            d = dst + uint64((y + top) * wp)
            for j in range(uint64(left)):
                of[d + j] = 0.0
            d += uint64(left)
            src = uint64((task * hh + y) * ww)
            acc = np.float32(0.0)
            for j in range(w):
                v = xf[src + j]
                of[d + j] = v
                acc += v
            total += acc
            for j in range(w, uint64(wp - left)):
                of[d + j] = 0.0
        for j in range(uint64((top + hh) * wp), uint64(hp * wp)):
            of[dst + j] = 0.0
        sums.ravel()[task] = total


@njit(inline="always")
def _phase_range(q: int, left: int, s: int, w: int, n_out: int) -> tuple[int, int]:
    """Indices j < n_out whose source column s*j + q - left lies inside [0, w)."""
    return max(0, (left - q + s - 1) // s), min(n_out, (w - 1 + left - q) // s + 1)


@njit(parallel=True, cache=True)
def pad_space_to_depth(x: np.ndarray, out: np.ndarray, s: int, top: int, left: int, kh: int, kw: int) -> None:
    """out[n, (c*s + r)*s + q, i, j] = x[n, c, s*i + r - top, s*j + q - left], zero outside x.

    Only phases r < kh, q < kw are written: the others hold no weight of a kh x kw kernel, and are
    never read by the sparse kernels (a 1x1 stride-2 conv copies a quarter of its input).
    """
    nn, cc, hh, ww = x.shape
    hs, wsw = out.shape[2], out.shape[3]
    xf = x.ravel()
    of = out.ravel()
    for task in prange(nn * cc):
        for r in range(min(s, kh)):
            for q in range(min(s, kw)):
                j0, j1 = _phase_range(q, left, s, ww, wsw)
                base = uint64((task * s * s + r * s + q) * hs * wsw)
                for i in range(hs):
                    dst = base + uint64(i * wsw)
                    y = s * i + r - top
                    if y < 0 or y >= hh or j0 >= j1:
                        for j in range(uint64(wsw)):
                            of[dst + j] = 0.0
                        continue
                    for j in range(uint64(j0)):
                        of[dst + j] = 0.0
                    src = uint64((task * hh + y) * ww + q - left)
                    for j in range(uint64(j0), uint64(j1)):
                        of[dst + j] = xf[src + j * uint64(s)]
                    for j in range(uint64(j1), uint64(wsw)):
                        of[dst + j] = 0.0


@njit(parallel=True, cache=True)
def depth_to_space_crop(xs: np.ndarray, out: np.ndarray, s: int, top: int, left: int) -> None:
    """The inverse of pad_space_to_depth: out[n, c, s*i + r - top, s*j + q - left] = xs[n, (c*s + r)*s + q, i, j].

    Entries of `out` that no (i, j) reaches are left untouched (the caller zeroes them when needed).
    """
    nn, cc, hh, ww = out.shape
    hs, wsw = xs.shape[2], xs.shape[3]
    xf = xs.ravel()
    of = out.ravel()
    for task in prange(nn * cc):
        for r in range(s):
            for q in range(s):
                j0, j1 = _phase_range(q, left, s, ww, wsw)
                base = uint64((task * s * s + r * s + q) * hs * wsw)
                for i in range(hs):
                    y = s * i + r - top
                    if y < 0 or y >= hh:
                        continue
                    src = base + uint64(i * wsw)
                    dst = uint64((task * hh + y) * ww + q - left)
                    for j in range(uint64(j0), uint64(j1)):
                        of[dst + j * uint64(s)] = xf[src + j]
