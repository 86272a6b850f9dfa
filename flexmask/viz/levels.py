"""Building a :class:`~flexmask.viz.pictures.MaskPicture`: choosing the level, then token, pooled or block maps.

Memory is bounded however long the sequence: token maps need ``heads · q_len · kv_len <= max_cells``;
pooled maps and exact counts are evaluated in slabs (:mod:`flexmask.viz.counting`); block maps
come from the mask's structure (``Mask.block_mask``), with ``O((N / block)²)`` cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..lowering.layout import cdiv
from . import _core, counting
from .pictures import (
    MAX_CELLS,
    MAX_CELLS_PER_SIDE,
    MAX_PAIRS,
    Level,
    MaskPicture,
    head_ids,
    positive_int,
)


def mask_picture(
    mask: _core.Mask | torch.Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    heads: int | Sequence[int] | None = None,
    batch_index: int = 0,
    level: Level = "auto",
    cell_size: int | None = None,
    max_cells: int = MAX_CELLS,
    max_pairs: int = MAX_PAIRS,
) -> MaskPicture:
    """The per-head maps :func:`flexmask.viz.plot` draws (see it for the arguments).

    ``level="auto"`` picks ``"token"`` while ``heads · q_len · kv_len`` fits ``max_cells``; else
    ``"pooled"`` for masks whose blocks say little about what was kept (content masks ``fm.topk``
    and ``fm.topk_blocks``, custom functions ``fm.mask``, bool tensors) while those pairs fit
    ``max_pairs``; else ``"block"``.

    Returns:
        A :class:`MaskPicture`: ``cells`` ``[heads, rows, cols]`` and ``kept`` ``[heads, 2]``.

    Examples:
        >>> import torch, flexmask as fm
        >>> from flexmask.viz import mask_picture
        >>> pic = mask_picture(fm.causal(), 1 << 20, 1 << 20)   # a block map, never dense
        >>> pic.level, pic.cells.shape, pic.cell_size
        ('block', (1, 256, 256), 4096)
        >>> scores = torch.randn(1, 2, 4096)                      # content: pooled, token level
        >>> pic = mask_picture(fm.topk(scores, 256), 4096, 4096)
        >>> pic.level, pic.cells.shape, pic.cell_size, pic.sparsity().round(2).tolist()
        ('pooled', (2, 256, 256), 16, [93.94, 93.94])
    """
    if level not in ("auto", "token", "pooled", "block"):
        raise ValueError(f"level must be 'auto', 'token', 'pooled' or 'block', got {level!r}")
    max_cells = positive_int("max_cells", max_cells)
    max_pairs = positive_int("max_pairs", max_pairs)
    if cell_size is not None:
        cell_size = positive_int("cell_size", cell_size)
    if isinstance(batch_index, bool) or not isinstance(batch_index, int) or batch_index < 0:
        raise ValueError(f"batch_index must be an int >= 0, got {batch_index!r}")
    args = (heads, batch_index, level, cell_size, max_cells, max_pairs)
    with torch.no_grad():
        if isinstance(mask, _core.Mask):
            return _of_mask(mask, q_len, kv_len, *args)
        if isinstance(mask, torch.Tensor):
            return _of_tensor(mask, q_len, kv_len, *args)
    raise TypeError(f"expected a flexmask mask or a bool tensor, got {type(mask).__name__}")


def mask_image(
    mask: _core.Mask | torch.Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    heads: int | Sequence[int] | None = None,
    batch_index: int = 0,
    level: Level = "auto",
    cell_size: int | None = None,
    max_cells: int = MAX_CELLS,
    max_pairs: int = MAX_PAIRS,
) -> np.ndarray:
    """The array :func:`flexmask.viz.plot` draws, ``[heads, rows, cols]`` (see :class:`MaskPicture`).

    At token level a bool array equal to ``mask.to_dense(q_len, kv_len, heads=H)[batch_index]``.

    Examples:
        >>> import flexmask as fm
        >>> from flexmask.viz import mask_image
        >>> mask_image(fm.causal(), 3, 3)[0].astype(int).tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return mask_picture(
        mask,
        q_len,
        kv_len,
        heads=heads,
        batch_index=batch_index,
        level=level,
        cell_size=cell_size,
        max_cells=max_cells,
        max_pairs=max_pairs,
    ).cells


