"""Token-level truth of a mask, in bounded memory: kept maps, kept counts per cell, kept pairs.

Every count here comes from evaluating the mask's own ``mask_mod`` (the function the kernels run,
call-local positions) at (query, key) pairs, a slab of query rows at a time: at most
:data:`SLAB` booleans exist at once, however long the sequence. Nothing is estimated.

Index grids follow FlexAttention's broadcasting: ``b`` ``[1,1,1,1]``, ``h`` ``[1,H,1,1]``, ``q``
``[1,1,Q,1]``, ``kv`` ``[1,1,1,KV]``. A result whose head dimension is 1 (the mask does not depend
on the head) is counted once and shared by every head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..lowering.layout import cdiv

ModFn = Callable[..., torch.Tensor]

#: Most booleans evaluated at once (16 MiB; a few temporaries of this size live during a slab).
SLAB = 1 << 24


def evaluate(mod: ModFn, b: int, heads: Sequence[int], q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """``mod`` at batch row ``b``, the given heads, and every pair of ``q`` × ``kv`` (1-D index tensors).

    Returns:
        bool ``[Hd, len(q), len(kv)]``; ``Hd`` is 1 when the result does not depend on the head,
        else ``len(heads)``. May be a broadcast view.
    """
    dev = q.device
    bt = torch.full((1, 1, 1, 1), b, device=dev, dtype=torch.long)
    ht = torch.tensor(list(heads), device=dev, dtype=torch.long).view(1, -1, 1, 1)
    out = torch.as_tensor(mod(bt, ht, q.view(1, 1, -1, 1), kv.view(1, 1, 1, -1)), device=dev)
    if out.dtype != torch.bool:
        raise TypeError(f"a mask function must return a bool tensor, got dtype {out.dtype}")
    shape = torch.broadcast_shapes(out.shape, (1, 1, len(q), len(kv)))
    if len(shape) != 4 or shape[0] != 1 or shape[1] not in (1, len(heads)):
        raise ValueError(f"a mask function returned shape {tuple(out.shape)} for one batch row and {len(heads)} heads")
    return out.expand(shape)[0]


def _rows_per_slab(heads: int, kv: int, multiple: int = 1) -> int:
    rows = max(1, SLAB // max(1, heads * kv))
    return max(multiple, rows // multiple * multiple)


def token_map(mod: ModFn, b: int, heads: Sequence[int], q_len: int, kv_len: int, device: torch.device) -> np.ndarray:
    """The kept map ``bool [len(heads), q_len, kv_len]`` (the picture itself is the memory bound)."""
    out = np.empty((len(heads), q_len, kv_len), dtype=np.bool_)
    kv = torch.arange(kv_len, device=device)
    step = _rows_per_slab(len(heads), kv_len)
    for first in range(0, q_len, step):
        last = min(q_len, first + step)
        out[:, first:last] = evaluate(mod, b, heads, torch.arange(first, last, device=device), kv).cpu().numpy()
    return out


def pool(kept: torch.Tensor, cell: int) -> torch.Tensor:
    """Kept pairs per ``cell × cell`` square of a bool ``[H, R, KV]`` map: int64 ``[H, ⌈R/cell⌉, ⌈KV/cell⌉]``.

    Squares at the bottom and right edges are cut short (they count only the pairs that exist).

    Examples:
        >>> import torch
        >>> from flexmask.viz.counting import pool
        >>> pool(torch.ones(3, 3, dtype=torch.bool).tril()[None], 2).tolist()
        [[[3, 0], [2, 1]]]
    """
    h, r, kv = kept.shape
    nr, nk = cdiv(r, cell), cdiv(kv, cell)
    u = kept.view(torch.uint8) if kept.is_contiguous() else kept.to(torch.uint8)
    if nr * cell != r or nk * cell != kv:
        u = F.pad(u, (0, nk * cell - kv, 0, nr * cell - r))
    # sum the rows of a square first (uint8 holds up to 255 of them), then its columns; about
    # 5x faster on CPU than one reduction over both axes of a bool tensor
    row_dtype = torch.uint8 if cell < 256 else torch.int32
    rows = u.reshape(h, nr, cell, nk * cell).sum(2, dtype=row_dtype)
    return rows.view(h, nr, nk, cell).sum(-1, dtype=torch.int64)


def pooled_counts(
    mod: ModFn, b: int, heads: Sequence[int], q_len: int, kv_len: int, cell: int, device: torch.device
) -> np.ndarray:
    """Kept pairs per ``cell × cell`` square of tokens: int64 ``[len(heads), ⌈q_len/cell⌉, ⌈kv_len/cell⌉]``."""
    nq, nk = cdiv(q_len, cell), cdiv(kv_len, cell)
    out = np.empty((len(heads), nq, nk), dtype=np.int64)
    kv = torch.arange(kv_len, device=device)
    step = _rows_per_slab(len(heads), kv_len, cell)
    for first in range(0, q_len, step):
        last = min(q_len, first + step)
        kept = evaluate(mod, b, heads, torch.arange(first, last, device=device), kv)
        out[:, first // cell : cdiv(last, cell)] = pool(kept, cell).cpu().numpy()  # broadcasts Hd = 1
    return out


def count_pairs(mod: ModFn, b: int, heads: Sequence[int], q: torch.Tensor, kv: torch.Tensor) -> np.ndarray:
    """Kept pairs among ``q`` × ``kv`` (1-D index tensors), per head: int64 ``[len(heads)]``."""
    total = np.zeros(len(heads), dtype=np.int64)
    kv_step = max(1, SLAB // len(heads))
    for k0 in range(0, len(kv), kv_step):
        kv_part = kv[k0 : k0 + kv_step]
        step = _rows_per_slab(len(heads), len(kv_part))
        for q0 in range(0, len(q), step):
            kept = evaluate(mod, b, heads, q[q0 : q0 + step], kv_part)
            total += kept.sum((1, 2)).cpu().numpy()  # broadcasts Hd = 1
    return total


def kept_in_blocks(
    mod: ModFn,
    b: int,
    heads: Sequence[int],
    partial: np.ndarray,
    block_size: int,
    q_len: int,
    kv_len: int,
    device: torch.device,
) -> np.ndarray:
    """Kept pairs inside the blocks marked in ``partial`` (bool ``[1 or len(heads), nq, nk]``), per head.

    Only those blocks are evaluated, one row of blocks at a time: a block map's exact token count
    costs the area of its partial blocks, not ``q_len · kv_len``.
    """
    total = np.zeros(len(heads), dtype=np.int64)
    offsets = torch.arange(block_size, device=device)
    groups = (
        [(list(range(len(heads))), partial[0])]
        if partial.shape[0] == 1
        else [([i], partial[i]) for i in range(len(heads))]
    )
    for idx, blocks in groups:
        for r in np.flatnonzero(blocks.any(1)):
            cols = torch.as_tensor(np.flatnonzero(blocks[r]), device=device)
            kv = (cols[:, None] * block_size + offsets).flatten()
            kv = kv[kv < kv_len]
            q = torch.arange(r * block_size, min((r + 1) * block_size, q_len), device=device)
            total[idx] += count_pairs(mod, b, [heads[i] for i in idx], q, kv)
    return total
