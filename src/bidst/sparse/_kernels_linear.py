"""Numba kernels for sparse Linear layers, batch-innermost ("transposed") layout for SIMD over the batch.

Activations are held as (features, batch) arrays so that every active weight touches one contiguous
batch-long row; the batch loop is what vectorizes. Indices are cast to uint64 in hot loops so that
Numba emits no negative-index wraparound checks, which otherwise block vectorization.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

# reassoc lets LLVM vectorize dot-product reductions (summation order changes within float rounding);
# contract allows fused multiply-add. No nnan/ninf: NaN and inf propagate as in PyTorch.
FASTMATH = {"reassoc", "contract", "nsz"}


@njit(inline="always", fastmath=FASTMATH)
def _accumulate(yf: np.ndarray, yo: int, nb: int, xf: np.ndarray, cols: np.ndarray, values: np.ndarray, p: int, end: int) -> None:
    """yf[yo:yo+nb] += sum over slots p..end-1 of values[p] * (row cols[p] of xf, nb long)."""
    # up to eight slots per pass cut the loads and stores of the output row, the bottleneck of this
    # loop; the last one to three slots share one pass too
    while p + 8 <= end:
        x0 = uint64(cols[p]) * nb
        x1 = uint64(cols[p + 1]) * nb
        x2 = uint64(cols[p + 2]) * nb
        x3 = uint64(cols[p + 3]) * nb
        x4 = uint64(cols[p + 4]) * nb
        x5 = uint64(cols[p + 5]) * nb
        x6 = uint64(cols[p + 6]) * nb
        x7 = uint64(cols[p + 7]) * nb
        v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
        v4, v5, v6, v7 = values[p + 4], values[p + 5], values[p + 6], values[p + 7]
        for b in range(nb):
            yf[yo + b] += ((v0 * xf[x0 + b] + v1 * xf[x1 + b]) + (v2 * xf[x2 + b] + v3 * xf[x3 + b])) + (
                (v4 * xf[x4 + b] + v5 * xf[x5 + b]) + (v6 * xf[x6 + b] + v7 * xf[x7 + b])
            )
        p += 8
    if p + 4 <= end:
        x0 = uint64(cols[p]) * nb
        x1 = uint64(cols[p + 1]) * nb
        x2 = uint64(cols[p + 2]) * nb
        x3 = uint64(cols[p + 3]) * nb
        v0, v1, v2, v3 = values[p], values[p + 1], values[p + 2], values[p + 3]
        for b in range(nb):
            yf[yo + b] += (v0 * xf[x0 + b] + v1 * xf[x1 + b]) + (v2 * xf[x2 + b] + v3 * xf[x3 + b])
        p += 4
    m = end - p
    if m == 3:
        x0 = uint64(cols[p]) * nb
        x1 = uint64(cols[p + 1]) * nb
        x2 = uint64(cols[p + 2]) * nb
        v0, v1, v2 = values[p], values[p + 1], values[p + 2]
        for b in range(nb):
            yf[yo + b] += (v0 * xf[x0 + b] + v1 * xf[x1 + b]) + v2 * xf[x2 + b]
    elif m == 2:
        x0 = uint64(cols[p]) * nb
        x1 = uint64(cols[p + 1]) * nb
        v0, v1 = values[p], values[p + 1]
        for b in range(nb):
            yf[yo + b] += v0 * xf[x0 + b] + v1 * xf[x1 + b]
    elif m == 1:
        x0 = uint64(cols[p]) * nb
        v0 = values[p]
        for b in range(nb):
            yf[yo + b] += v0 * xf[x0 + b]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def spmm_t(
    tptr: np.ndarray,
    ntiles: int,
    per: int,
    cols: np.ndarray,
    values: np.ndarray,
    bias: np.ndarray,
    xt: np.ndarray,
    yt: np.ndarray,
) -> None:
    """yt[i, :] = bias[i] + sum over slots p of row i of values[p] * xt[cols[p], :].

    The slots of row i that read column tile t are tptr[i * ntiles + t] .. tptr[i * ntiles + t + 1]
    (`tile_ptr`; with one tile, the CSR row pointer). Each task (one per thread) takes a block of
    `per` consecutive rows and sweeps it once per tile, so the rows of xt it reads meanwhile stay in
    its core's L2 cache.
    """
    nb = uint64(xt.shape[1])
    xf = xt.ravel()
    yf = yt.ravel()
    for c in prange(-(-yt.shape[0] // per)):
        for t in range(ntiles):
            for i in range(c * per, min(yt.shape[0], (c + 1) * per)):
                yo = uint64(i) * nb
                if t == 0:
                    bi = bias[i]
                    for b in range(nb):
                        yf[yo + b] = bi
                k = i * ntiles + t
                _accumulate(yf, yo, nb, xf, cols, values, tptr[k], tptr[k + 1])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def sddmm_t(
    tptr: np.ndarray, ntiles: int, per: int, cols: np.ndarray, at: np.ndarray, bt: np.ndarray, out: np.ndarray
) -> None:
    """out[p] = dot(at[i, :], bt[cols[p], :]) for every slot p of every row i, tiled over bt's rows as spmm_t is."""
    af = at.ravel()
    bf = bt.ravel()
    nb = uint64(at.shape[1])
    for c in prange(-(-at.shape[0] // per)):
        for t in range(ntiles):
            for i in range(c * per, min(at.shape[0], (c + 1) * per)):
                k = i * ntiles + t
                p = tptr[k]
                end = tptr[k + 1]
                ao = uint64(i) * nb
                # four (then two) slots per pass share the loads of row i
                while p + 4 <= end:
                    b0 = uint64(cols[p]) * nb
                    b1 = uint64(cols[p + 1]) * nb
                    b2 = uint64(cols[p + 2]) * nb
                    b3 = uint64(cols[p + 3]) * nb
                    s0 = s1 = s2 = s3 = np.float32(0.0)
                    for b in range(nb):
                        a = af[ao + b]
                        s0 += a * bf[b0 + b]
                        s1 += a * bf[b1 + b]
                        s2 += a * bf[b2 + b]
                        s3 += a * bf[b3 + b]
                    out[p] = s0
                    out[p + 1] = s1
                    out[p + 2] = s2
                    out[p + 3] = s3
                    p += 4
                while p + 2 <= end:
                    b0 = uint64(cols[p]) * nb
                    b1 = uint64(cols[p + 1]) * nb
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    for b in range(nb):
                        a = af[ao + b]
                        s0 += a * bf[b0 + b]
                        s1 += a * bf[b1 + b]
                    out[p] = s0
                    out[p + 1] = s1
                    p += 2
                if p < end:
                    b0 = uint64(cols[p]) * nb
                    s0 = np.float32(0.0)
                    for b in range(nb):
                        s0 += af[ao + b] * bf[b0 + b]
                    out[p] = s0


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def sampled_dot_t(
    rows: np.ndarray, cols: np.ndarray, at: np.ndarray, bt: np.ndarray, out: np.ndarray
) -> None:
    """out[k] = dot(at[rows[k], :], bt[cols[k], :]): weight gradient at given positions (SDDMM)."""
    nb = uint64(at.shape[1])
    af = at.ravel()
    bf = bt.ravel()
    for k in prange(rows.shape[0]):
        ao = uint64(rows[k]) * nb
        bo = uint64(cols[k]) * nb
        s = np.float32(0.0)
        for b in range(nb):
            s += af[ao + b] * bf[bo + b]
        out[k] = s


@njit(parallel=True, cache=True)
def transpose(x: np.ndarray, out: np.ndarray) -> None:
    """out[f, b] = x[b, f] for C-contiguous (B, F) x and (F, B) out, in 8x8 tiles (bands of 8 columns in parallel).

    An 8x8 tile reads eight short runs of x and writes eight of out, so neither side strides across
    a power-of-two row length on every element (which thrashes one cache set), as PyTorch's strided
    copy does.
    """
    nb, nf = x.shape
    xf = x.ravel()
    of = out.ravel()
    nbu = uint64(nb)
    nfu = uint64(nf)
    full = uint64(nb - nb % 8)
    for t in prange((nf + 7) // 8):
        f0 = uint64(t * 8)
        fw = min(uint64(8), nfu - f0)
        for bb in range(0, full, 8):
            b0 = uint64(bb)
            for f in range(fw):
                o = (f0 + f) * nbu + b0
                i = b0 * nfu + f0 + f
                for b in range(8):
                    of[o + uint64(b)] = xf[i + uint64(b) * nfu]
        for f in range(fw):
            for b in range(full, nbu):
                of[(f0 + f) * nbu + b] = xf[b * nfu + f0 + f]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def spmm_sddmm_t(
    ptr: np.ndarray,
    per: int,
    outs: np.ndarray,
    perm: np.ndarray,
    values: np.ndarray,
    dyt: np.ndarray,
    xt: np.ndarray,
    dxt: np.ndarray,
    dv: np.ndarray,
) -> None:
    """Both gradients of a sparse Linear layer in one sweep over its slots grouped by input (`by_input`).

    For input i and each of its slots q = ptr[i] .. ptr[i + 1] - 1 (output outs[q], CSR slot perm[q]):
    dxt[i, :] = sum of values[perm[q]] * dyt[outs[q], :] and dv[perm[q]] = dot(dyt[outs[q], :], xt[i, :]).
    Each gathered row of dyt serves both products, so the sweep gathers half the rows that spmm_t
    and sddmm_t called one after the other would (`benchmarks/fused_backward.py`: 0.70-0.99 of the
    pair's time on a 2-core AVX2 VM).
    Each task (one per thread) takes a block of `per` consecutive inputs.
    """
    nb = uint64(xt.shape[1])
    gf = dyt.ravel()
    xf = xt.ravel()
    df = dxt.ravel()
    for c in prange(-(-dxt.shape[0] // per)):
        for i in range(c * per, min(dxt.shape[0], (c + 1) * per)):
            io = uint64(i) * nb
            for b in range(nb):
                df[io + b] = 0.0
            q = ptr[i]
            end = ptr[i + 1]
            # four slots per pass share the loads and stores of row i of dxt and the loads of row i of xt
            while q + 4 <= end:
                p0, p1, p2, p3 = perm[q], perm[q + 1], perm[q + 2], perm[q + 3]
                g0 = uint64(outs[q]) * nb
                g1 = uint64(outs[q + 1]) * nb
                g2 = uint64(outs[q + 2]) * nb
                g3 = uint64(outs[q + 3]) * nb
                v0, v1, v2, v3 = values[p0], values[p1], values[p2], values[p3]
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for b in range(nb):
                    a0 = gf[g0 + b]
                    a1 = gf[g1 + b]
                    a2 = gf[g2 + b]
                    a3 = gf[g3 + b]
                    xb = xf[io + b]
                    df[io + b] += (v0 * a0 + v1 * a1) + (v2 * a2 + v3 * a3)
                    s0 += a0 * xb
                    s1 += a1 * xb
                    s2 += a2 * xb
                    s3 += a3 * xb
                dv[p0] = s0
                dv[p1] = s1
                dv[p2] = s2
                dv[p3] = s3
                q += 4
            while q < end:
                p0 = perm[q]
                g0 = uint64(outs[q]) * nb
                v0 = values[p0]
                s0 = np.float32(0.0)
                for b in range(nb):
                    a0 = gf[g0 + b]
                    df[io + b] += v0 * a0
                    s0 += a0 * xf[io + b]
                dv[p0] = s0
                q += 1
