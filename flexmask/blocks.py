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

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn.attention.flex_attention import BlockMask

if TYPE_CHECKING:
    from .masks import Mask

ModFn = Callable[..., torch.Tensor]


def compiled_on_cuda(fn: Callable, dynamic: bool | None = False) -> Callable:
    """``fn``, run through ``torch.compile`` (compiled on first use) when its first argument is a
    CUDA tensor: a few fused kernels instead of hundreds of small launches. Eager on other devices
    and inside an outer ``torch.compile``, which traces it anyway."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not args[0].is_cuda or torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=dynamic)
        return compiled(*args)

    return run


class CudaGraphed:
    """``fn(x, key) -> tuple of int32 tensors``, replayed from a CUDA graph per (input shape, key).

    Building a BlockMask from content (top-k over blocks) is about a hundred small kernels: on an
    H100 it is host-bound, ~2 ms whatever the length, for ~0.3 ms of GPU work. A CUDA graph
    replays them with one launch. ``x`` is copied into the graph's input buffer and the outputs
    are copied out of the graph's memory (one packed copy), so the results of successive calls
    never alias: every layer of a model keeps its own BlockMask until its backward.

    Each graph keeps its temporaries in a private memory pool (``O((N / 128)²)`` bytes per head);
    at most ``size`` graphs are kept, least recently used first out. A capture that fails
    (an operation a graph cannot hold) falls back to running ``fn`` eagerly for that shape, as do
    inputs off CUDA and calls inside ``torch.compile``.
    """

    def __init__(self, fn: Callable, size: int = 4):
        self.fn, self.size = fn, size
        self._graphs: OrderedDict = OrderedDict()

    def __call__(self, x: torch.Tensor, key: Hashable = None) -> tuple[torch.Tensor, ...]:
        # no graph off CUDA, inside torch.compile (traced instead) or inside the caller's own capture
        if not x.is_cuda or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return self.fn(x, key)
        key = (tuple(x.shape), x.dtype, x.device, key)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x, key[-1])
            if len(self._graphs) > self.size:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        if entry == "eager":
            return self.fn(x, key[-1])
        graph, static_in, packed, shapes = entry
        with torch.cuda.device(x.device):  # replay on x's device, whichever device is current
            static_in.copy_(x)
            graph.replay()
            flat = packed.clone()
        sizes = [math.prod(shape) for shape in shapes]
        return tuple(part.view(shape) for part, shape in zip(flat.split(sizes), shapes, strict=True))

    def _capture(self, x: torch.Tensor, key: Hashable):
        static_in = x.detach().clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        try:
            with torch.no_grad(), torch.cuda.device(x.device):
                with torch.cuda.stream(side):  # warm-up outside the graph (lazy inits, workspaces)
                    self.fn(static_in, key)
                torch.cuda.current_stream(x.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs = self.fn(static_in, key)
                    packed = torch.cat([o.reshape(-1) for o in outs])
        except RuntimeError:
            return "eager"
        return graph, static_in, packed, [tuple(o.shape) for o in outs]


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


def per_block_min_max(x: torch.Tensor, block_size: int, start: int = 0, length: int | None = None):
    """Min and max of ``x[..., start:start+length]`` over each block of ``block_size``: two ``[..., n]`` tensors."""
    length = x.shape[-1] - start if length is None else length
    x = x[..., start : start + length]
    n = -(-length // block_size)
    pad = n * block_size - length
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    x = x.reshape(*x.shape[:-1], n, block_size)
    return x.amin(-1), x.amax(-1)


def shift_queries(mod: ModFn, offset: int, device) -> ModFn:
    """Turn a mask/score function of absolute query positions into one of call-local positions.

    The offset is captured as a one-element tensor (read with ``[0]``, a load in the kernel) so that
    a growing KV cache does not recompile; a 0-d tensor would become a host scalar, which
    dynamic-shape flex kernels fail to lower inside a score_mod (seen with torch 2.11 on an H100).
    """
    if offset == 0:
        return mod
    # torch.full launches a fill kernel; torch.tensor([offset], device=...) would copy from pageable
    # host memory, which synchronises the stream on every decoding step
    shift = torch.full((1,), offset, device=device)

    def shifted(b, h, q_idx, kv_idx):
        return mod(b, h, q_idx + shift[0], kv_idx)

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
    """Per row: how many blocks are set, and their indices first (ascending), as int32.

    A stable partition by prefix sums and one scatter: no sort, a few elementwise kernels.
    """
    b = blocks.to(torch.int32)
    counts = b.sum(-1, dtype=torch.int32)
    before = b.cumsum(-1, dtype=torch.int32) - b  # set blocks before each one
    idx = torch.arange(b.shape[-1], device=b.device, dtype=torch.int32).expand_as(b)
    pos = torch.where(blocks, before, counts[..., None] + idx - before)
    order = torch.empty_like(b).scatter_(-1, pos.long(), idx)
    # contiguous: flex's kernels read the index tensors as row-major (a transposed map's order,
    # left strided, gave wrong backward gradients and transposed passes on an H100)
    return counts.contiguous(), order.contiguous()


_BATCH_LIMIT = 1 << 23  # blocks (8M: 32k tokens at 16 heads batch; 128k tokens at 8 heads don't)


def _block_tensors(any_: torch.Tensor, all_: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
    tensors = _block_tensors(any_, all_)
    if repeat_heads > 1:
        tensors = [t.repeat_interleave(repeat_heads, 1) for t in tensors]
    return block_mask_from_tensors(tensors, mask_mod, q_len, kv_len, block_size)


def block_mask_from_tensors(tensors, mask_mod: ModFn, q_len: int, kv_len: int, block_size: int) -> BlockMask:
    """A ``BlockMask`` from the eight index tensors of :func:`_block_tensors` (no copies)."""
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


def build_block_mask(mask: Mask, layout: Layout, block_size: int = 128) -> BlockMask:
    """Build the ``BlockMask`` of ``mask`` for ``layout`` from its structure."""
    replayed = mask._replayed_block_mask(layout, block_size)
    if replayed is not None:
        return replayed
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
