"""Exact top-k selection over the eligible entries of a flat float32 array, in two linear passes (Numba).

Why: a DST update step selects the k best of up to millions of positions per layer (drop among
the actives, growth among the inactives). `torch.topk` with a mask costs several full passes and a
partial sort on CPU, and dominated the update step at high sparsity. Here each score is mapped to
an order-preserving 32-bit key; one pass histograms the keys' top 16 bits over the eligible
entries, which locates the bucket holding the k-th key, and a second pass collects everything above
that bucket plus the bucket's few entries, and one sort of those orders them.
"""

from __future__ import annotations

import numpy as np
from numba import int64, njit, uint64

_BUCKETS = 1 << 16
_SIGN = 1 << 31
_ALL = (1 << 32) - 1


@njit(inline="always")
def _key(bits: np.uint32, largest: bool) -> int:
    """A key in [0, 2**32) ordered like the float whose bits these are (reversed if not `largest`).

    -0.0 maps to +0.0's key so that the two tie, as they compare equal.
    """
    b = int64(bits)
    if b == _SIGN:
        b = 0
    key = _ALL - b if b >= _SIGN else b + _SIGN
    return key if largest else _ALL - key


@njit(cache=True)
def top_k(scores: np.ndarray, eligible: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Indices of the k eligible entries with the largest (smallest if not `largest`) scores.

    Ties go to the lower index; the result is ordered best first, ties by index. NaN ranks above
    +inf. With fewer than k eligible entries (or k <= 0) the result is empty. At most 2**32 entries.
    """
    bits = scores.view(np.uint32)
    hist = np.zeros(_BUCKETS, np.int64)
    for i in range(bits.size):
        if eligible[i]:
            hist[_key(bits[i], largest) >> 16] += 1
    if k <= 0 or hist.sum() < k:
        return np.empty(0, np.int64)
    bucket = _BUCKETS - 1
    above = 0
    while above + hist[bucket] < k:
        above += hist[bucket]
        bucket -= 1
    # every candidate (above the bucket or in it) as one uint64 that orders like (key, -index): sorted
    # descending, the first k are the answer, best first and ties by index, in a single sort
    order = np.empty(above + hist[bucket], np.uint64)
    n = 0
    for i in range(bits.size):
        if eligible[i]:
            key = _key(bits[i], largest)
            if key >> 16 >= bucket:
                order[n] = (uint64(key) << uint64(32)) | uint64(_ALL - i)  # the index's complement below the key
                n += 1
    best = np.sort(order)[::-1][:k]
    return _ALL - (best & uint64(_ALL)).astype(np.int64)
