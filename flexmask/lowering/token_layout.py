"""The key layout that makes exact token-level top-k (``fm.topk``) skip work in FlexAttention.

With scattered scores almost every causal (query block, key block) pair holds a few kept keys,
so plain flex evaluates the mask nearly everywhere. Here the keys are *copied* into a layout where
the keys each query block needs are a few contiguous runs:

* copy 0 is the natural order (each query block's own diagonal block);
* copy ``l + 1`` (a Fenwick level): positions are cut into segments of ``block · 2^l``; every even
  segment ``m`` serves the query blocks ``t`` with ``t >> l == m + 1`` (the dyadic decomposition
  of ``[0, t · block)``), and holds only the keys of the segment that are ever kept, sorted by
  interval end, latest first. The keys query block ``t`` needs from it (``e_j > t · block``) are
  a prefix of its segment, and those it needs for every one of its queries form a shorter prefix
  whose blocks are *full* (no mask evaluated).

The ``mask_mod`` over layout index ``x`` is exact on its own: the copy serves query block
``q // block`` and ``j <= q < e_j``. Gradients of the copies flow back through the gathers.
Memory: ``O(N log N)`` integers and the copied keys and values (dead keys are not copied).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn.attention.flex_attention import BlockMask

from .._compat import cumsum
from .blocks import block_mask_from_tensors, block_tensors
from .cache import compiled_on_cuda
from .graphs import CudaGraphed
from .layout import BLOCK, Layout, cdiv
from .selection import key_candidates, topk_ends


def layout_plan(ends: torch.Tensor, block: int, keep: int) -> dict[str, torch.Tensor | int]:
    """The layout for interval ends ``ends`` [R, N] (int64) of a top-``keep`` selection.

    Returns ``orig``, ``serve_lo``, ``serve_hi`` (``[R, M]`` int64: the key each layout entry
    copies and the query blocks it serves; unused entries serve none), ``any_``/``all_``
    (``[R, nq, ceil(M / block)]`` block maps) and ``length`` ``M``, which depends on ``N``,
    ``block`` and ``keep`` only.
    """
    rows, n = ends.shape
    dev = ends.device
    shift = block.bit_length() - 1
    nq = cdiv(n, block)
    pos = torch.arange(n, device=dev)
    big = n * (n + 2)

    orig_parts, lo_parts, hi_parts = [pos.expand(rows, n)], [(pos >> shift).expand(rows, n)], []
    hi_parts.append(lo_parts[0] + 1)
    plans = []  # per level: (offset, comp_sorted, level)
    offset = n
    level = 0
    while (1 << level) < nq:
        # Each level's width is its capacity, which depends on (N, block) only: the shapes never
        # change with the scores, so nothing recompiles and the whole plan compiles to few kernels.
        width = _level_capacity(n, block, level, keep)
        seg = pos >> (shift + level)
        first_served = ((seg + 1) << level) * block  # the first query this segment's copy serves
        # a key is read from this level only if it outlives its segment: at most `keep` per
        # segment (they are all kept by the query `first_served`)
        use = (ends > first_served) & (seg % 2 == 0) & (((seg + 1) << level) < nq)
        comp = torch.where(use, seg * (n + 1) + (n - ends), torch.full_like(ends, big))
        comp, order = torch.sort(comp, dim=-1, stable=True)
        comp, order = comp[:, :width].contiguous(), order[:, :width]
        valid = comp < big
        seg_sorted = order >> (shift + level)
        zero = torch.zeros_like(order)
        orig_parts.append(order)  # unused entries keep distinct rows (cheap gather backward)
        lo_parts.append(torch.where(valid, (seg_sorted + 1) << level, zero))
        hi_parts.append(torch.where(valid, (seg_sorted + 2) << level, zero))
        plans.append((offset, comp, level))
        offset += width
        level += 1
    length = offset
    nkb = cdiv(length, block)

    # block maps: difference arrays over layout blocks, one row per query block
    t = torch.arange(nq, device=dev)
    any_d = torch.zeros(rows, nq, nkb + 1, dtype=torch.int32, device=dev)
    all_d = torch.zeros_like(any_d)
    diag = t.expand(rows, nq)
    _mark(any_d, diag, diag + 1)
    last = torch.clamp((t + 1) * block, max=n) - 1  # last query of each block
    for off, comp, lvl in plans:
        has = ((t >> lvl) & 1) == 1
        m = torch.clamp((t >> lvl) - 1, min=0)
        base = m * (n + 1)
        start = torch.searchsorted(comp, base.expand(rows, nq).contiguous())
        end = torch.searchsorted(comp, (base + n - t * block).expand(rows, nq).contiguous())
        full_end = torch.searchsorted(comp, (base + n - last).expand(rows, nq).contiguous())
        start, end, full_end = start + off, end + off, full_end + off
        lo_blk, hi_blk = start // block, cdiv(end, block)
        _mark(any_d, torch.where(has & (end > start), lo_blk, 0), torch.where(has & (end > start), hi_blk, 0))
        f_lo, f_hi = cdiv(start, block), full_end // block
        ok = has & (f_hi > f_lo)
        _mark(all_d, torch.where(ok, f_lo, 0), torch.where(ok, f_hi, 0))
    any_ = cumsum(any_d, -1)[..., :nkb] > 0
    all_ = cumsum(all_d, -1)[..., :nkb] > 0
    return {
        "orig": torch.cat(orig_parts, -1),
        "serve_lo": torch.cat(lo_parts, -1),
        "serve_hi": torch.cat(hi_parts, -1),
        "any_": any_,
        "all_": all_,
        "length": length,
    }


# its shapes depend on N, block and keep only
_plan_fused = compiled_on_cuda(layout_plan)


def _level_capacity(n: int, block: int, level: int, keep: int) -> int:
    """An upper bound of level ``level``'s width: per served segment, its length or ``keep``."""
    nq = cdiv(n, block)
    size = block << level
    total = 0
    for m in range(0, cdiv(n, size), 2):
        if ((m + 1) << level) < nq:
            total += min(keep, min(n, (m + 1) * size) - m * size)
    return total


