"""Evaluating a mask function on a dense grid, bounded in memory by working a slab of rows at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import BlockRanges, Layout, ModFn

CHUNK_ELEMENTS = 1 << 26
"""Most booleans a dense evaluation holds at once (a slab of query rows)."""


def evaluate(mod: ModFn, layout: Layout, rows: slice | None = None) -> torch.Tensor:
    """``mod`` (absolute positions) on the grid ``[B, H, rows, KV]`` of ``layout``, as a bool tensor.

    Index tensors broadcast (``b`` is ``[B,1,1,1]``, ``kv`` is ``[1,1,1,KV]``, ...), so any
    ``mask_mod`` written with elementwise tensor operations and indexing works unchanged.
    ``rows`` are call-local query rows (default: all ``q_len``).
    """
    dev = layout.device
    start, stop = (0, layout.q_len) if rows is None else (rows.start, rows.stop)
    b = torch.arange(layout.batch, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(layout.heads, device=dev).view(1, -1, 1, 1)
    q = torch.arange(start, stop, device=dev).view(1, 1, -1, 1) + layout.offset
    kv = torch.arange(layout.kv_len, device=dev).view(1, 1, 1, -1)
    out = mod(b, h, q, kv)
    shape = (layout.batch, layout.heads, stop - start, layout.kv_len)
    return check_mask_value(out, shape, mod).expand(shape).clone()


def check_mask_value(out: object, shape: tuple[int, ...], mod: ModFn) -> torch.Tensor:
    """``out`` if it is a bool tensor broadcastable to ``shape``; else a clear ``TypeError``/``ValueError``."""
    name = getattr(mod, "__name__", "mask function")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
        got = f"dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"mask function {name!r} must return a bool tensor, got {got}")
    try:
        torch.broadcast_shapes(tuple(out.shape), shape)
        fits = out.dim() <= 4 and torch.broadcast_shapes(tuple(out.shape), shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask function {name!r} returned shape {tuple(out.shape)}, which does not broadcast to "
            f"[batch, heads, q, kv] = {list(shape)}; it must combine b, h, q_idx, kv_idx elementwise"
        )
    return out


def classify_densely(mod: ModFn, layout: Layout, qr: BlockRanges, kr: BlockRanges) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, all)`` block maps of ``mod`` by evaluating it one slab of query blocks at a time."""
    bs, nq, nk = qr.size, qr.count, kr.count
    per_row = layout.batch * layout.heads * layout.kv_len
    blocks_per_step = max(1, CHUNK_ELEMENTS // (per_row * bs))
    pad = nk * bs - layout.kv_len
    any_parts, all_parts = [], []
    for first in range(0, nq, blocks_per_step):
        last = min(nq, first + blocks_per_step)
        rows = slice(first * bs, min(last * bs, layout.q_len))
        d = evaluate(mod, layout, rows)  # [B, H, rows, KV]
        d_any = F.pad(d, (0, pad), value=False)
        d_all = F.pad(d, (0, pad), value=True)
        row_pad = (last - first) * bs - (rows.stop - rows.start)
        d_any = F.pad(d_any, (0, 0, 0, row_pad), value=False)
        d_all = F.pad(d_all, (0, 0, 0, row_pad), value=True)
        shape = (layout.batch, layout.heads, last - first, bs, nk, bs)
        any_parts.append(d_any.view(shape).any(-1).any(-2))
        all_parts.append(d_all.view(shape).all(-1).all(-2))
    return torch.cat(any_parts, dim=2), torch.cat(all_parts, dim=2)