def _of_mask(mask, q_len, kv_len, heads, batch_index, level, cell_size, max_cells, max_pairs) -> MaskPicture:
    if q_len is None:
        raise ValueError("drawing a mask needs q_len (and kv_len, which defaults to q_len)")
    kv_len = q_len if kv_len is None else kv_len
    own_batch, own_heads = _core.mask_dims(mask)
    if own_batch is not None and own_batch > 1 and batch_index >= own_batch:
        raise ValueError(f"batch_index={batch_index} is out of range: the mask has batch {own_batch}")
    row = batch_index if (own_batch or 1) > 1 else 0
    n_heads, ids = head_ids(heads, own_heads)
    layout = _core.mask_layout(mask, q_len, kv_len, n_heads)  # checks lengths and the mask's tensors
    pairs = len(ids) * q_len * kv_len
    level = _level(level, pairs, max_cells, max_pairs, _core.unstructured(mask))
    mod, _ = _core.call_mods(mask, None, None, layout)
    dev, label = layout.device, repr(mask)
    if level == "token":
        cells = counting.token_map(mod, row, ids, q_len, kv_len, dev)
        return MaskPicture(cells, "token", 1, q_len, kv_len, ids, label, _exact(cells.sum((1, 2))))
    if level == "pooled":
        c = _cell_size(cell_size, q_len, kv_len, len(ids), max_cells, start=1)
        counts = counting.pooled_counts(mod, row, ids, q_len, kv_len, c, dev)
        return _pooled(counts, c, q_len, kv_len, ids, label)
    bs = _cell_size(cell_size, q_len, kv_len, len(ids), max_cells, start=128)
    planes = layout.batch * layout.heads * q_len * kv_len
    if dev.type != "cuda" and _core.has_custom(mask) and planes > max_pairs:
        raise ValueError(
            f"{mask!r} holds a custom mask function (fm.mask), which is evaluated at every (query, key) "
            f"pair to find its blocks on CPU; {planes:,} pairs is more than max_pairs={max_pairs:,}. "
            "Draw shorter lengths, or raise max_pairs"
        )
    any_, all_ = _core.block_states(mask.block_mask(q_len, kv_len, heads=n_heads, block_size=bs))
    any_ = any_[min(row, any_.shape[0] - 1)]  # [H|1, nq, nk]
    all_ = all_[min(row, all_.shape[0] - 1)]
    if any_.shape[0] > 1:
        any_, all_ = any_[list(ids)], all_[list(ids)]
    any_, all_ = any_.cpu().numpy(), all_.cpu().numpy()
    codes = np.broadcast_to(any_.astype(np.uint8) + all_, (len(ids), *any_.shape[1:])).copy()
    area = _areas(bs, q_len, kv_len)
    full = np.broadcast_to((all_ * area).sum((1, 2)), len(ids))
    partial = any_ & ~all_
    partial_area = np.broadcast_to((partial * area).sum((1, 2)), len(ids))
    # evaluating the partial blocks gives the exact token-level count; a mask whose blocks, tensors
    # and functions don't depend on the head is evaluated once for all heads
    shared = partial.shape[0] == 1 and own_heads is None and not _core.has_custom(mask)
    if (partial_area[0] if shared else partial_area.sum()) <= max_pairs:
        kept = full + counting.kept_in_blocks(mod, row, ids, partial, bs, q_len, kv_len, dev)
        kept = _exact(kept)
    else:
        kept = np.stack([full, full + partial_area], -1).astype(np.int64)
    return MaskPicture(codes, "block", bs, q_len, kv_len, ids, label, kept)