def _mark(diff: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Add the ranges ``[lo, hi)`` (per row and query block) to a difference array."""
    one = torch.ones_like(lo, dtype=diff.dtype)
    diff.scatter_add_(-1, lo[..., None], one[..., None])
    diff.scatter_add_(-1, hi[..., None], -one[..., None])


class TokenLayout(NamedTuple):
    """A lowered lone ``fm.topk`` mask: the key layout and its BlockMask.

    Attributes:
        index: ``[B, Hs, M]`` int64, the original key position each layout entry copies.
        rows: ``[B · Hkv · M]`` int64, the flat row of each entry in a ``[B · Hkv · N, D]`` view of ``k``/``v``.
        block_mask: the BlockMask over the layout (``N`` queries, ``M`` layout keys), with its ``mask_mod``.
    """

    index: torch.Tensor
    rows: torch.Tensor
    block_mask: BlockMask


def token_layout(scores: torch.Tensor, k: int, layout: Layout, graphed: bool) -> TokenLayout:
    """The :class:`TokenLayout` of ``fm.topk(scores, k)`` (no ``among``) for a self-attention ``layout``
    with ``layout.kv_heads`` known. ``graphed``: replay the build from a CUDA graph (on CUDA)."""
    build = _graphed_layout_tensors if graphed else _layout_tensors
    orig, ends_lay, lo, hi, *tensors = build(scores.detach().to(layout.device), key=(k, layout))
    B, hs, m = orig.shape
    group = layout.heads // hs

    def dma_layout(b, h, q_idx, kv_idx):
        hh = h // group
        qb = q_idx // BLOCK
        return (
            (qb >= lo[b, hh, kv_idx])
            & (qb < hi[b, hh, kv_idx])
            & (orig[b, hh, kv_idx] <= q_idx)
            & (q_idx < ends_lay[b, hh, kv_idx])
        )

    n, hkv = layout.kv_len, layout.kv_heads
    index = orig.long()
    base = torch.arange(B * hkv, device=index.device).view(B, hkv, 1) * n
    rows = (index.expand(B, hkv, m) + base).reshape(-1)
    return TokenLayout(index, rows, block_mask_from_tensors(tensors, dma_layout, n, m, BLOCK))


def _layout_tensors(scores: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
    """For ``topk(scores, k)`` over ``layout``, all int32: the key each layout entry copies, its
    interval end, the query blocks it serves (``[B, Hs, M]`` each) and the BlockMask's eight index
    tensors over the layout."""
    k, layout = key
    s, _ = key_candidates(scores, layout)
    ends = topk_ends(s, None, k)
    B, hs, n = ends.shape
    p = _plan_fused(ends.reshape(B * hs, n).long(), BLOCK, k)
    m = p["length"]
    orig = p["orig"].view(B, hs, m)
    ends_lay = ends.long().gather(2, orig)
    lo, hi = p["serve_lo"].view(B, hs, m), p["serve_hi"].view(B, hs, m)
    nq, nkb = p["any_"].shape[-2:]
    any_ = p["any_"].view(B, hs, nq, nkb)
    all_ = p["all_"].view(B, hs, nq, nkb) & any_
    tensors = block_tensors(any_, all_)
    repeat = layout.heads // hs if hs > 1 else 1  # one score head stays one BlockMask head (broadcast)
    if repeat > 1:
        tensors = [t.repeat_interleave(repeat, 1) for t in tensors]
    return tuple(t.to(torch.int32) for t in (orig, ends_lay, lo, hi, *tensors))


_graphed_layout_tensors = CudaGraphed(_layout_tensors)
