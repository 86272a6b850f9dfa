"""Block masks from structure: a mask's ``(any, all)`` block maps → a FlexAttention ``BlockMask``.

Every mask can say, for each (query block, key block) pair, whether the pair *may* hold a kept
entry (``any``) and whether it *surely* keeps every entry (``all``). From those two boolean maps,
of shape ``[B|1, H|1, num_q_blocks, num_kv_blocks]``, this module builds the ``BlockMask``:
blocks with ``all`` are *full* (no mask evaluation), blocks with ``any`` but not ``all`` are
*partial* (the ``mask_mod`` runs), the rest are skipped. Building costs ``O((N / block)²)``
small integers, never ``N²`` booleans.

Correctness only needs ``any`` to over-approximate and ``all`` to under-approximate; the
combinators of :mod:`flexmask.algebra.masks` keep that invariant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

from .._compat import cumsum
from .layout import Lowering, ModFn, block_ranges, local_mask_mod


def classify(mask: Any, low: Lowering, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, all)`` block maps of ``mask``, each ``[B|1, H|1, num_q_blocks, num_kv_blocks]``."""
    layout = low.layout
    qr = block_ranges(layout.q_len, block_size, layout.offset, layout.device, "q")
    kr = block_ranges(layout.kv_len, block_size, 0, layout.device, "kv")
    any_, all_ = mask._classify(low, qr, kr)
    shape = torch.broadcast_shapes(any_.shape, all_.shape, (1, 1, qr.count, kr.count))
    any_ = any_.expand(shape)
    all_ = all_.expand(shape) & any_
    return any_, all_


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: how many blocks are set, and their indices first (ascending), as int32.

    A stable partition by prefix sums and one scatter: no sort, a few elementwise kernels.
    """
    b = blocks.to(torch.int32)
    counts = b.sum(-1, dtype=torch.int32)
    before = cumsum(b, -1, torch.int32) - b  # set blocks before each one
    idx = torch.arange(b.shape[-1], device=b.device, dtype=torch.int32).expand_as(b)
    pos = torch.where(blocks, before, counts[..., None] + idx - before)
    order = torch.empty_like(b).scatter_(-1, pos.long(), idx)
    # contiguous: flex's kernels read the index tensors as row-major (a transposed map's order,
    # left strided, gave wrong backward gradients and transposed passes on an H100)
    return counts.contiguous(), order.contiguous()


_BATCH_LIMIT = 1 << 23  # blocks (8M: 32k tokens at 16 heads batch; 128k tokens at 8 heads don't)


def block_tensors(any_: torch.Tensor, all_: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The eight index tensors of a BlockMask: partial and full blocks, by key and by query.

    Small maps are ordered in one batch (two when the grid is not square): building a BlockMask is
    then launch-bound, so fewer, larger kernels are what makes it cheap. Large maps (over
    ``_BATCH_LIMIT`` blocks together) are ordered one by one, to keep the temporaries small.
    """
    partial = any_ & ~all_
    by_key = torch.stack(torch.broadcast_tensors(partial, all_))
    by_query = by_key.transpose(-1, -2)
    if 2 * by_key.numel() > _BATCH_LIMIT:
        counts, order = zip(*(_ordered(m) for m in (*by_key, *by_query)), strict=True)
    elif by_key.shape[-1] == by_key.shape[-2]:
        counts, order = _ordered(torch.cat([by_key, by_query]))
    else:
        (key_counts, key_order), (query_counts, query_order) = _ordered(by_key), _ordered(by_query)
        counts, order = [*key_counts, *query_counts], [*key_order, *query_order]
    # (partial by key, full by key, partial by query, full by query), each as (counts, indices)
    return tuple(t for pair in zip(counts, order, strict=True) for t in pair)


def from_block_states(
    any_: torch.Tensor,
    all_: torch.Tensor,
    mask_mod: ModFn,
    q_len: int,
    kv_len: int,
    block_size: int,
    repeat_heads: int = 1,
) -> BlockMask:
    """A ``BlockMask`` whose full blocks are ``all_`` and partial blocks ``any_ & ~all_``.

    The index tensors come from prefix sums and scatters (about 30 small kernels, nothing compiled).
    ``repeat_heads`` repeats each head's maps for a group of query heads (GQA) after ordering.
    """
    tensors = block_tensors(any_, all_)
    if repeat_heads > 1:
        tensors = [t.repeat_interleave(repeat_heads, 1) for t in tensors]
    return block_mask_from_tensors(tensors, mask_mod, q_len, kv_len, block_size)


def block_mask_from_tensors(tensors, mask_mod: ModFn, q_len: int, kv_len: int, block_size: int) -> BlockMask:
    """A ``BlockMask`` from the eight index tensors of :func:`block_tensors` (no copies)."""
    kv_num, kv_idx, full_num, full_idx, q_num, q_idx, full_q_num, full_q_idx = tensors
    return BlockMask(
        (q_len, kv_len),
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        q_num,
        q_idx,
        full_q_num,
        full_q_idx,
        BLOCK_SIZE=(block_size, block_size),
        mask_mod=mask_mod,
    )


def build_block_mask(mask: Any, low: Lowering, block_size: int) -> BlockMask:
    """The ``BlockMask`` of ``mask`` for ``low.layout``, from its structure (``mask_mod`` in call-local positions)."""
    any_, all_ = classify(mask, low, block_size)
    layout = low.layout
    return from_block_states(any_, all_, local_mask_mod(mask, low), layout.q_len, layout.kv_len, block_size)


def states_from_block_mask(bm: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, all)`` block maps of an existing ``BlockMask`` (the inverse of :func:`from_block_states`)."""

    def dense(num, idx):
        n = idx.shape[-1]
        valid = torch.arange(n, device=idx.device) < num[..., None]
        out = torch.zeros(idx.shape, dtype=torch.int8, device=idx.device)
        return out.scatter_reduce_(-1, idx.long(), valid.to(torch.int8), "amax").bool()

    partial = dense(bm.kv_num_blocks, bm.kv_indices)
    full = (
        dense(bm.full_kv_num_blocks, bm.full_kv_indices)
        if bm.full_kv_num_blocks is not None
        else torch.zeros_like(partial)
    )
    return partial | full, full
