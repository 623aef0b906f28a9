"""Numba kernels for direct sparse Conv2d (no im2col) over a batch-innermost CHWN layout.

Why CHWN: with the batch innermost, every active weight (o, c, ky, kx) multiplies whole contiguous
runs of memory (for stride 1 an entire output row, Wo * N floats), so loops vectorize regardless of
the image size (8x8 maps would give 8-float rows in NCHW). Padding is never materialized: each
weight's valid output range is computed once. Outputs and input gradients are CHWN too, so a chain
of sparse layers (with the batch-innermost dense layers of `layout` between them) never transposes.
Offsets are uint64 to keep Numba's wraparound checks out of hot loops.
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


@njit(inline="always")
def _store_row(acc: np.ndarray, out: np.ndarray, row: int, length: int) -> None:
    """out[row * length + k] = acc[k] for k < length: one row of a CHWN array, written contiguously."""
    d = uint64(row) * uint64(length)
    for k in range(uint64(length)):
        out[d + k] = acc[k]


@njit(cache=True)
def tap_order(bounds: np.ndarray, cols: np.ndarray, kk: int) -> np.ndarray:
    """A permutation that keeps each run [bounds[i], bounds[i+1]) of positions in place and sorts it by kernel
    tap (ky * kw + kx; a stable counting sort): positions of one tap cover the same output rows and
    columns, so consecutive ones share a pass without edge corrections."""
    order = np.empty(cols.shape[0], np.int64)
    start = np.empty(kk + 1, np.int64)
    for i in range(bounds.shape[0] - 1):
        start[:] = 0
        for p in range(bounds[i], bounds[i + 1]):
            start[cols[p] % kk + 1] += 1
        start[0] = bounds[i]
        for tap in range(kk):
            start[tap + 1] += start[tap]
        for p in range(bounds[i], bounds[i + 1]):
            tap = cols[p] % kk
            order[start[tap]] = p
            start[tap] += 1
    return order


@njit(inline="always", fastmath=FASTMATH)
def _axpy8(dst: np.ndarray, d0: int, src: np.ndarray, s: np.ndarray, v: np.ndarray, i: int, shift: int, ln: int, first: bool, b: float) -> None:
    """dst[d0 + k] (= b if first, else +=) sum over slots i..i+7 of v[j] * src[s[j] + shift + k], k < ln."""
    s0, s1, s2, s3 = s[i] + shift, s[i + 1] + shift, s[i + 2] + shift, s[i + 3] + shift
    s4, s5, s6, s7 = s[i + 4] + shift, s[i + 5] + shift, s[i + 6] + shift, s[i + 7] + shift
    v0, v1, v2, v3, v4, v5, v6, v7 = v[i], v[i + 1], v[i + 2], v[i + 3], v[i + 4], v[i + 5], v[i + 6], v[i + 7]
    if first:
        for k in range(ln):
            dst[d0 + k] = b + (((v0 * src[s0 + k] + v1 * src[s1 + k]) + (v2 * src[s2 + k] + v3 * src[s3 + k])) + (
                (v4 * src[s4 + k] + v5 * src[s5 + k]) + (v6 * src[s6 + k] + v7 * src[s7 + k])
            ))
    else:
        for k in range(ln):
            dst[d0 + k] += ((v0 * src[s0 + k] + v1 * src[s1 + k]) + (v2 * src[s2 + k] + v3 * src[s3 + k])) + (
                (v4 * src[s4 + k] + v5 * src[s5 + k]) + (v6 * src[s6 + k] + v7 * src[s7 + k])
            )


@njit(inline="always", fastmath=FASTMATH)
def _axpy4(dst: np.ndarray, d0: int, src: np.ndarray, s: np.ndarray, v: np.ndarray, i: int, shift: int, ln: int, first: bool, b: float) -> None:
    """_axpy8 for the four slots i..i+3."""
    s0, s1, s2, s3 = s[i] + shift, s[i + 1] + shift, s[i + 2] + shift, s[i + 3] + shift
    v0, v1, v2, v3 = v[i], v[i + 1], v[i + 2], v[i + 3]
    if first:
        for k in range(ln):
            dst[d0 + k] = b + ((v0 * src[s0 + k] + v1 * src[s1 + k]) + (v2 * src[s2 + k] + v3 * src[s3 + k]))
    else:
        for k in range(ln):
            dst[d0 + k] += (v0 * src[s0 + k] + v1 * src[s1 + k]) + (v2 * src[s2 + k] + v3 * src[s3 + k])


@njit(inline="always", fastmath=FASTMATH)
def _axpy_few(
    dst: np.ndarray, d0: int, src: np.ndarray, s: np.ndarray, v: np.ndarray, i: int, m: int, shift: int, ln: int, first: bool, b: float
) -> None:
    """_axpy8 for the m (1-3) slots i..i+m-1."""
    s0, v0 = s[i] + shift, v[i]
    if m == 3:
        s1, s2, v1, v2 = s[i + 1] + shift, s[i + 2] + shift, v[i + 1], v[i + 2]
        if first:
            for k in range(ln):
                dst[d0 + k] = b + ((v0 * src[s0 + k] + v1 * src[s1 + k]) + v2 * src[s2 + k])
        else:
            for k in range(ln):
                dst[d0 + k] += (v0 * src[s0 + k] + v1 * src[s1 + k]) + v2 * src[s2 + k]
    elif m == 2:
        s1, v1 = s[i + 1] + shift, v[i + 1]
        if first:
            for k in range(ln):
                dst[d0 + k] = b + (v0 * src[s0 + k] + v1 * src[s1 + k])
        else:
            for k in range(ln):
                dst[d0 + k] += v0 * src[s0 + k] + v1 * src[s1 + k]
    elif first:
        for k in range(ln):
            dst[d0 + k] = b + v0 * src[s0 + k]
    else:
        for k in range(ln):
            dst[d0 + k] += v0 * src[s0 + k]


@njit(inline="always", fastmath=FASTMATH)
def _passes(
    dst: np.ndarray, dpos: int, src: np.ndarray, s: np.ndarray, v: np.ndarray, cnt: int, shift: int, ln: int, b: float, first: bool
) -> None:
    """dst[dpos + k] (= b + if first, else +=) sum over slots i < cnt of v[i] * src[s[i] + shift + k], k < ln:
    the last one to three slots in the first pass, then eight (and four) per pass."""
    m = cnt % 4
    if m:
        _axpy_few(dst, dpos, src, s, v, cnt - m, m, shift, ln, first, b)
        first = False
    i = 0
    while i + 8 <= cnt - m:
        _axpy8(dst, dpos, src, s, v, i, shift, ln, first, b)
        first = False
        i += 8
    if i < cnt - m:
        _axpy4(dst, dpos, src, s, v, i, shift, ln, first, b)


@njit(cache=True)
def _column_bounds(pw: int, sw: int, kw: int, ww: int, wo: int) -> np.ndarray:
    """The sorted distinct output columns where some kernel column's in-range run starts or ends, with 0
    and wo: between two consecutive ones every slot of a task covers all columns or none."""
    ends = np.empty(2 * kw + 2, np.int64)
    ends[0], ends[1] = 0, wo
    for kx in range(kw):
        ends[2 * kx + 2], ends[2 * kx + 3] = _x_range(kx, pw, sw, ww, wo)
    ends = np.unique(ends)
    return ends[(ends >= 0) & (ends <= wo)]


@njit(cache=True)
def _slot_geometry(
    indptr: np.ndarray, cols: np.ndarray, bounds: np.ndarray, hh: int, ww: int, nn: int, geo: tuple, wo: int, cout_g: int, cin_g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slot p of a CSR conv weight, decoded once per call instead of once per output row: its input
    offset for input row 0 and output column 0 (may wrap below zero: only the in-range sums are used),
    its kernel row, and the indices in `bounds` of its output columns [x0, x1) inside the image
    (x0 == x1 where none is)."""
    _, sw, _, pw, kh, kw = geo
    plane = uint64(hh) * uint64(ww) * uint64(nn)
    base = np.empty(cols.shape[0], np.uint64)
    krow = np.empty(cols.shape[0], np.int64)
    xi = np.empty((cols.shape[0], 2), np.int64)
    for o in range(indptr.shape[0] - 1):
        cbase = (o // cout_g) * cin_g
        for p in range(indptr[o], indptr[o + 1]):
            ci, ky, kx = _unpack(cols[p], kh * kw, kw)
            base[p] = uint64(cbase + ci) * plane + uint64((kx - pw) * nn)
            krow[p] = ky
            x0, x1 = _x_range(kx, pw, sw, ww, wo)
            x1 = max(x0, x1)
            xi[p, 0], xi[p, 1] = np.searchsorted(bounds, x0), np.searchsorted(bounds, x1)
    return base, krow, xi


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
    """y (CHWN) = sparse conv of xt (CHWN); tasks (output row, output channel) in `nchunk` contiguous chunks.

    Row-major tasks let the input rows a band of output rows needs stay in L2 across all output
    channels. A task cuts its output row into column segments where the set of in-range slots is
    constant (for a padded 3x3 kernel: the first column, the middle, the last); in each segment those
    slots share passes (up to eight per pass) written straight into y, the first pass setting it.
    Slots stay in CSR order (input channel major): slots of one kernel tap in different channels
    are whole planes apart, which would put a pass's streams in the same L1 sets.
    """
    hh, ww, nn = xt.shape[1], xt.shape[2], xt.shape[3]
    oo, ho, wo = y.shape[0], y.shape[1], y.shape[2]
    n = uint64(nn)
    rowlen = uint64(ww) * n
    xf = xt.ravel()
    yf = y.ravel()
    bounds = _column_bounds(pw, sw, kw, ww, wo)
    base, krow, xi = _slot_geometry(indptr, cols, bounds, hh, ww, nn, (sh, sw, ph, pw, kh, kw), wo, cout_g, cin_g)
    nb = bounds.shape[0]
    most = 0
    for o in range(oo):
        most = max(most, indptr[o + 1] - indptr[o])
    tasks = oo * ho
    for t in prange(nchunk):
        srcs = np.empty(most, np.uint64)  # a task's in-range slots: input offset, value, column-bound indices
        vals = np.empty(most, np.float32)
        rng = np.empty((most, 2), np.int64)
        seg_srcs = np.empty(most, np.uint64)  # the slots covering one column segment
        seg_vals = np.empty(most, np.float32)
        used = np.empty(nb, np.bool_)  # the bounds some in-range slot starts or ends at
        for task in range(t * tasks // nchunk, (t + 1) * tasks // nchunk):
            oy = task // oo
            o = task - oy * oo
            b = bias[o]
            d = uint64(o * ho + oy) * uint64(wo) * n
            used[:] = False
            used[0] = used[nb - 1] = True
            cnt = 0
            for p in range(indptr[o], indptr[o + 1]):
                iy = oy * sh + krow[p] - ph
                if iy < 0 or iy >= hh or xi[p, 0] == xi[p, 1]:
                    continue
                srcs[cnt] = base[p] + uint64(iy) * rowlen
                vals[cnt], rng[cnt, 0], rng[cnt, 1] = values[p], xi[p, 0], xi[p, 1]
                used[xi[p, 0]] = used[xi[p, 1]] = True
                cnt += 1
            j0 = 0
            for j1 in range(1, nb):
                if not used[j1]:
                    continue
                x0, x1 = bounds[j0], bounds[j1]
                m = 0
                for i in range(cnt):
                    if rng[i, 0] <= j0 and rng[i, 1] >= j1:
                        seg_srcs[m], seg_vals[m] = srcs[i], vals[i]
                        m += 1
                if m == 0:
                    for k in range(uint64(x0) * n, uint64(x1) * n):
                        yf[d + k] = b
                elif sw == 1:  # one contiguous run per slot
                    _passes(yf, d + uint64(x0) * n, xf, seg_srcs, seg_vals, m, uint64(x0) * n, uint64(x1 - x0) * n, b, True)
                else:
                    for x in range(uint64(x0), uint64(x1)):
                        _passes(yf, d + x * n, xf, seg_srcs, seg_vals, m, x * uint64(sw) * n, n, b, True)
                j0 = j1


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv_forward_planes(
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
    order: np.ndarray,
) -> None:
    """conv_forward for small output maps, one task per output channel in `nchunk` contiguous chunks;
    `order` is `tap_order(indptr, cols, kh * kw)`.

    An output row of a small map is too short to pay for a pass's setup, so a task keeps its whole
    output plane in L1 and runs each kernel tap's slots (sorted by tap) through passes of up to
    eight over every output row that tap reaches.
    """
    hh, ww, nn = xt.shape[1], xt.shape[2], xt.shape[3]
    oo, ho, wo = y.shape[0], y.shape[1], y.shape[2]
    n = uint64(nn)
    rowlen = uint64(ww) * n
    iplane = uint64(hh) * rowlen
    orow = uint64(wo) * n
    kk = kh * kw
    xf = xt.ravel()
    yf = y.ravel()
    for t in prange(nchunk):
        srcs = np.empty(8, np.uint64)
        vals = np.empty(8, np.float32)
        for o in range(t * oo // nchunk, (t + 1) * oo // nchunk):
            d = uint64(o) * uint64(ho) * orow
            b = bias[o]
            for k in range(uint64(ho) * orow):
                yf[d + k] = b
            cbase = (o // cout_g) * cin_g
            p = indptr[o]
            while p < indptr[o + 1]:
                tap = cols[order[p]] % kk
                ky = tap // kw
                kx = tap - ky * kw
                y0, y1 = _x_range(ky, ph, sh, hh, ho)
                x0, x1 = _x_range(kx, pw, sw, ww, wo)
                m = 0
                while p < indptr[o + 1] and cols[order[p]] % kk == tap and m < 8:
                    q = order[p]
                    # may wrap below zero: only the sums with in-range rows and columns are used
                    srcs[m] = uint64(cbase + cols[q] // kk) * iplane + uint64((ky - ph) * ww + kx - pw) * n
                    vals[m] = values[q]
                    m += 1
                    p += 1
                if y0 >= y1 or x0 >= x1:
                    continue
                for oy in range(uint64(y0), uint64(y1)):
                    shift = oy * uint64(sh) * rowlen
                    if sw == 1:
                        _passes(yf, d + oy * orow + uint64(x0) * n, xf, srcs, vals, m, shift + uint64(x0) * n, uint64(x1 - x0) * n, b, False)
                    else:
                        for x in range(uint64(x0), uint64(x1)):
                            _passes(yf, d + oy * orow + x * n, xf, srcs, vals, m, shift + x * uint64(sw) * n, n, b, False)


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
    """dx (CHWN) of a strided conv from dyt (CHWN); slots listed by input channel (CSC-like).

    One task per (input channel, input row) gathers every contribution to that row: no atomics.
    (Stride-1 input gradients run as a forward conv with the transposed, flipped weight.)
    """
    ho, wo, nn = dyt.shape[1], dyt.shape[2], dyt.shape[3]
    cc, hh, ww = dx.shape[0], dx.shape[1], dx.shape[2]
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
        _store_row(acc, xf, task, ww * nn)


@njit(cache=True)
def _row_runs(rows: np.ndarray) -> np.ndarray:
    """Boundaries of the runs of equal consecutive `rows`: [0, ..., len(rows)]."""
    bounds = np.empty(rows.shape[0] + 1, np.int64)
    g = 0
    bounds[0] = 0
    for k in range(1, rows.shape[0] + 1):
        if k == rows.shape[0] or rows[k] != rows[k - 1]:
            g += 1
            bounds[g] = k
    return bounds[: g + 1]


@njit(cache=True)
def _groups(bounds: np.ndarray, size: int) -> np.ndarray:
    """The runs [bounds[i], bounds[i+1]) cut into consecutive groups of at most `size`: their boundaries."""
    out = np.empty(bounds[-1] + 1, np.int64)
    g = 0
    out[0] = 0
    for i in range(bounds.shape[0] - 1):
        k = bounds[i]
        while k < bounds[i + 1]:
            k = min(k + size, bounds[i + 1])
            g += 1
            out[g] = k
    return out[: g + 1]


@njit(inline="always", fastmath=FASTMATH)
def _row_dot(df: np.ndarray, d0: int, xf: np.ndarray, x0: int, x1: int, sw: int, n: int, xb: int) -> float:
    """sum over x in [x0, x1), j < n of df[d0 + x*n + j] * xf[xb + x*sw*n + j], float32 within each run."""
    total = 0.0
    runs = 1 if sw == 1 else x1 - x0
    ln = uint64(x1 - x0) * n if sw == 1 else n
    for r in range(runs):
        x = uint64(x0 + r)
        a, c = d0 + x * n, xb + x * uint64(sw) * n
        s = np.float32(0.0)
        for j in range(ln):
            s += df[a + j] * xf[c + j]
        total += s
    return total


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
    nchunk: int,
    groups: tuple[np.ndarray, np.ndarray],
) -> None:
    """out[k] = dL/dW at position (rows[k], cols[k]) from dyt and xt (both CHWN), in `nchunk` tasks (one per thread);
    `groups` is `position_groups(rows, cols, kh * kw, stride 1)`.

    The positions of each output channel, in kernel-tap order and four at a time, share the loads of
    the output gradient over the rows and columns all four reach (stride 1); the rest are single
    dots. Float32 within a run, float64 across runs.
    """
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
    order, starts = groups
    ngroups = starts.shape[0] - 1
    for t in prange(nchunk):
        xb = np.empty(4, np.uint64)  # input offset of output pixel (0, 0) for each position of a group
        y0s, y1s, x0s, x1s = np.empty(4, np.int64), np.empty(4, np.int64), np.empty(4, np.int64), np.empty(4, np.int64)
        tot = np.empty(4)
        for gi in range(t * ngroups // nchunk, (t + 1) * ngroups // nchunk):
            k0, g = starts[gi], starts[gi + 1] - starts[gi]
            o = rows[order[k0]]
            tot[:] = 0.0
            r0, r1, c0, c1 = 0, ho, 0, wo
            for i in range(g):
                ci, ky, kx = _unpack(cols[order[k0 + i]], kk, kw)
                c = (o // cout_g) * cin_g + ci
                x0s[i], x1s[i] = _x_range(kx, pw, sw, ww, wo)
                y0s[i], y1s[i] = _x_range(ky, ph, sh, hh, ho)
                # may wrap below zero: only offsets of in-range rows and columns are used
                xb[i] = uint64(c) * iplane + uint64((ky - ph) * ww + kx - pw) * n
                r0, r1, c0, c1 = max(r0, y0s[i]), min(r1, y1s[i]), max(c0, x0s[i]), min(c1, x1s[i])
            for oy in range(ho):
                dbase = uint64(o) * oplane + uint64(oy) * orow
                yoff = uint64(oy * sh) * irow
                if g == 4 and r0 <= oy < r1 and c0 < c1:
                    a0 = uint64(c0) * n
                    d0 = dbase + a0
                    p0, p1, p2, p3 = xb[0] + yoff + a0, xb[1] + yoff + a0, xb[2] + yoff + a0, xb[3] + yoff + a0
                    s0 = s1 = s2 = s3 = np.float32(0.0)
                    for j in range(uint64(c1 - c0) * n):
                        gv = df[d0 + j]
                        s0 += gv * xf[p0 + j]
                        s1 += gv * xf[p1 + j]
                        s2 += gv * xf[p2 + j]
                        s3 += gv * xf[p3 + j]
                    tot[0] += s0
                    tot[1] += s1
                    tot[2] += s2
                    tot[3] += s3
                    for i in range(4):  # the columns outside the shared range
                        if x0s[i] < c0:
                            tot[i] += _row_dot(df, dbase, xf, x0s[i], c0, 1, n, xb[i] + yoff)
                        if x1s[i] > c1:
                            tot[i] += _row_dot(df, dbase, xf, c1, x1s[i], 1, n, xb[i] + yoff)
                else:
                    for i in range(g):
                        if y0s[i] <= oy < y1s[i] and x0s[i] < x1s[i]:
                            tot[i] += _row_dot(df, dbase, xf, x0s[i], x1s[i], sw, n, xb[i] + yoff)
            for i in range(g):
                out[order[k0 + i]] = tot[i]


@njit(cache=True)
def position_groups(rows: np.ndarray, cols: np.ndarray, kk: int, stride_one: bool) -> tuple[np.ndarray, np.ndarray]:
    """(order, group starts) for conv_sampled_grad: positions of each output channel in kernel-tap order,
    cut into groups of four (stride 1) or one."""
    runs = _row_runs(rows)
    return tap_order(runs, cols, kk), _groups(runs, 4 if stride_one else 1)
