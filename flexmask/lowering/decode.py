"""Decoding with content masks: the one new query gathers the keys its top-k can keep.

With a KV cache of ``L`` keys, a query under ``fm.topk(scores, k)`` keeps at most ``k`` keys, and
under ``fm.topk_blocks(scores, k)`` at most ``k + 1`` blocks. Instead of a BlockMask over all ``L``
keys (where scattered selections make every block partial), the query's candidate positions are
chosen here with one ``topk`` over an order-preserving integer key per score (``O(L)`` work, no
sort of the cache), and the backend attends to those positions only, evaluating the rest of the
mask and the bias there. Fixed shapes, no host synchronisation: it runs inside ``torch.compile``
and CUDA graphs.

Ties follow the selection's rule exactly (higher score first, then the later key), as do
candidates: keys of other documents rank below every key of the query's document, and padded
keys (``-inf`` scores) below every real one; the mask evaluated at the gathered positions then
removes what is not a candidate, as the full mask would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cache import compiled_on_cuda
from .layout import Layout, cdiv
from .prefix_topk import rank_keys
from .selection import block_scores, key_candidates

_LOWEST = torch.iinfo(torch.int64).min


def _as_position(query: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[1, 1]`` int64 on ``device``: a fill for an int (no host-to-device copy, graph-capturable)."""
    if isinstance(query, torch.Tensor):
        return query.reshape(1, 1).to(device=device, dtype=torch.int64)
    return torch.full((1, 1), query, dtype=torch.int64, device=device)


class Gathered(NamedTuple):
    """The key positions one decoding query may keep, per selection head.

    Attributes:
        positions: ``[B, Hs, S]`` int64 absolute key positions (in range; entries not valid repeat one),
            or ``None``: every key (a decoding query whose mask has no content factor).
        valid: ``[B, Hs, S]`` bool, whether the content selection keeps that entry (``None`` with
            ``positions=None``).
    """

    positions: torch.Tensor | None
    valid: torch.Tensor | None


