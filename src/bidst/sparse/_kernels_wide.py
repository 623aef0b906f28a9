"""Numba kernels for sparse Conv2d on "wide rows": one fused pass per image, NCHW in and out.

With an image zero-padded to width Wp, output pixel (oy, x) of a stride-1 conv reads padded pixel
(oy + ky, x + kx): flat offset ky * Wp + kx from k = oy * Wp + x. Computing outputs on a Ho x Wp
grid (the Wp - Wo extra columns are dropped) turns every active weight into ONE contiguous
axpy/dot of length (Ho - 1) * Wp + Wo per image: long vectors for large maps. A stride-s conv is
the stride-1 conv of the space-to-depth image (s*s phases as channels, kernel ceil(k/s)), see
SparseStructure.space_to_depth. The input gradient is the forward conv of the output gradient,
padded by k - 1, with the transposed, flipped weight (SparseStructure.by_input).

Each image is padded (or space-to-depth transformed) into a per-task buffer that stays in cache,
so a training step reads x, dy and writes y, dx once each, like a dense convolution: no layout
copies in memory. Where no phase split or crop is needed, a buffer is zeroed once per task and
each image writes only its interior (_place): short zero-fill loops per row cost as much as the
copy. Offsets are uint64 to keep Numba's wraparound checks out of hot loops.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from ._kernels_linear import FASTMATH

# (stride s, top and left input padding, padded (and space-to-depth) image height hs and width ws,
# working kernel kh x kw, original kernel kh0 x kw0, output channels and working input channels a group)
WideGeometry = tuple[int, int, int, int, int, int, int, int, int, int, int]


@njit(inline="always")
def _wide_offset(col: int, kk: int, kw: int, plane: int, wp: int) -> int:
    """Flat offset in a padded image of the (channel-in-group, ky, kx) encoded by `col`."""
    ci = col // kk
    r = col - ci * kk
    ky = r // kw
    return ci * plane + ky * wp + (r - ky * kw)


@njit(cache=True)
def _copy_phase(
    src: np.ndarray, s0: int, h: int, w: int, dst: np.ndarray, d0: int, hd: int, wd: int, s: int, r: int, q: int, top: int, left: int
) -> None:
    """dst[d0 + i*wd + j] = src[s0 + (s*i + r - top)*w + s*j + q - left] where that lies inside the (h, w) source plane.

    With s = 1 (r = q = 0) a zero padding by (top, left); negative shifts crop. Entries outside the
    source plane are not written: the buffer is zeroed once per task and they stay zero, as the
    written region depends only on the geometry.
    """
    j0, j1 = max(0, (left - q + s - 1) // s), min(wd, (w - 1 + left - q) // s + 1)
    if j0 >= j1:
        return
    for i in range(hd):
        y = s * i + r - top
        if y < 0 or y >= h:
            continue
        d = uint64(d0 + i * wd)
        sb = uint64(s0 + y * w + q - left)  # may wrap below zero: only sb + s*j, s*j >= left - q, is used
        if s == 1:  # a contiguous copy, vectorized
            for j in range(uint64(j0), uint64(j1)):
                dst[d + j] = src[sb + j]
        else:
            for j in range(uint64(j0), uint64(j1)):
                dst[d + j] = src[sb + j * uint64(s)]


@njit(cache=True, fastmath=FASTMATH)
def _place(src: np.ndarray, s0: int, h: int, w: int, dst: np.ndarray, d0: int, wd: int, top: int, left: int, want_sum: bool) -> float:
    """dst[d0 + (top + i)*wd + left + j] = src[s0 + i*w + j] for i < h, j < w; the sum of the plane if want_sum, else 0.

    Writes only the interior of a padded plane: callers zero the buffer once (see _fits), so each
    image costs one row copy per row and no zero fill. The sum (the bias gradient's share of this
    plane) is float32 within a row and float64 across rows.
    """
    total = 0.0
    for i in range(uint64(h)):
        sb = uint64(s0) + i * uint64(w)
        db = uint64(d0) + (i + uint64(top)) * uint64(wd) + uint64(left)
        if want_sum:
            r = np.float32(0.0)
            for j in range(uint64(w)):
                v = src[sb + j]
                dst[db + j] = v
                r += v
            total += r
        else:
            for j in range(uint64(w)):
                dst[db + j] = src[sb + j]
    return total


@njit(inline="always")
def _fits(s: int, top: int, left: int, h: int, w: int, hs: int, ws: int) -> bool:
    """Whether an h x w plane placed at (top, left) lies inside an hs x ws one without a phase split (stride 1)."""
    return s == 1 and top >= 0 and left >= 0 and top + h <= hs and left + w <= ws


@njit(cache=True)
def _prep_image(
    xf: np.ndarray, n: int, cc: int, h: int, w: int, buf: np.ndarray, s: int, top: int, left: int, hs: int, ws: int, kh: int, kw: int
) -> None:
    """buf = image n of x zero-padded by (top, left) and, for s > 1, space-to-depth: (c*s + r)*s + q planes.

    Phases r >= kh or q >= kw hold no weight and are left unwritten (never read). Only the entries
    that come from the image are written: buf must come zeroed (np.zeros) and stay so outside them.
    """
    plane = hs * ws
    if _fits(s, top, left, h, w, hs, ws):
        for c in range(cc):
            _place(xf, (n * cc + c) * h * w, h, w, buf, c * plane, ws, top, left, False)
        return
    for c in range(cc):
        for r in range(min(s, kh)):
            for q in range(min(s, kw)):
                _copy_phase(xf, (n * cc + c) * h * w, h, w, buf, ((c * s + r) * s + q) * plane, hs, ws, s, r, q, top, left)


@njit(cache=True, fastmath=FASTMATH)
def _conv_rows(
    indptr: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    o: int,
    b: float,
    src: np.ndarray,
    base: int,
    plane: int,
    wp: int,
    kk: int,
    kw: int,
    acc: np.ndarray,
    rows: int,
    width: int,
    dst: np.ndarray,
    d0: int,
    dstride: int,
) -> None:
    """dst[d0 + i*dstride + j] = b + sum over slots p of row o of values[p] * src[base + offset(p) + i*wp + j]
    for i < rows, j < width: accumulated on the wide grid in acc (one contiguous run per slot), then
    copied out row by row without the wp - width extra columns."""
    span = uint64((rows - 1) * wp + width)
    p = indptr[o]
    end = indptr[o + 1]
    if p == end:
        for k in range(span):
            acc[k] = b
    # the last one to three slots share one pass, done first: it sets acc (no separate pass for b)
    m = (end - p) % 4
    e = end - m
    if m == 3:
        s0 = uint64(base + _wide_offset(cols[e], kk, kw, plane, wp))
        s1 = uint64(base + _wide_offset(cols[e + 1], kk, kw, plane, wp))
        s2 = uint64(base + _wide_offset(cols[e + 2], kk, kw, plane, wp))
        v0, v1, v2 = values[e], values[e + 1], values[e + 2]
        for k in range(span):
            acc[k] = b + ((v0 * src[s0 + k] + v1 * src[s1 + k]) + v2 * src[s2 + k])
    elif m == 2:
        s0 = uint64(base + _wide_offset(cols[e], kk, kw, plane, wp))
        s1 = uint64(base + _wide_offset(cols[e + 1], kk, kw, plane, wp))
        v0, v1 = values[e], values[e + 1]
        for k in range(span):
            acc[k] = b + (v0 * src[s0 + k] + v1 * src[s1 + k])
    elif m == 1:
        s0 = uint64(base + _wide_offset(cols[e], kk, kw, plane, wp))
        v0 = values[e]
        for k in range(span):
            acc[k] = b + v0 * src[s0 + k]
    first = m == 0  # then the first group below sets acc
    # up to eight slots per pass cut the loads and stores of acc, the bottleneck of this loop
    while p + 8 <= e:
        s0 = uint64(base + _wide_offset(cols[p], kk, kw, plane, wp))
        s1 = uint64(base + _wide_offset(cols[p + 1], kk, kw, plane, wp))
        s2 = uint64(base + _wide_offset(cols[p + 2], kk, kw, plane, wp))
        s3 = uint64(base + _wide_offset(cols[p + 3], kk, kw, plane, wp))
        s4 = uint64(base + _wide_offset(cols[p + 4], kk, kw, plane, wp))
        s5 = uint64(base + _wide_offset(cols[p + 5], kk, kw, plane, wp))
        s6 = uint64(base + _wide_offset(cols[p + 6], kk, kw, plane, wp))
        s7 = uint64(base + _wide_offset(cols[p + 7], kk, kw, plane, wp))
        v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
        v4, v5, v6, v7 = values[p + 4], values[p + 5], values[p + 6], values[p + 7]
        if first:
            for k in range(span):
                acc[k] = b + (((v0 * src[s0 + k] + v1 * src[s1 + k]) + (v2 * src[s2 + k] + v3 * src[s3 + k])) + (
                    (v4 * src[s4 + k] + v5 * src[s5 + k]) + (v6 * src[s6 + k] + v7 * src[s7 + k])
                ))
            first = False
        else:
            for k in range(span):
                acc[k] += ((v0 * src[s0 + k] + v1 * src[s1 + k]) + (v2 * src[s2 + k] + v3 * src[s3 + k])) + (
                    (v4 * src[s4 + k] + v5 * src[s5 + k]) + (v6 * src[s6 + k] + v7 * src[s7 + k])
                )
        p += 8
    if p < e:  # four slots left before the tail
        s0 = uint64(base + _wide_offset(cols[p], kk, kw, plane, wp))
        s1 = uint64(base + _wide_offset(cols[p + 1], kk, kw, plane, wp))
        s2 = uint64(base + _wide_offset(cols[p + 2], kk, kw, plane, wp))
        s3 = uint64(base + _wide_offset(cols[p + 3], kk, kw, plane, wp))
        v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
        if first:
            for k in range(span):
                acc[k] = b + ((v0 * src[s0 + k] + v1 * src[s1 + k]) + (v2 * src[s2 + k] + v3 * src[s3 + k]))
        else:
            for k in range(span):
                acc[k] += (v0 * src[s0 + k] + v1 * src[s1 + k]) + (v2 * src[s2 + k] + v3 * src[s3 + k])
    for i in range(uint64(rows)):
        for j in range(uint64(width)):
            dst[uint64(d0) + i * uint64(dstride) + j] = acc[i * uint64(wp) + j]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def wide_forward(
    x: np.ndarray,
    indptr: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    bias: np.ndarray,
    y: np.ndarray,
    geometry: WideGeometry,
    nchunk: int,
) -> None:
    """y (NCHW) = sparse conv of x (NCHW) with the working weight (see WideGeometry).

    The images are split into `nchunk` contiguous chunks, one task (thread) each, so that every
    task allocates its buffers once.
    """
    s, top, left, hs, ws, kh, kw, kh0, kw0, cout_g, cin_w = geometry
    nn, cc, h, w = x.shape
    oo, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    c2 = cc * s * s
    kk = kh * kw
    plane = hs * ws
    xf = x.ravel()
    yf = y.ravel()
    for t in prange(nchunk):
        buf = np.zeros(c2 * plane, np.float32)  # zeroed once: images write only their interior
        acc = np.empty(ho * ws, np.float32)
        for n in range(t * nn // nchunk, (t + 1) * nn // nchunk):
            _prep_image(xf, n, cc, h, w, buf, s, top, left, hs, ws, kh0, kw0)
            for o in range(oo):
                _conv_rows(indptr, cols, values, o, bias[o], buf, (o // cout_g) * cin_w * plane, plane, ws, kk, kw, acc,
                           ho, wo, yf, (n * oo + o) * ho * wo, wo)  # fmt: skip


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def wide_backward(
    x: np.ndarray,
    dy: np.ndarray,
    t_ptr: np.ndarray,
    t_cols: np.ndarray,
    t_values: np.ndarray,
    pos_rows: np.ndarray,
    pos_cols: np.ndarray,
    dx: np.ndarray,
    grad_w: np.ndarray,
    grad_b: np.ndarray,
    geometry: WideGeometry,
    need_dx: bool,
    need_db: bool,
    nchunk: int,
) -> None:
    """Input gradient dx (NCHW, if need_dx), weight gradient at working positions (pos_rows, pos_cols)
    and bias gradient (if need_db), in one pass over x and dy split into `nchunk` image chunks (one per thread).

    (t_ptr, t_cols, t_values): the transposed, flipped working weight. grad_w is (nchunk, n positions)
    and grad_b (nchunk, out channels), both float64, summed by the caller.
    """
    s, top, left, hs, ws, kh, kw, kh0, kw0, cout_g, cin_w = geometry
    nn, cc, h, w = x.shape
    oo, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
    c2 = cc * s * s
    kk = kh * kw
    plane = hs * ws
    # dy padded by k - 1 (the input of the transposed conv); at stride 1 the input padding is cropped here
    dt, dl = (kh - 1 - top, kw - 1 - left) if s == 1 else (kh - 1, kw - 1)
    hd, wd = (h, w) if s == 1 else (hs, ws)  # transposed conv output
    hd, wd = hd + kh - 1, wd + kw - 1
    dfits = _fits(1, dt, dl, ho, wo, hd, wd)
    shared = wd == ws and dfits  # the padded dy also serves the weight gradient
    wspan = (ho - 1) * ws + wo
    xoff = np.empty(pos_rows.shape[0], np.int64)
    for k in range(pos_rows.shape[0]):
        xoff[k] = (pos_rows[k] // cout_g) * cin_w * plane + _wide_offset(pos_cols[k], kk, kw, plane, ws)
    xf = x.ravel()
    df = dy.ravel()
    dxf = dx.ravel()
    for t in prange(nchunk):
        # zeroed once: images write only their interior (_place, _copy_phase), the borders stay zero
        xbuf = np.zeros(c2 * plane, np.float32)
        dbuf = np.zeros(oo * hd * wd, np.float32)
        wbuf = np.zeros(0 if shared else oo * ho * ws, np.float32)
        acc = np.empty(hd * wd, np.float32)
        cbuf = np.empty(0 if s == 1 else c2 * plane, np.float32)
        for n in range(t * nn // nchunk, (t + 1) * nn // nchunk):
            for o in range(oo):
                s0 = (n * oo + o) * ho * wo
                if shared:  # the bias gradient is summed in the same pass as the copy
                    total = _place(df, s0, ho, wo, dbuf, o * hd * wd, wd, dt, dl, need_db)
                else:
                    if need_dx and dfits:
                        _place(df, s0, ho, wo, dbuf, o * hd * wd, wd, dt, dl, False)
                    elif need_dx:
                        _copy_phase(df, s0, ho, wo, dbuf, o * hd * wd, hd, wd, 1, 0, 0, dt, dl)
                    total = _place(df, s0, ho, wo, wbuf, o * ho * ws, ws, 0, 0, need_db)
                if need_db:
                    grad_b[t, o] += total
            if need_dx:
                for c in range(c2):
                    if s > 1 and ((c // s) % s >= kh0 or c % s >= kw0):
                        continue  # a phase no weight reads: zero gradient, written by _depth_to_space
                    d0, dstride = ((n * cc + c) * h * w, w) if s == 1 else (c * plane, ws)
                    _conv_rows(t_ptr, t_cols, t_values, c, np.float32(0.0), dbuf, (c // cin_w) * cout_g * hd * wd, hd * wd, wd,
                               kk, kw, acc, hd - kh + 1, wd - kw + 1, dxf if s == 1 else cbuf, d0, dstride)  # fmt: skip
                if s > 1:
                    _depth_to_space(cbuf, dxf, n, cc, h, w, s, top, left, hs, ws, kh0, kw0)
            if pos_rows.shape[0]:
                _prep_image(xf, n, cc, h, w, xbuf, s, top, left, hs, ws, kh0, kw0)
                src, d_off, dplane = (dbuf, dt * wd + dl, hd * wd) if shared else (wbuf, 0, ho * ws)
                _positions_grad(src, xbuf, pos_rows, xoff, dplane, d_off, wspan, grad_w[t])


@njit(inline="always", fastmath=FASTMATH)
def _positions_grad(
    src: np.ndarray, xbuf: np.ndarray, rows: np.ndarray, xoff: np.ndarray, dplane: int, d_off: int, span: int, out: np.ndarray
) -> None:
    """out[k] += dot(src row rows[k] (from d_off), xbuf from xoff[k]) over `span`; up to four consecutive
    positions of the same output channel share each load of the output gradient (three or two for
    the last ones of a channel)."""
    k, npos = 0, rows.shape[0]
    while k < npos:
        r = rows[k]
        d0 = uint64(r * dplane + d_off)
        if k + 4 <= npos and rows[k + 1] == r and rows[k + 2] == r and rows[k + 3] == r:
            x0, x1, x2, x3 = uint64(xoff[k]), uint64(xoff[k + 1]), uint64(xoff[k + 2]), uint64(xoff[k + 3])
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(uint64(span)):
                g = src[d0 + j]
                a0 += g * xbuf[x0 + j]
                a1 += g * xbuf[x1 + j]
                a2 += g * xbuf[x2 + j]
                a3 += g * xbuf[x3 + j]
            out[k] += a0
            out[k + 1] += a1
            out[k + 2] += a2
            out[k + 3] += a3
            k += 4
        elif k + 3 <= npos and rows[k + 1] == r and rows[k + 2] == r:
            x0, x1, x2 = uint64(xoff[k]), uint64(xoff[k + 1]), uint64(xoff[k + 2])
            a0 = a1 = a2 = np.float32(0.0)
            for j in range(uint64(span)):
                g = src[d0 + j]
                a0 += g * xbuf[x0 + j]
                a1 += g * xbuf[x1 + j]
                a2 += g * xbuf[x2 + j]
            out[k] += a0
            out[k + 1] += a1
            out[k + 2] += a2
            k += 3
        elif k + 2 <= npos and rows[k + 1] == r:
            x0, x1 = uint64(xoff[k]), uint64(xoff[k + 1])
            a0 = a1 = np.float32(0.0)
            for j in range(uint64(span)):
                g = src[d0 + j]
                a0 += g * xbuf[x0 + j]
                a1 += g * xbuf[x1 + j]
            out[k] += a0
            out[k + 1] += a1
            k += 2
        else:
            x0 = uint64(xoff[k])
            a0 = np.float32(0.0)
            for j in range(uint64(span)):
                a0 += src[d0 + j] * xbuf[x0 + j]
            out[k] += a0
            k += 1


@njit(cache=True)
def _depth_to_space(
    buf: np.ndarray, dxf: np.ndarray, n: int, cc: int, h: int, w: int, s: int, top: int, left: int, hs: int, ws: int, kh: int, kw: int
) -> None:
    """Image n of dx (NCHW) from its space-to-depth gradient buf, dropping the padding (inverse of _prep_image).

    Only phases r < kh, q < kw of the original kh x kw kernel are read; pixels of the other phases,
    and pixels cropped away before the conv, get a zero gradient.
    """
    plane = hs * ws
    if kh < s or kw < s or hs * s < h + top or ws * s < w + left:
        for j in range(uint64(n * cc * h * w), uint64((n + 1) * cc * h * w)):
            dxf[j] = 0.0
    for c in range(cc):
        d0 = (n * cc + c) * h * w
        for r in range(min(s, kh)):
            for q in range(min(s, kw)):
                j0, j1 = max(0, (left - q + s - 1) // s), min(ws, (w - 1 + left - q) // s + 1)
                b0 = ((c * s + r) * s + q) * plane
                for i in range(hs):
                    y = s * i + r - top
                    if y < 0 or y >= h:
                        continue
                    db = uint64(d0 + y * w + q - left)  # may wrap: only db + s*j, s*j >= left - q, is used
                    sb = uint64(b0 + i * ws)
                    for j in range(uint64(j0), uint64(j1)):
                        dxf[db + j * uint64(s)] = buf[sb + j]
