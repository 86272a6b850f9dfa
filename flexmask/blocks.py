"""Block-mask building: from a mask's structure to a FlexAttention ``BlockMask``.

Every mask can say, for each (query block, key block) pair, whether the pair *may* hold a kept
entry (``any``) and whether it *surely* keeps every entry (``all``). From those two boolean maps,
of shape ``[B|1, H|1, num_q_blocks, num_kv_blocks]``, this module builds the ``BlockMask``:
blocks with ``all`` are *full* (no mask evaluation), blocks with ``any`` but not ``all`` are
*partial* (the ``mask_mod`` runs), the rest are skipped. Building costs ``O((N / block)²)``
small integers, never ``N²`` booleans.

Correctness only needs ``any`` to over-approximate and ``all`` to under-approximate; the
combinators in :mod:`flexmask.masks` keep that invariant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

if TYPE_CHECKING:
    from .masks import Mask

ModFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """The shapes a mask or bias is lowered for.

    Queries are the last ``q_len`` of ``kv_len`` positions (``offset = kv_len - q_len``), so masks
    and biases always see absolute positions, as with a KV cache.
    """

    batch: int
    heads: int
    q_len: int
    kv_len: int
    device: torch.device

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len


@dataclass(frozen=True)
class BlockRanges:
    """First and last absolute position of every block along one axis.

    ``lo``/``hi`` are int64 tensors shaped to broadcast along that axis of a
    ``[B, H, num_q_blocks, num_kv_blocks]`` map (``[n, 1]`` for queries, ``[n]`` for keys).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    size: int
    length: int
    start: int

    @property
    def count(self) -> int:
        return self.lo.numel()


def block_ranges(length: int, block_size: int, start: int, device, axis: str) -> BlockRanges:
    n = -(-length // block_size)
    lo = torch.arange(n, device=device, dtype=torch.int64) * block_size
    hi = torch.clamp(lo + block_size, max=length) - 1
    lo, hi = lo + start, hi + start
    if axis == "q":
        lo, hi = lo[:, None], hi[:, None]
    return BlockRanges(lo, hi, block_size, length, start)


def per_block_min_max(x: torch.Tensor, ranges: BlockRanges) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x[..., start:start+length]`` over each block: two ``[..., n]`` tensors."""
    x = x[..., ranges.start : ranges.start + ranges.length]
    pad = ranges.count * ranges.size - ranges.length
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    x = x.reshape(*x.shape[:-1], ranges.count, ranges.size)
    return x.amin(-1), x.amax(-1)


def shift_queries(mod: ModFn, offset: int, device) -> ModFn:
    """Turn a mask/score function of absolute query positions into one of call-local positions.

    The offset is captured as a 0-d tensor so that a growing KV cache does not recompile.
    """
    if offset == 0:
        return mod
    shift = torch.tensor(offset, device=device)

    def shifted(b, h, q_idx, kv_idx):
        return mod(b, h, q_idx + shift, kv_idx)

    return shifted


def classify(mask: Mask, layout: Layout, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, all)`` block maps of ``mask``, each ``[B|1, H|1, num_q_blocks, num_kv_blocks]``."""
    qr = block_ranges(layout.q_len, block_size, layout.offset, layout.device, "q")
    kr = block_ranges(layout.kv_len, block_size, 0, layout.device, "kv")
    any_, all_ = mask._classify(layout, qr, kr)
    shape = torch.broadcast_shapes(any_.shape, all_.shape, (1, 1, qr.count, kr.count))
    any_ = any_.expand(shape)
    all_ = all_.expand(shape) & any_
    return any_, all_


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.uint8), dim=-1, descending=True, stable=True)
    return counts.contiguous(), order.to(torch.int32).contiguous()


def from_block_states(
    any_: torch.Tensor,
    all_: torch.Tensor,
    mask_mod: ModFn,
    q_len: int,
    kv_len: int,
    block_size: int,
) -> BlockMask:
    """A ``BlockMask`` whose full blocks are ``all_`` and partial blocks ``any_ & ~all_``."""
    kv_num, kv_idx = _ordered(any_ & ~all_)
    full_num, full_idx = _ordered(all_)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
    )


def build_block_mask(mask: Mask, layout: Layout, block_size: int = 128) -> BlockMask:
    """Build the ``BlockMask`` of ``mask`` for ``layout`` from its structure."""
    any_, all_ = classify(mask, layout, block_size)
    mod = shift_queries(mask._mask_mod(layout), layout.offset, layout.device)
    return from_block_states(any_, all_, mod, layout.q_len, layout.kv_len, block_size)


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