def _of_tensor(t, q_len, kv_len, heads, batch_index, level, cell_size, max_cells, max_pairs) -> MaskPicture:
    if t.dtype != torch.bool:
        raise TypeError(f"a mask tensor must be bool (True = kept), got dtype {t.dtype}")
    if t.dim() not in (2, 3, 4):
        raise ValueError(
            f"a mask tensor must be [q_len, kv_len], [heads, q_len, kv_len] or [batch, heads, q_len, kv_len], "
            f"got shape {tuple(t.shape)}"
        )
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    if batch_index >= t.shape[0]:
        raise ValueError(f"batch_index={batch_index} is out of range for a tensor of batch {t.shape[0]}")
    for name, given, actual in (("q_len", q_len, t.shape[2]), ("kv_len", kv_len, t.shape[3])):
        if given is not None and given != actual:
            raise ValueError(f"{name}={given} does not match the mask tensor's shape {tuple(t.shape)}")
    t = t[batch_index]
    n_heads, ids = head_ids(heads, t.shape[0])
    if n_heads > t.shape[0] or max(ids) >= t.shape[0]:
        raise ValueError(f"heads={heads!r} asks for more heads than the mask tensor has ({t.shape[0]})")
    t = t[list(ids)]
    q_len, kv_len = t.shape[1], t.shape[2]
    label = f"bool tensor {tuple(t.shape)}"
    level = _level(level, t.numel(), max_cells, max_pairs, True)
    kept = _exact(t.sum((1, 2)).cpu().numpy())
    if level == "token":
        return MaskPicture(t.cpu().numpy(), "token", 1, q_len, kv_len, ids, label, kept)
    c = _cell_size(cell_size, q_len, kv_len, len(ids), max_cells, start=1 if level == "pooled" else 128)
    step = max(c, counting.SLAB // (len(ids) * kv_len) // c * c)
    counts = np.concatenate([counting.pool(t[:, i : i + step], c).cpu().numpy() for i in range(0, q_len, step)], 1)
    if level == "pooled":
        return _pooled(counts, c, q_len, kv_len, ids, label)
    area = _areas(c, q_len, kv_len)
    codes = np.where(counts == area, 2, np.where(counts > 0, 1, 0)).astype(np.uint8)
    return MaskPicture(codes, "block", c, q_len, kv_len, ids, label, kept)


def _pooled(counts: np.ndarray, c: int, q_len: int, kv_len: int, ids, label: str) -> MaskPicture:
    cells = counts / _areas(c, q_len, kv_len)
    return MaskPicture(cells, "pooled", c, q_len, kv_len, ids, label, _exact(counts.sum((1, 2))))


def _exact(kept: np.ndarray) -> np.ndarray:
    kept = np.asarray(kept, dtype=np.int64)
    return np.stack([kept, kept], -1)


def _areas(c: int, q_len: int, kv_len: int) -> np.ndarray:
    """Pairs in each ``c × c`` cell: ``[rows, cols]`` (edge cells cut short)."""
    rows = np.minimum(c, q_len - c * np.arange(cdiv(q_len, c)))
    cols = np.minimum(c, kv_len - c * np.arange(cdiv(kv_len, c)))
    return rows[:, None].astype(np.int64) * cols[None, :]


def _level(level: str, pairs: int, max_cells: int, max_pairs: int, unstructured: bool) -> str:
    if level == "token" and pairs > max_cells:
        raise ValueError(
            f"a token-level picture needs heads · q_len · kv_len = {pairs:,} cells, more than "
            f"max_cells={max_cells:,}; use level='pooled', 'block' or 'auto', or raise max_cells"
        )
    if level == "pooled" and pairs > max_pairs:
        raise ValueError(
            f"a pooled picture evaluates heads · q_len · kv_len = {pairs:,} (query, key) pairs, more "
            f"than max_pairs={max_pairs:,}; use level='block' or 'auto', or raise max_pairs"
        )
    if level != "auto":
        return level
    if pairs <= max_cells:
        return "token"
    return "pooled" if unstructured and pairs <= max_pairs else "block"


def _cell_size(given: int | None, q_len: int, kv_len: int, planes: int, max_cells: int, start: int) -> int:
    def cells(c: int) -> int:
        return planes * cdiv(q_len, c) * cdiv(kv_len, c)

    if given is not None:
        if cells(given) > max_cells:
            raise ValueError(
                f"cell_size={given} gives {cells(given):,} cells, more than max_cells={max_cells:,}; "
                "use a larger cell_size"
            )
        return given
    c = start  # block maps start at FlexAttention's block, 128, when the map is small enough to show it
    while cells(c) > max_cells or max(cdiv(q_len, c), cdiv(kv_len, c)) > MAX_CELLS_PER_SIDE:
        c *= 2
    return c
