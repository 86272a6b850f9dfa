"""Exact prefix top-k over per-key scores, in ``O(N log N)`` vectorised steps (no ``N × N`` tensor).

Each key ``j`` carries one score. Query ``i`` keeps the ``k`` keys ``j <= i`` ranked best (score,
then later position, first). Because the score depends on the key only, the prefix top-``k``
threshold only rises as queries advance, so key ``j``, once kept, stays kept for one contiguous run
of queries ``[j, e_j)`` and is never kept again: the selection is ``O(N)`` integers ``e`` per row.
``e`` comes from an exact prefix order statistic (a wavelet matrix over the keys' ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import cumsum
from .layout import per_block_min_max


def rank_keys(scores: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """Rank of every key, 0 = best: by segment (later first), score (higher first), position (later first).

    ``scores`` [R, N] float; ``segments`` [R, N] nondecreasing ints or None. Returns int64 [R, N].
    """
    n = scores.shape[-1]
    order = torch.arange(n - 1, -1, -1, device=scores.device).expand_as(scores)  # later first
    order = order.gather(-1, torch.sort(scores.gather(-1, order), dim=-1, descending=True, stable=True).indices)
    if segments is not None:
        order = order.gather(-1, torch.sort(segments.gather(-1, order), dim=-1, descending=True, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return rank


def prefix_kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """For every prefix ``values[..., : i + 1]``, its ``k``-th smallest value (``k`` is 1-based).

    ``values`` [R, N] holds distinct ints in ``[0, N)`` (a permutation per row). Prefixes with fewer
    than ``k`` entries get ``N``. Exact, ``O(N log N)``: a wavelet matrix answers all ``N``
    quantile queries level by level.
    """
    rows, n = values.shape
    dev = values.device
    levels = max(1, (n - 1).bit_length())
    positions = torch.arange(n, device=dev).expand(rows, n)
    cur = values
    zero_prefix, zero_count = [], []
    for level in range(levels - 1, -1, -1):
        bit = (cur >> level) & 1
        zp = F.pad(cumsum(1 - bit, -1), (1, 0))  # [R, N + 1] zeros before each position
        nz = zp[:, -1:]
        dest = torch.where(bit == 0, zp[:, :-1], nz + positions - zp[:, :-1])
        cur = torch.empty_like(cur).scatter_(-1, dest, cur)
        zero_prefix.append(zp)
        zero_count.append(nz)

    lo = torch.zeros(rows, n, dtype=torch.int64, device=dev)
    hi = torch.arange(1, n + 1, device=dev).expand(rows, n)
    kk = torch.full((rows, n), k - 1, dtype=torch.int64, device=dev)
    result = torch.zeros(rows, n, dtype=torch.int64, device=dev)
    for i, level in enumerate(range(levels - 1, -1, -1)):
        zp, nz = zero_prefix[i], zero_count[i]
        z_lo, z_hi = zp.gather(-1, lo), zp.gather(-1, hi)
        zeros_here = z_hi - z_lo
        go_zero = kk < zeros_here
        result = result | ((~go_zero).to(torch.int64) << level)
        kk = torch.where(go_zero, kk, kk - zeros_here)
        lo = torch.where(go_zero, z_lo, nz + lo - z_lo)
        hi = torch.where(go_zero, z_hi, nz + hi - z_hi)
    return torch.where(positions + 1 >= k, result, torch.full_like(result, n))


def interval_ends(scores: torch.Tensor, k: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """End ``e_j`` of the run of queries that keep key ``j`` under prefix top-``k`` selection.

    Query ``i`` keeps key ``j`` iff ``j <= i < e_j``. ``scores`` [R, N]; ``segments`` [R, N]
    (nondecreasing, e.g. packed documents) ranks later segments above earlier ones so that, once
    intersected with the document mask, each document's top-k is taken within the document.
    Returns int64 [R, N].
    """
    n = scores.shape[-1]
    rank = rank_keys(scores, segments)
    threshold = prefix_kth_smallest(rank, k)  # nonincreasing in i
    first_drop = torch.searchsorted(-threshold, -rank, right=True)
    return torch.maximum(first_drop, torch.arange(n, device=scores.device))


def block_ranks(block_scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[2, R, nb]``: each block's rank and the threshold of each query block (blocks before it).

    Block counts are small (``N / 128``), so the ``k``-th smallest rank before each query block
    comes from one ``[R, nb, nb]`` block-level matrix and ``kthvalue``: a handful of kernels,
    nothing to compile (``O((N / 128)²)`` like the BlockMask itself).
    """
    rank = rank_keys(block_scores, None)
    rows, nb = rank.shape
    if k > nb:
        return torch.stack([rank, torch.full_like(rank, nb)])
    u = torch.arange(nb, device=rank.device)
    before = torch.where(u[None, :] < u[:, None], rank[:, None, :], nb)  # [R, t, u]: ranks of blocks u < t
    threshold = before.kthvalue(k, dim=-1).values  # nb while fewer than k blocks precede t
    return torch.stack([rank, threshold])


def interval_extents(ends: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block: the smallest interval end, and the largest end among keys ever kept."""
    n = ends.shape[-1]
    positions = torch.arange(n, device=ends.device)
    alive = torch.where(ends > positions, ends, torch.full_like(ends, -1))
    return per_block_min_max(ends, block_size)[0], per_block_min_max(alive, block_size)[1]
