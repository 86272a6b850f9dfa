"""The selections of content masks (``fm.topk``, ``fm.topk_blocks``) and their block maps.

Pure functions of tensors: the content masks of :mod:`flexmask.algebra.content` call them from
their lowering hooks, and the graphed builders replay them. Ranking happens in float32, or in
float64 for float64 scores (near-ties keep their order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import cumsum
from .blocks import block_tensors
from .cache import compiled_on_cuda
from .graphs import CudaGraphed
from .layout import BlockRanges, Layout, block_ranges, cdiv
from .prefix_topk import block_ranks, interval_ends, interval_extents, rank_keys

_interval_ends_fused = compiled_on_cuda(interval_ends)


def ranking_dtype(scores: torch.Tensor) -> torch.dtype:
    """float64 for float64 scores, float32 otherwise."""
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def key_candidates(
    scores: torch.Tensor,
    layout: Layout | tuple[int, torch.device],
    ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    per_key: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Detached scores ``[B, Hs, N]`` with non-candidates at -inf (NaN ranks lowest), and the
    documents' segment numbers ``[B, Hs, N]`` (nondecreasing) or ``None``.

    Args:
        scores: ``[B|1, Hs, N]``.
        ids: packed document ids ``[B|1, N]`` (candidates of a query: its own document).
        valid: ``[B|1, N]`` bool, the keys that compete (``among``'s padding and key mask
            together); only with ``per_key``.
        layout: the call's layout, or its ``(batch, device)``.
    """
    batch, device = (layout.batch, layout.device) if isinstance(layout, Layout) else layout
    s = scores.detach().to(device=device, dtype=ranking_dtype(scores))
    s = torch.nan_to_num(s, nan=float("-inf"))  # NaN ranks lowest (no device sync to check)
    s = s.expand(batch, *s.shape[1:])
    if valid is not None and per_key:
        s = s.masked_fill(~valid.to(device)[:, None, :], float("-inf"))
    segments = None
    if ids is not None:
        segments = segment_numbers(ids.to(device).expand(batch, ids.shape[-1]))[:, None].expand_as(s)
    return s, segments


