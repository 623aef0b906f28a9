"""Exact top-k selection over the eligible entries of a flat float32 array, in two linear passes (Numba).

Why: a DST update step selects the k best of up to millions of positions per layer (drop among
the actives, growth among the inactives). `torch.topk` with a mask costs several full passes and a
partial sort on CPU, and dominated the update step at high sparsity. Here each score is mapped to
an order-preserving 32-bit key; one pass histograms the keys' top 16 bits over the eligible
entries, which locates the bucket holding the k-th key, and a second pass collects everything above
that bucket plus the bucket's few entries, of which only those are sorted.
"""

from __future__ import annotations

import numpy as np
from numba import int64, njit

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
    +inf. With fewer than k eligible entries (or k <= 0) the result is empty.
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
    idx = np.empty(above + hist[bucket], np.int64)
    keys = np.empty(above + hist[bucket], np.int64)
    n_above, n_at = 0, above
    for i in range(bits.size):
        if eligible[i]:
            key = _key(bits[i], largest)
            b = key >> 16
            if b > bucket:
                idx[n_above], keys[n_above] = i, key
                n_above += 1
            elif b == bucket:
                idx[n_at], keys[n_at] = i, key
                n_at += 1
    # both parts were collected in index order, so a stable sort by descending key breaks ties by index
    at = above + np.argsort(-keys[above:], kind="mergesort")[: k - above]
    chosen_idx = np.concatenate((idx[:above], idx[at]))
    chosen_keys = np.concatenate((keys[:above], keys[at]))
    by_index = np.argsort(chosen_idx, kind="mergesort")
    chosen_idx, chosen_keys = chosen_idx[by_index], chosen_keys[by_index]
    return chosen_idx[np.argsort(-chosen_keys, kind="mergesort")]
