"""Drop and grow selection shared by the DST methods: pure functions over flat tensors."""

from __future__ import annotations

import torch

from ._select import top_k


def _top(scores: torch.Tensor, eligible: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Flat indices of the k eligible entries with the largest (or smallest) score, best first; ties by index."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    flat, ok = scores.detach().flatten(), eligible.flatten()
    if flat.dtype != torch.float64:  # exact for half precisions; float64 keeps its range (SynFlow's scores pass 1e38)
        flat = flat.float()
    if flat.dtype == torch.float32 and flat.device.type == "cpu" and flat.numel() <= 1 << 32:  # Numba (bidst._select)
        chosen = torch.from_numpy(top_k(flat.contiguous().numpy(), ok.contiguous().numpy(), k, largest))
        if chosen.numel() == k:
            return chosen
    elif int(ok.sum()) >= k:
        return _top_torch(flat, ok, k, largest)
    raise ValueError(f"asked for {k} positions but only {int(ok.sum())} are eligible")


def _top_torch(flat: torch.Tensor, eligible: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The same selection in torch ops, for accelerators (and as the reference of bidst._select's tests)."""
    fill = float("-inf") if largest else float("inf")
    s = torch.where(eligible, flat, torch.full_like(flat, fill))
    # O(n) selection instead of a full sort: everything strictly better than the k-th score, then its ties by index
    kth = torch.topk(s, k, largest=largest, sorted=False).values
    kth = kth.min() if largest else kth.max()
    better = (((s > kth) if largest else (s < kth)) & eligible).nonzero().squeeze(1)
    ties = ((s == kth) & eligible).nonzero().squeeze(1)[: k - better.numel()]
    chosen = torch.sort(torch.cat([better, ties])).values
    return chosen[torch.sort(s[chosen], descending=largest, stable=True).indices]


def drop_lowest(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The k active positions (mask True) with the lowest score, as flat indices."""
    return _top(scores, mask, k, largest=False)


def grow_highest(scores: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """The k eligible positions with the highest score, as flat indices."""
    return _top(scores, eligible, k, largest=True)


def random_scores(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform random scores drawn on the CPU from `generator` (same on every device and rank).

    On CUDA they go through pinned memory asynchronously, so the host does not wait for the GPU.
    """
    scores = torch.rand(shape, generator=generator)
    if torch.device(device).type == "cuda":
        return scores.pin_memory().to(device, non_blocking=True)
    return scores.to(device)


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|w|: the drop score of SET, RigL and most DST methods."""
    return weight.detach().abs()


def set_drop(weight: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """SET's drop: the smallest positive and the largest negative weights, in proportion to their counts."""
    w = weight.detach().flatten()
    m = mask.flatten()
    pos, neg = m & (w > 0), m & (w <= 0)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    k_pos = min(n_pos, round(k * n_pos / max(1, n_pos + n_neg)))
    k_neg = k - k_pos
    if k_neg > n_neg:
        k_pos, k_neg = k - n_neg, n_neg
    return torch.cat([_top(w, pos, k_pos, largest=False), _top(w, neg, k_neg, largest=True)])