def segment_numbers(ids: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: for packed document ids ``[B, N]``, each position's document counted from 0 along
    the row (nondecreasing)."""
    return F.pad(cumsum(ids[:, 1:] != ids[:, :-1], -1), (1, 0))


def block_scores(s: torch.Tensor, block_size: int, n: int, per_key: bool, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-block scores ``[B, Hs, nb]`` from the candidate scores ``s`` of :func:`key_candidates`
    (over ``n`` keys): per key, a block's score is its best key's; per block, blocks with no key
    of ``valid`` ``[B|1, n]`` don't compete (-inf)."""
    nb = cdiv(n, block_size)
    if per_key:
        s = F.pad(s, (0, nb * block_size - n), value=float("-inf"))
        return s.view(*s.shape[:-1], nb, block_size).amax(-1)
    if valid is None:
        return s
    valid = F.pad(valid.to(s.device), (0, nb * block_size - n)).view(valid.shape[0], nb, block_size)
    return s.masked_fill(~valid.any(-1)[:, None, :], float("-inf"))


def topk_ends(s: torch.Tensor, segments: torch.Tensor | None, k: int, last_only: bool = False) -> torch.Tensor:
    """Interval ends ``e`` ``[B, Hs, N]`` int32 of a prefix top-``k`` over candidate scores ``s``:
    query ``i`` keeps key ``j`` iff ``j <= i < e[j]``; with ``last_only``, exact for the last
    position only (one decoding query: a sort instead of the prefix order statistic)."""
    b, hs, n = s.shape
    flat = None if segments is None else segments.reshape(b * hs, n)
    if last_only:  # decoding: the one query (the last position) keeps the k best ranks
        rank = rank_keys(s.reshape(b * hs, n), flat)
        pos = torch.arange(n, device=s.device)
        e = torch.where(rank < k, n, pos).reshape(b, hs, n)
    else:
        e = _interval_ends_fused(s.reshape(b * hs, n), k, flat).reshape(b, hs, n)
    return e.to(torch.int32)


def fold_among(ends: torch.Tensor, ids: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    """Interval ends ``[B, Hs, N]`` of a top-k among documents and/or padding (ranked with their
    segments and lengths, :func:`topk_ends`) with the ``among`` mask folded in: query ``i`` keeps key
    ``j`` under ``topk(..., among=...)`` iff ``j <= i < e'[j]``, where ``e'`` stops at the end of
    ``j``'s document (later queries are of other documents) and is ``j`` for a key not ``valid``
    ``[B|1, N]`` (padding)."""
    b, _, n = ends.shape
    positions = torch.arange(n, device=ends.device)
    if ids is not None:  # documents are contiguous (checked when the mask is made)
        segments = segment_numbers(ids.to(ends.device).expand(b, n))
        doc_end = torch.searchsorted(segments, segments, right=True)  # first position of the next document
        ends = torch.minimum(ends, doc_end[:, None, :].to(ends.dtype))
    if valid is not None:
        ends = torch.where(valid.to(ends.device)[:, None, :], ends, positions.to(ends.dtype))
    return ends


def topk_states(ends: torch.Tensor, heads: int, qr: BlockRanges, kr: BlockRanges) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, all)`` block maps of the interval mask ``j <= i < ends[j]`` (``ends`` ``[B, Hs, KV]``)."""
    e_min, e_max = interval_extents(ends, kr.size)
    # one score head stays one BlockMask head (broadcast): flex's decoding kernel needs that with GQA
    group = heads // ends.shape[1] if ends.shape[1] > 1 else 1
    e_max = e_max.repeat_interleave(group, 1)[:, :, None, :]
    e_min = e_min.repeat_interleave(group, 1)[:, :, None, :]
    any_ = (kr.lo <= qr.hi) & (e_max > qr.lo)
    all_ = (kr.hi <= qr.lo) & (e_min > qr.hi)
    return any_, all_


def block_selection(
    scores: torch.Tensor,
    k: int,
    block_size: int,
    layout: Layout,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[2, B, Hs, nb]``: each key block's rank (0 = best) and each query block's threshold.

    Query block ``t`` keeps past block ``u < t`` iff ``rank[u] <= threshold[t]``. ``scores`` are
    per key (a block's score is its best key's) or per block (``nb`` of them).
    """
    nb = cdiv(layout.kv_len, block_size)
    per_key = scores.shape[-1] != nb
    s, _ = key_candidates(scores, layout, valid=valid, per_key=per_key)
    s = block_scores(s, block_size, layout.kv_len, per_key, valid)
    b, hs, _ = s.shape
    return block_ranks(s.reshape(b * hs, nb), k).reshape(2, b, hs, nb)


def topk_blocks_states(
    sel: torch.Tensor, heads: int, block_size: int, qr: BlockRanges, kr: BlockRanges
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, all)`` block maps of a block selection ``sel`` (from :func:`block_selection`) when the
    BlockMask's blocks are the selection's blocks (``qr.size == block_size``)."""
    group = heads // sel.shape[2] if sel.shape[2] > 1 else 1  # one score head: broadcast
    rank = sel[0].repeat_interleave(group, 1)  # [B, Hq or 1, nb]
    threshold = sel[1].repeat_interleave(group, 1)
    t_lo, t_hi = (qr.lo // block_size)[:, 0], (qr.hi // block_size)[:, 0]  # absolute query blocks
    u = torch.arange(rank.shape[-1], device=rank.device)

    def selected(t):  # [B, Hq, nQ, nK]: past block u selected for query block t
        return (u[None, :] < t[:, None]) & (rank[:, :, None, :] <= threshold[:, :, t][..., None])

    s_lo, s_hi = selected(t_lo), selected(t_hi)
    diagonal = ((u[None, :] >= t_lo[:, None]) & (u[None, :] <= t_hi[:, None])) & (kr.lo <= qr.hi)
    return s_lo | s_hi | diagonal, s_lo & s_hi


def _topk_blocks_build(scores: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
    """The selection and the eight BlockMask index tensors of ``topk_blocks(scores, k, block_size)``
    over ``layout`` (self-attention, no ``among``), all int32: what :data:`graphed_topk_blocks` replays."""
    k, block_size, layout = key
    sel = block_selection(scores, k, block_size, layout)
    qr = block_ranges(layout.q_len, block_size, layout.offset, layout.device, "q")
    kr = block_ranges(layout.kv_len, block_size, 0, layout.device, "kv")
    any_, all_ = topk_blocks_states(sel, layout.heads, block_size, qr, kr)
    shape = torch.broadcast_shapes(any_.shape, all_.shape, (1, 1, qr.count, kr.count))
    any_ = any_.expand(shape)
    all_ = all_.expand(shape) & any_
    return (sel.to(torch.int32), *block_tensors(any_, all_))


graphed_topk_blocks = CudaGraphed(_topk_blocks_build)
"""``graphed_topk_blocks(scores, key=(k, block_size, layout))``: :func:`_topk_blocks_build` from a CUDA graph."""


def topk_blocks_ends(sel: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """Interval ends ``e`` ``[B, Hs, n]`` int32 of a block selection ``sel`` (:func:`block_selection`,
    self-attention): query ``i`` keeps key ``j`` iff ``j <= i < e[j]``, the rule of :func:`topk_ends`.

    A query block's threshold (the ``k``-th best rank before it) can only fall as blocks are added,
    so the query blocks that keep a past block ``u`` (``rank[u] <= threshold[t]``, ``t > u``) are one
    run from ``u + 1``, ending at the first ``t`` whose threshold drops below ``rank[u]``; block ``u``
    itself keeps its own keys causally. Each key of block ``u`` ends where that run ends."""
    rank, threshold = sel[0], sel[1]  # [B, Hs, nb]
    b, hs, nb = rank.shape
    # thresholds do not increase along t: their negatives are sorted, and the run is those >= rank[u]
    run_end = torch.searchsorted(-threshold.reshape(b * hs, nb), -rank.reshape(b * hs, nb), right=True)
    own = torch.arange(1, nb + 1, device=rank.device)
    ends = (torch.maximum(run_end, own) * block_size).clamp(max=n)
    return ends.repeat_interleave(block_size, -1)[:, :n].reshape(b, hs, n).to(torch.int32)


def _topk_blocks_ends_build(scores: torch.Tensor, key: tuple) -> tuple[torch.Tensor]:
    """:func:`topk_blocks_ends` of ``topk_blocks(scores, k, block_size)`` over ``layout`` (no ``among``)."""
    k, block_size, layout = key
    return (topk_blocks_ends(block_selection(scores, k, block_size, layout), block_size, layout.kv_len),)


graphed_topk_blocks_ends = CudaGraphed(_topk_blocks_ends_build)
"""``graphed_topk_blocks_ends(scores, key=(k, block_size, layout))``: :func:`_topk_blocks_ends_build`
from a CUDA graph."""

GRAPHED_BLOCKS_LIMIT = 1 << 22
"""Largest ``batch × heads × query blocks × key blocks`` built from a CUDA graph (16 heads at 64k
self-attention: a pool of ~0.3 GB)."""


def _topk_ends_tensors(scores: torch.Tensor, key: tuple) -> tuple[torch.Tensor]:
    """``(ends,)``: the interval ends of ``topk(scores, k)`` (no ``among``) for ``key = (k, batch)``,
    int32 ``[batch, Hs, N]``: what :data:`graphed_topk_ends` replays."""
    k, batch = key
    s, _ = key_candidates(scores, (batch, scores.device))
    return (topk_ends(s, None, k),)


#: the token selection's interval ends replayed from a CUDA graph: its few dozen small kernels
#: (ranks, the wavelet levels, the searches) cost more to launch than to run
graphed_topk_ends = CudaGraphed(_topk_ends_tensors)


def graphed_ends(scores: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Interval ends ``[batch, Hs, N]`` int32 of ``topk(scores, k)`` (no ``among``) from
    :data:`graphed_topk_ends`. Under ``torch.compile`` through an op the compiler keeps whole, so a
    compiled model replays the build from a CUDA graph as an eager one does, instead of launching its
    kernels one by one (on torch < 2.13 each wavelet level's scan is an op of its own, about 0.2 ms
    of host time); eagerly without the op's dispatch (~15 µs of host time).
    ``scores`` ``[batch|1, Hs, N]`` on the device of the call."""
    if torch.compiler.is_compiling():
        return _graphed_ends_op(scores, k, batch)
    return graphed_topk_ends(scores, key=(k, batch))[0]


@torch.library.custom_op("flexmask::graphed_topk_ends", mutates_args=())
def _graphed_ends_op(scores: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    return graphed_topk_ends(scores, key=(k, batch))[0]


@_graphed_ends_op.register_fake
def _(scores: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    return scores.new_empty(batch, *scores.shape[1:], dtype=torch.int32)
