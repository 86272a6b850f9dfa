"""Recording what a model's attention kept: the mask of every :func:`flexmask.attention` call.

Run a model forward once inside :func:`record_masks` to see what each flexmask (or Dynamic Mask
Attention) layer kept, per head; draw it with :func:`flexmask.viz.plot_layers`. Needs no matplotlib.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _core
from .levels import mask_picture
from .pictures import MAX_PAIRS, Level, MaskPicture

#: Most cells recorded per attention call by :func:`record_masks` (token maps up to this size).
MAX_RECORD_CELLS = 1 << 20


@dataclass
class RecordedCall:
    """One :func:`flexmask.attention` call seen by :func:`record_masks`.

    Attributes:
        mask: the mask it was given (``None``: no mask).
        layout: its shapes (batch, query heads, q_len, kv_len, device).
        picture: what the mask kept for the recorder's ``batch_index``, per head, taken at call
            time (see :func:`flexmask.viz.mask_picture`; ``picture.sparsity()`` is the percent of
            (query, key) scores masked, per head).
    """

    mask: _core.Mask | None
    layout: _core.Layout
    picture: MaskPicture

    @property
    def dense(self) -> torch.Tensor | None:
        """The kept map ``bool [heads, q_len, kv_len]`` when recorded at token level, else ``None``."""
        return torch.from_numpy(self.picture.cells) if self.picture.level == "token" else None


@dataclass
class MaskRecording:
    """The calls :func:`record_masks` saw, in call order (for a forward pass: layer order)."""

    calls: list[RecordedCall] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[RecordedCall]:
        return iter(self.calls)

    def __getitem__(self, i: int) -> RecordedCall:
        return self.calls[i]

    def sparsity(self) -> np.ndarray:
        """Percent of (query, key) scores masked, ``float64 [calls, heads]`` (all calls' heads alike).

        Raises ``ValueError`` if some call holds only bounds (a block map past ``max_pairs``).
        """
        return np.stack([call.picture.sparsity() for call in self.calls])


@contextlib.contextmanager
def record_masks(
    *,
    batch_index: int = 0,
    level: Level = "auto",
    max_cells: int = MAX_RECORD_CELLS,
    max_pairs: int = MAX_PAIRS,
) -> Iterator[MaskRecording]:
    """Record the mask of every :func:`flexmask.attention` call made inside the ``with`` block.

    Each call's picture is taken when the call is made, as :func:`flexmask.viz.mask_picture`
    takes it: token level while ``heads · q_len · kv_len <= max_cells``; else content masks (DMA's
    ``fm.topk`` / ``fm.topk_blocks``) pooled at token level, each cell the share of its pairs kept
    (at 4096 tokens: 16×16-token cells), and structured masks as block maps. Run the model eagerly
    (not under ``torch.compile``).

    Args:
        batch_index: the batch row to record.
        level: ``"auto"``, ``"token"``, ``"pooled"`` or ``"block"``.
        max_cells: cap on each picture's cells.
        max_pairs: cap on the (query, key) pairs evaluated per call.

    Yields:
        A :class:`MaskRecording`, filled as calls happen.

    Examples:
        >>> import torch, flexmask as fm
        >>> from flexmask.viz import record_masks
        >>> x = torch.randn(1, 2, 16, 8)
        >>> with record_masks() as rec:
        ...     y = fm.attention(x, x, x, mask=fm.causal())
        ...     y = fm.attention(y, y, y, mask=fm.sliding_window(4))
        >>> len(rec), rec[1].dense.shape, rec.sparsity()[:, 0].round(1).tolist()
        (2, torch.Size([2, 16, 16]), [46.9, 77.3])
    """
    recording = MaskRecording()

    def observe(mask: _core.Mask | None, layout: _core.Layout) -> None:
        picture = mask_picture(
            _core.full() if mask is None else mask,
            layout.q_len,
            layout.kv_len,
            heads=layout.heads,
            batch_index=batch_index,
            level=level,
            max_cells=max_cells,
            max_pairs=max_pairs,
        )
        if mask is None:
            picture = MaskPicture(
                picture.cells,
                picture.level,
                picture.cell_size,
                picture.q_len,
                picture.kv_len,
                picture.heads,
                "no mask",
                picture.kept,
            )
        recording.calls.append(RecordedCall(mask, layout, picture))

    _core.add_observer(observe)
    try:
        yield recording
    finally:
        _core.remove_observer(observe)