def _order_keys(s: torch.Tensor, segments: torch.Tensor | None, query: int | torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the selection's for the query at position ``query`` (an int or a
    one-element tensor): score (higher first), then position (later first); keys after the query,
    and keys of other segments (documents other than the query's), lowest. ``s`` ``[R, N]``."""
    rows, n = s.shape
    positions = torch.arange(n, device=s.device)
    before = positions <= query  # [N] (a tensor comparison also for a tensor query: no host sync)
    same = None
    if segments is not None:
        at_query = segments.gather(-1, _as_position(query, s.device).expand(rows, 1))
        same = segments == at_query
    if s.dtype == torch.float64 or n >= 1 << 31:  # no exact int64 packing: rank by sorting
        # keys after the query rank after every key before it (a lowest segment of their own)
        seg = torch.where(before, segments if segments is not None else torch.zeros_like(positions), -1)
        keys = -rank_keys(s, seg.expand(rows, n))  # rank 0 (best) → the largest key
    else:
        bits = (s.float() + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, which it equals
        ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # monotone in the float's value
        keys = ordered * (1 << 31) + positions
    if same is not None:
        keys = torch.where(same, keys, _LOWEST)
    return torch.where(before, keys, _LOWEST)


def topk_candidates(
    scores: torch.Tensor,
    k: int,
    layout: Layout,
    ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> Gathered:
    """The at most ``k`` keys ``fm.topk(scores, k, among=...)`` keeps for the one query of ``layout``
    (at position ``layout.offset``; the last of ``L`` keys unless the call says otherwise).

    ``valid`` marks keys at or before the query: the mask evaluated at these positions removes
    non-candidates.
    """
    scores = scores.detach().to(layout.device)
    query = layout.offset
    top = _topk_positions(scores, min(k, layout.kv_len), layout.batch, ids, valid, query)
    return Gathered(top, top <= query)  # past the query: picked only when fewer keys exist


def given_candidates(kept: torch.Tensor, layout: Layout) -> Gathered:
    """The positions ``kept`` ``[B|1, Hs, S]`` (from ``fm.topk(...).keep``,
    ``-1`` for none) as the one query's candidates: valid where in ``0 .. query``."""
    return Gathered(*_given(kept.to(layout.device), layout.batch, layout.kv_len, layout.offset))


def _given_eager(kept, batch: int, n: int, query) -> tuple[torch.Tensor, torch.Tensor]:
    kept = kept.expand(batch, *kept.shape[1:])
    return kept.clamp(0, n - 1), (kept >= 0) & (kept <= _as_position(query, kept.device).view(1, 1, 1))


_given = compiled_on_cuda(_given_eager, dynamic=None)  # one kernel instead of four in a decoding step


def kept_keys(
    scores: torch.Tensor,
    k: int,
    query: int | torch.Tensor,
    batch: int,
    ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, Hs, min(k, N)]`` int64: the keys ``fm.topk(scores, k, among=...)`` keeps for the one
    query at position ``query``, ``-1`` where it keeps fewer (``O(N)``: one top-k over the scores)."""
    scores = scores.detach()
    top = _topk_positions(scores, min(k, scores.shape[-1]), batch, ids, valid, query)
    return torch.where(top <= _as_position(query, scores.device).view(1, 1, 1), top, -1)


def _kept_step_eager(scores, previous, batch: int, ids, valid, query) -> torch.Tensor:
    s, segments = key_candidates(scores, (batch, scores.device), ids, valid)
    b, hs, n = s.shape
    t = _as_position(query, s.device).view(1, 1, 1).expand(b, hs, 1)
    previous = previous.to(s.device).expand(b, hs, previous.shape[-1])
    entries = torch.cat([previous, t], -1)  # [B, Hs, S + 1]: the previous query's keys and the new one
    at = entries.clamp(0, n - 1)
    fresh = torch.cat([(previous >= 0) & (previous < t), t < n], -1)  # (a replayed position counts once)
    if segments is not None:  # keys of the query's document only (documents are contiguous)
        fresh &= segments.gather(-1, at) == segments.gather(-1, t.clamp(max=n - 1))
    score = s.gather(-1, at)
    # the entry the selection ranks last: a stale one if any, else the lowest score, the earliest on ties
    lowest = torch.where(fresh, score, float("inf")).amin(-1, keepdim=True)
    earliest = torch.where(fresh & (score == lowest), entries, n).argmin(-1, keepdim=True)
    stale = ~fresh
    drop = torch.where(stale.any(-1, keepdim=True), stale.int().argmax(-1, keepdim=True), earliest)
    width = previous.shape[-1]
    slot = torch.arange(width, device=s.device)
    kept = torch.where(fresh[..., :width], previous, -1)
    return torch.where(slot == drop, torch.where(fresh[..., width:], t, -1), kept)


# a dozen elementwise kernels and reductions over S + 1 entries become one or two on CUDA
_kept_step = compiled_on_cuda(_kept_step_eager, dynamic=None)


def kept_step(
    scores: torch.Tensor,
    previous: torch.Tensor,
    query: int | torch.Tensor,
    batch: int,
    ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`kept_keys` for the query at ``query`` from ``previous``, the keys kept for the query
    before it (``O(S)`` for ``S`` kept keys): those and key ``query``, less the one ranked last.

    Exact when the scores of the keys before ``query`` are those ``previous`` was selected from:
    a key's rank among the keys before a query does not depend on the query. Entries of
    ``previous`` at or after ``query`` are dropped, so a step replayed at the same position, or the
    first position, gives the same keys.
    """
    return _kept_step(scores.detach(), previous, batch, ids, valid, query)


def _topk_positions_eager(scores, k: int, batch: int, ids, valid, query) -> torch.Tensor:
    s, segments = key_candidates(scores, (batch, scores.device), ids, valid)
    b, hs, n = s.shape
    keys = _order_keys(s.reshape(b * hs, n), None if segments is None else segments.reshape(b * hs, n), query)
    return keys.topk(k, dim=-1, sorted=False).indices.view(b, hs, -1)


# on CUDA, a dozen elementwise kernels and a top-k become a few fused ones; automatic dynamic shapes,
# so that a cache growing by one key per step does not recompile
_topk_positions = compiled_on_cuda(_topk_positions_eager, dynamic=None)


def topk_blocks_candidates(
    scores: torch.Tensor,
    k: int,
    block_size: int,
    layout: Layout,
    valid: torch.Tensor | None = None,
) -> Gathered:
    """The key positions ``fm.topk_blocks(scores, k)`` keeps for the one query (at ``layout.offset``):
    its query block's ``k`` best past blocks and the query's own block up to it (``valid`` marks kept
    positions)."""
    scores = scores.detach().to(layout.device)
    positions, kept = _block_positions(scores, k, block_size, layout.kv_len, layout.batch, valid, layout.offset)
    return Gathered(positions, kept)


def _block_positions_eager(scores, k: int, block_size: int, n: int, batch: int, valid, query):
    nb = cdiv(n, block_size)
    per_key = scores.shape[-1] != nb
    s, _ = key_candidates(scores, (batch, scores.device), valid=valid, per_key=per_key)
    s = block_scores(s, block_size, n, per_key, valid)
    b, hs, _ = s.shape
    t = _as_position(query, s.device) // block_size  # the query's block
    keys = _order_keys(s.reshape(b * hs, nb), None, nb - 1)
    keys = torch.where(torch.arange(nb, device=s.device) < t, keys, _LOWEST)  # past blocks only
    picked = min(k, nb)
    top = keys.topk(picked, dim=-1, sorted=False)
    blocks = torch.cat([top.indices, t.expand(b * hs, 1)], -1)  # + the diagonal block
    kept = torch.cat([top.values > _LOWEST, torch.ones((b * hs, 1), dtype=torch.bool, device=s.device)], -1)
    positions = blocks[..., None] * block_size + torch.arange(block_size, device=s.device)
    keep = kept[..., None] & (positions <= query)
    positions = positions.clamp(max=n - 1)  # (a Python bound: no host-to-device copy, graph-capturable)
    shape = (b, hs, (picked + 1) * block_size)
    return positions.reshape(shape), keep.reshape(shape)


# as for token selection: a dozen elementwise kernels and a small top-k become a few fused kernels
# on CUDA (a decoding step replayed from a CUDA graph launches each); automatic dynamic shapes
_block_positions = compiled_on_cuda(_block_positions_eager, dynamic=None)
