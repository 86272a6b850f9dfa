"""Picture data of a mask: one map per head, at token, pooled or block level, and its sparsity.

**Sparsity**, everywhere in :mod:`flexmask.viz`, is the share of (query, key) pairs that are
masked, i.e. of the ``q_len × kv_len`` scores attention skips, counted token by token. Block maps
state it too (full blocks count whole, partial blocks are evaluated); when partial blocks are too
many to evaluate within ``max_pairs``, a picture holds the exact bounds instead of one number.

Levels:

* ``"token"``: ``bool [heads, q_len, kv_len]``, kept = ``True``; what ``Mask.to_dense`` gives.
* ``"pooled"``: each cell a ``cell_size × cell_size`` square of tokens, holding the fraction of its
  pairs kept: kept stripes of content masks (``fm.topk``, DMA) stay visible at any length.
* ``"block"``: the mask's ``BlockMask``: ``EMPTY``/``PARTIAL``/``FULL`` per block, built from the
  mask's structure (the work FlexAttention does), never dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Level = Literal["auto", "token", "pooled", "block"]

#: Most cells (``heads · rows · columns``) a picture may hold, dense or in cells.
MAX_CELLS = 1 << 22
#: At most this many cells along a side of an automatically sized pooled or block map.
MAX_CELLS_PER_SIDE = 256
#: Most (query, key) pairs a mask function is evaluated at for one picture (about a second on CPU).
MAX_PAIRS = 1 << 30

#: Cell codes of a block map (token maps are bool: ``False`` masked, ``True`` kept).
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class MaskPicture:
    """What :func:`flexmask.viz.plot` draws: one map per head, and how many pairs each head keeps.

    Attributes:
        cells: ``[heads, rows, cols]``. ``"token"``: bool, kept = ``True``. ``"pooled"``: float64
            in ``[0, 1]``, the fraction of the cell's (query, key) pairs kept. ``"block"``: uint8
            ``EMPTY`` (0) / ``PARTIAL`` (1) / ``FULL`` (2) per block. Pooled and block cells are
            ``cell_size × cell_size`` tokens; the last row/column of cells may be cut short.
        level: ``"token"``, ``"pooled"`` or ``"block"``.
        cell_size: tokens per cell side (1 at token level).
        q_len, kv_len: the sequence lengths; queries are the last ``q_len`` of ``kv_len`` positions.
        heads: the head index of each map.
        label: what was drawn (the mask's expression).
        kept: int64 ``[heads, 2]``: fewest and most (query, key) pairs each head keeps; the two are
            equal (exact) at token and pooled level, and at block level when the partial blocks
            were evaluated (their area fit ``max_pairs``).

    Examples:
        >>> import flexmask as fm
        >>> from flexmask.viz import mask_picture
        >>> pic = mask_picture(fm.causal() & fm.sliding_window(2), 4, 4)
        >>> pic.level, pic.cells.shape, pic.kept.tolist(), pic.sparsity().tolist()
        ('token', (1, 4, 4), [[7, 7]], [56.25])
    """

    cells: np.ndarray
    level: str
    cell_size: int
    q_len: int
    kv_len: int
    heads: tuple[int, ...]
    label: str
    kept: np.ndarray

    @property
    def offset(self) -> int:
        """Absolute position of the first query (``kv_len - q_len``)."""
        return self.kv_len - self.q_len

    @property
    def exact(self) -> bool:
        """Whether every head's kept count is known exactly (not only bounded)."""
        return bool((self.kept[:, 0] == self.kept[:, 1]).all())

    def sparsity_bounds(self) -> np.ndarray:
        """Percent of the ``q_len × kv_len`` scores masked, per head, as ``float64 [heads, 2]`` (low, high)."""
        return 100.0 * (1.0 - self.kept[:, ::-1] / (self.q_len * self.kv_len))

    def sparsity(self) -> np.ndarray:
        """Percent of the ``q_len × kv_len`` scores masked (token level), per head: ``float64 [heads]``.

        Raises ``ValueError`` when only bounds are known (see :meth:`sparsity_bounds`).
        """
        if not self.exact:
            raise ValueError(
                "this block map's partial blocks were not evaluated (more pairs than max_pairs), so "
                "only bounds of its sparsity are known: use sparsity_bounds(), or raise max_pairs"
            )
        return self.sparsity_bounds()[:, 0]

    def codes(self) -> np.ndarray:
        """``uint8 [heads, rows, cols]`` colour codes of a token or block map (token: ``EMPTY``/``FULL``)."""
        if self.level == "pooled":
            raise ValueError("a pooled picture holds fractions, not colour codes")
        if self.level == "token":
            return self.cells.astype(np.uint8) * FULL
        return self.cells


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def head_ids(heads, own: int | None) -> tuple[int, tuple[int, ...]]:
    """(number of heads to lay the mask out for, indices of the heads to show)."""
    if heads is None:
        n = own or 1
        return n, tuple(range(n))
    if isinstance(heads, int) and not isinstance(heads, bool):
        n = positive_int("heads", heads)
        return n, tuple(range(n))
    ids = tuple(heads)
    if not ids or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in ids):
        raise ValueError(f"heads must be an int or a non-empty sequence of head indices >= 0, got {heads!r}")
    return (own or max(ids) + 1), ids


def format_sparsity(low: float, high: float) -> str:
    """``"93.9%"``, or ``"49.8–50.2%"`` when only bounds are known."""
    a, b = f"{low:.1f}", f"{high:.1f}"
    return f"{a}%" if a == b else f"{a}–{b}%"


#: The one definition, as figure captions state it.
SPARSITY_CAPTION = "sparsity: % of (query, key) scores masked"
