"""Pictures of masks and attention: per-head heatmaps, block maps, learned masks, ``flexmask plot``.

* :func:`plot` draws a mask (or a bool tensor) as one panel per head: token by token when it is
  small, as a map of empty / partial / full blocks (from the mask's ``BlockMask``) when it is large.
  Memory is bounded by ``max_cells`` however long the sequence: a large mask is never made dense.
* :func:`mask_image` is the array :func:`plot` draws, for checks.
* :func:`attention_map` / :func:`plot_attention`: the attention probabilities of given ``q``, ``k``
  with a mask and bias, lowered exactly as :func:`flexmask.attention` lowers them.
* :func:`record_masks` / :func:`plot_layers`: what every flexmask attention layer of a model kept
  for one input (per layer, per head), as a layers × heads grid.
* :func:`main` is ``python -m flexmask plot EXPR ...``; :func:`save_demo_images` serves
  ``python -m flexmask demo``.

Figures are plain ``matplotlib.figure.Figure`` objects with an Agg canvas, not registered with
``pyplot``: save them with ``fig.savefig(path)`` (``.png``, ``.svg``, ``.pdf``); notebooks display
them. To draw into a ``pyplot`` figure of your own, pass ``ax=`` (one head).

Example:
    >>> import flexmask as fm
    >>> from flexmask.plot import plot
    >>> fig = plot(fm.causal() & fm.sliding_window(16), 64, 64)   # then fig.savefig("window.png")
    >>> fig.axes[0].get_title()
    'head 0 · sparsity 77.9%'
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from einops import rearrange

from .attention import _check_inputs, lower_score, observers
from .bias import Bias
from .blocks import Layout, shift_queries, states_from_block_mask
from .masks import Custom, Mask, full
from .masks import _positive_int as _positive

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Level = Literal["auto", "token", "block"]

#: Most cells (``batch · heads · rows · columns``) a mask picture may hold, dense or in blocks.
MAX_CELLS = 1 << 22
#: At most this many blocks along a side of an automatically sized block map.
MAX_BLOCKS_PER_SIDE = 256
#: Most (query, key) pairs a custom mask function (``fm.mask``) is evaluated at to plot it on CPU.
MAX_CUSTOM_PAIRS = 1 << 30
#: Most probabilities (``batch · heads · q_len · kv_len``) :func:`attention_map` computes.
MAX_ATTENTION_CELLS = 1 << 24
#: Most cells recorded per attention call by :func:`record_masks`.
MAX_RECORD_CELLS = 1 << 20

#: Cell codes of a block map (token maps are bool: ``False`` masked, ``True`` kept).
EMPTY, PARTIAL, FULL = 0, 1, 2
#: The colours of masked/empty, partial, and kept/full cells, shared by every panel.
COLORS = ("#e8e8e8", "#f28e2b", "#1f4e79")

_SUFFIXES = (".png", ".svg", ".pdf")


# ---------------------------------------------------------------------------------------------
# mask pictures


@dataclass(frozen=True)
class MaskPicture:
    """What :func:`plot` draws: one map per head, token level or block level.

    Attributes:
        cells: ``[heads, rows, cols]``; at token level a bool array (kept = ``True``), at block
            level ``uint8`` codes ``EMPTY`` (0), ``PARTIAL`` (1), ``FULL`` (2), one per
            ``block_size × block_size`` block (the last row/column of blocks may be cut short).
        level: ``"token"`` or ``"block"``.
        block_size: tokens per cell side (1 at token level).
        q_len, kv_len: the sequence lengths; queries are the last ``q_len`` of ``kv_len`` positions.
        heads: the head index of each map.
        label: what was drawn (the mask's expression).
    """

    cells: np.ndarray
    level: str
    block_size: int
    q_len: int
    kv_len: int
    heads: tuple[int, ...]
    label: str

    @property
    def offset(self) -> int:
        """Absolute position of the first query (``kv_len - q_len``)."""
        return self.kv_len - self.q_len

    def codes(self) -> np.ndarray:
        """``uint8 [heads, rows, cols]`` colour codes: token maps become ``EMPTY``/``FULL``."""
        if self.level == "token":
            return self.cells.astype(np.uint8) * FULL
        return self.cells

    def sparsity(self) -> np.ndarray:
        """Percent of the ``q_len × kv_len`` scores skipped, per head: ``float64 [heads]``.

        Token level: masked entries. Block level: entries in empty blocks (what FlexAttention
        skips), each block weighted by its size.
        """
        if self.level == "token":
            return 100.0 * (1.0 - self.cells.reshape(len(self.heads), -1).mean(-1))
        bs = self.block_size
        rows = np.minimum(bs, self.q_len - bs * np.arange(self.cells.shape[1]))
        cols = np.minimum(bs, self.kv_len - bs * np.arange(self.cells.shape[2]))
        area = rows[:, None] * cols[None, :]
        computed = ((self.cells != EMPTY) * area).reshape(len(self.heads), -1).sum(-1)
        return 100.0 * (1.0 - computed / (self.q_len * self.kv_len))


def mask_picture(
    mask: Mask | torch.Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    heads: int | Sequence[int] | None = None,
    batch_index: int = 0,
    level: Level = "auto",
    block_size: int | None = None,
    max_cells: int = MAX_CELLS,
) -> MaskPicture:
    """The per-head maps :func:`plot` draws (see :func:`plot` for the arguments).

    Example:
        >>> import flexmask as fm
        >>> from flexmask.plot import mask_picture
        >>> pic = mask_picture(fm.causal(), 1 << 20, 1 << 20)   # never dense
        >>> pic.level, pic.cells.shape, pic.block_size
        ('block', (1, 256, 256), 4096)
    """
    if level not in ("auto", "token", "block"):
        raise ValueError(f"level must be 'auto', 'token' or 'block', got {level!r}")
    max_cells = _positive("max_cells", max_cells)
    if block_size is not None:
        block_size = _positive("block_size", block_size)
    if isinstance(batch_index, bool) or not isinstance(batch_index, int) or batch_index < 0:
        raise ValueError(f"batch_index must be an int >= 0, got {batch_index!r}")
    if isinstance(mask, Mask):
        return _mask_picture(mask, q_len, kv_len, heads, batch_index, level, block_size, max_cells)
    if isinstance(mask, torch.Tensor):
        return _tensor_picture(mask, q_len, kv_len, heads, batch_index, level, block_size, max_cells)
    raise TypeError(f"expected a flexmask mask or a bool tensor, got {type(mask).__name__}")


def mask_image(
    mask: Mask | torch.Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    heads: int | Sequence[int] | None = None,
    batch_index: int = 0,
    level: Level = "auto",
    block_size: int | None = None,
    max_cells: int = MAX_CELLS,
) -> np.ndarray:
    """The array :func:`plot` draws: ``[heads, rows, cols]``.

    At token level it is a bool array equal to ``mask.to_dense(q_len, kv_len, heads=H)[batch_index]``;
    at block level ``uint8`` codes ``EMPTY``/``PARTIAL``/``FULL`` per block.

    Example:
        >>> import flexmask as fm
        >>> from flexmask.plot import mask_image
        >>> mask_image(fm.causal(), 3, 3)[0].astype(int).tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return mask_picture(
        mask, q_len, kv_len, heads=heads, batch_index=batch_index, level=level,
        block_size=block_size, max_cells=max_cells,
    ).cells


def _mask_picture(mask, q_len, kv_len, heads, batch_index, level, block_size, max_cells) -> MaskPicture:
    if q_len is None:
        raise ValueError("plotting a mask needs q_len (and kv_len, which defaults to q_len)")
    kv_len = q_len if kv_len is None else kv_len
    own_batch, own_heads = mask._dims()
    batch = own_batch or 1
    if own_batch is not None and own_batch > 1 and batch_index >= own_batch:
        raise ValueError(f"batch_index={batch_index} is out of range: the mask has batch {own_batch}")
    row = batch_index if batch > 1 else 0
    n_heads, head_ids = _heads(heads, own_heads)
    layout = mask._layout(q_len, kv_len, None, n_heads, None)  # checks lengths and the mask's tensors
    planes = layout.batch * layout.heads
    token = _token_level(level, planes * q_len * kv_len, max_cells, "batch · heads · q_len · kv_len")
    if token:
        with torch.no_grad():
            dense = mask.to_dense(q_len, kv_len, heads=n_heads)  # [B, H, Q, KV]
        cells = dense[row, list(head_ids)].cpu().numpy()
        return MaskPicture(cells, "token", 1, q_len, kv_len, head_ids, repr(mask))
    bs = _block_size(block_size, q_len, kv_len, planes, max_cells)
    if layout.device.type != "cuda" and _has_custom(mask) and planes * q_len * kv_len > MAX_CUSTOM_PAIRS:
        raise ValueError(
            f"{mask!r} holds a custom mask function (fm.mask), which is evaluated at every "
            f"(query, key) pair to find its blocks on CPU; {planes * q_len * kv_len:,} pairs is more than "
            f"the {MAX_CUSTOM_PAIRS:,} flexmask.plot allows. Plot shorter lengths"
        )
    with torch.no_grad():
        bm = mask.block_mask(q_len, kv_len, heads=n_heads, block_size=bs)
        any_, all_ = states_from_block_mask(bm)  # [B|1, H|1, num_q_blocks, num_kv_blocks]
    any_ = any_[min(row, any_.shape[0] - 1)]
    all_ = all_[min(row, all_.shape[0] - 1)]
    pick = [h if any_.shape[0] > 1 else 0 for h in head_ids]
    cells = (any_[pick].to(torch.uint8) + all_[pick].to(torch.uint8)).cpu().numpy()
    return MaskPicture(cells, "block", bs, q_len, kv_len, head_ids, repr(mask))


def _tensor_picture(t, q_len, kv_len, heads, batch_index, level, block_size, max_cells) -> MaskPicture:
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
    n_heads, head_ids = _heads(heads, t.shape[0])
    if n_heads > t.shape[0] or max(head_ids) >= t.shape[0]:
        raise ValueError(f"heads={heads!r} asks for more heads than the mask tensor has ({t.shape[0]})")
    q_len, kv_len = t.shape[1], t.shape[2]
    label = f"bool tensor {tuple(t.shape)}"
    if _token_level(level, len(head_ids) * q_len * kv_len, max_cells, "heads · q_len · kv_len"):
        cells = t[list(head_ids)].cpu().numpy()
        return MaskPicture(cells, "token", 1, q_len, kv_len, head_ids, label)
    bs = _block_size(block_size, q_len, kv_len, len(head_ids), max_cells)
    cells = np.stack([_pool(t[h], bs) for h in head_ids])
    return MaskPicture(cells, "block", bs, q_len, kv_len, head_ids, label)


def _pool(t: torch.Tensor, bs: int) -> np.ndarray:
    """Block codes of one bool map ``[Q, KV]``, a slab of query blocks at a time (bounded memory)."""
    q_len, kv_len = t.shape
    nq, nk = -(-q_len // bs), -(-kv_len // bs)
    out = np.empty((nq, nk), dtype=np.uint8)
    step = max(1, (1 << 24) // (nk * bs * bs))
    for first in range(0, nq, step):
        last = min(nq, first + step)
        slab = t[first * bs : last * bs]
        pad = (0, nk * bs - kv_len, 0, (last - first) * bs - slab.shape[0])
        shape = (last - first, bs, nk, bs)
        any_ = torch.nn.functional.pad(slab, pad, value=False).view(shape).any(3).any(1)
        all_ = torch.nn.functional.pad(slab, pad, value=True).view(shape).all(3).all(1)
        out[first:last] = (any_.to(torch.uint8) + all_.to(torch.uint8)).cpu().numpy()
    return out


def _heads(heads, own: int | None) -> tuple[int, tuple[int, ...]]:
    """(number of heads to lay the mask out for, indices of the heads to show)."""
    if heads is None:
        n = own or 1
        return n, tuple(range(n))
    if isinstance(heads, int) and not isinstance(heads, bool):
        n = _positive("heads", heads)
        return n, tuple(range(n))
    ids = tuple(heads)
    if not ids or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in ids):
        raise ValueError(f"heads must be an int or a non-empty sequence of head indices >= 0, got {heads!r}")
    return (own or max(ids) + 1), ids


def _token_level(level: str, cells: int, max_cells: int, what: str) -> bool:
    if level == "token" and cells > max_cells:
        raise ValueError(
            f"a token-level picture needs {what} = {cells:,} cells, more than max_cells={max_cells:,}; "
            "use level='block' or 'auto', or raise max_cells"
        )
    return level == "token" or (level == "auto" and cells <= max_cells)


def _block_size(block_size: int | None, q_len: int, kv_len: int, planes: int, max_cells: int) -> int:
    def cells(bs: int) -> int:
        return planes * -(-q_len // bs) * -(-kv_len // bs)

    if block_size is not None:
        if cells(block_size) > max_cells:
            raise ValueError(
                f"block_size={block_size} gives {cells(block_size):,} cells, more than max_cells={max_cells:,}; "
                "use a larger block_size"
            )
        return block_size
    bs = 128  # FlexAttention's block, when the map is small enough to show it
    while cells(bs) > max_cells or max(-(-q_len // bs), -(-kv_len // bs)) > MAX_BLOCKS_PER_SIDE:
        bs *= 2
    return bs


def _has_custom(mask: Mask) -> bool:
    return isinstance(mask, Custom) or any(_has_custom(child) for child in mask._children())


# ---------------------------------------------------------------------------------------------
# drawing


def plot(
    mask: Mask | torch.Tensor,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    heads: int | Sequence[int] | None = None,
    batch_index: int = 0,
    level: Level = "auto",
    block_size: int | None = None,
    max_cells: int = MAX_CELLS,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw a mask: one panel per head in a grid, query positions down, key positions across.

    Small masks are drawn token by token (kept / masked); when ``batch · heads · q_len · kv_len``
    exceeds ``max_cells``, as a map of the mask's ``BlockMask`` blocks (empty / partial / full),
    built from its structure, so memory stays below ``max_cells`` cells however large the lengths.
    Each panel's title gives its sparsity (percent of scores masked, or skipped by empty blocks).

    Args:
        mask: a flexmask mask, or a bool tensor ``[Q, KV]``, ``[H, Q, KV]`` or ``[B, H, Q, KV]``
            (True = kept); a tensor larger than ``max_cells`` is pooled into blocks.
        q_len: query length to draw a mask at; queries are the last ``q_len`` of the ``kv_len``
            positions. Taken from a tensor's shape.
        kv_len: key length (defaults to ``q_len``).
        heads: number of heads (panels ``0 .. heads-1``) or a sequence of head indices; default:
            the mask's own heads, else one.
        batch_index: which batch row to draw, for masks holding per-row tensors.
        level: ``"token"``, ``"block"``, or ``"auto"`` (token level when it fits ``max_cells``).
        block_size: block side at block level; default 128, doubled until the map fits
            ``max_cells`` and at most 256 blocks a side.
        max_cells: cap on the cells of the picture (and of the dense mask at token level).
        ax: draw into this axes (one head only) instead of a new figure.
        title: figure title; default: the mask's expression and lengths.

    Returns:
        The ``matplotlib.figure.Figure`` (``fig.savefig("mask.png")``; ``.svg``/``.pdf`` too).

    Example:
        >>> import flexmask as fm
        >>> from flexmask.plot import plot
        >>> fig = plot(fm.causal() & fm.sliding_window(8), 32, 32, heads=2)
        >>> len([a for a in fig.axes if a.has_data()])
        2
    """
    pic = mask_picture(
        mask, q_len, kv_len, heads=heads, batch_index=batch_index, level=level,
        block_size=block_size, max_cells=max_cells,
    )
    return draw_picture(pic, ax=ax, title=title)


def draw_picture(pic: MaskPicture, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Draw a :class:`MaskPicture` (from :func:`mask_picture`) as :func:`plot` does.

    Example:
        >>> import flexmask as fm
        >>> from flexmask.plot import draw_picture, mask_picture
        >>> fig = draw_picture(mask_picture(fm.chunked(4), 16, 16))
    """
    n = len(pic.heads)
    if title is None:
        title = f"{pic.label}\nq_len={pic.q_len}, kv_len={pic.kv_len}"
        if pic.level == "block":
            title += f", {pic.block_size}×{pic.block_size} blocks"
    if ax is not None:
        if n != 1:
            raise ValueError(f"ax= draws one head, but {n} heads were asked for; leave ax out for a grid")
        _draw_panel(ax, pic, 0, f"{title}\n{_panel_title(pic, 0)}")
        return ax.figure
    ncols = _columns(n)
    nrows = -(-n // ncols)
    panel_w = min(3.2, 14.0 / ncols)
    panel_h = panel_w * _aspect_ratio(pic.q_len, pic.kv_len)
    fig = _figure((panel_w * ncols + 0.6, panel_h * nrows + 1.3))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, a in enumerate(axes.flat):
        if i < n:
            _draw_panel(a, pic, i, _panel_title(pic, i), xlabel=i >= n - ncols, ylabel=i % ncols == 0)
        else:
            a.set_axis_off()
    fig.suptitle(title, fontsize=10)
    _legend(fig, {pic.level})
    return fig


def _columns(n: int) -> int:
    return n if n <= 3 else min(8, math.ceil(math.sqrt(n)))


def _panel_title(pic: MaskPicture, i: int) -> str:
    what = "sparsity" if pic.level == "token" else "block sparsity"
    return f"head {pic.heads[i]} · {what} {pic.sparsity()[i]:.1f}%"


def _draw_panel(ax: Axes, pic: MaskPicture, i: int, title: str, *, xlabel: bool = True, ylabel: bool = True) -> None:
    codes = pic.codes()[i]
    rows, cols = codes.shape
    bs, off = pic.block_size, pic.offset
    big = max(rows, cols) > 512
    ax.imshow(
        codes,
        cmap=_cmap(),
        norm=_norm(),
        extent=(0, cols * bs, off + rows * bs, off),
        interpolation="antialiased" if big else "nearest",
        interpolation_stage="rgba",
        aspect="auto",
    )
    ax.set_xlim(0, pic.kv_len)
    ax.set_ylim(off + pic.q_len, off)
    ax.xaxis.set_major_locator(_ticks(pic.kv_len))
    ax.yaxis.set_major_locator(_ticks(pic.q_len))
    ax.tick_params(labelsize=7)
    if xlabel:
        ax.set_xlabel("key position", fontsize=8)
    if ylabel:
        ax.set_ylabel("query position", fontsize=8)
    ax.set_title(title, fontsize=8)


def _ticks(length: int):
    """Ticks every power of two that gives about five of them (0, 16, 32, ... for 64)."""
    from matplotlib.ticker import MultipleLocator

    return MultipleLocator(2 ** max(0, math.ceil(math.log2(length / 5))))


def _aspect_ratio(q_len: int, kv_len: int) -> float:
    return min(1.0, max(0.3, q_len / kv_len))


def _cmap():
    from matplotlib.colors import ListedColormap

    return ListedColormap(list(COLORS), name="flexmask")


def _norm():
    from matplotlib.colors import BoundaryNorm

    return BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3)


def _legend(fig: Figure, levels: set[str]) -> None:
    from matplotlib.patches import Patch

    if levels == {"token"}:
        names = ("masked", None, "kept")
    elif levels == {"block"}:
        names = ("empty block", "partial block", "full block")
    else:
        names = ("masked / empty block", "partial block", "kept / full block")
    handles = [Patch(facecolor=c, edgecolor="#999999", label=nm) for c, nm in zip(COLORS, names, strict=True) if nm]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=8)


def _figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------------------------
# attention probabilities


def attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: Mask | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    max_cells: int = MAX_ATTENTION_CELLS,
) -> torch.Tensor:
    """The attention probabilities :func:`flexmask.attention` uses, as a dense tensor.

    Scores are lowered exactly as :func:`flexmask.attention` lowers them (the same ``score_mod``
    for ``bias``/``softcap`` and the same ``mask_mod``), so ``attention_map(q, k, ...) @ v``
    equals ``fm.attention(q, k, v, ...)`` (with ``v`` repeated over query-head groups for GQA).

    Args:
        q: ``[B, Hq, Q, D]``.
        k: ``[B, Hkv, KV, D]`` (``Hq`` a multiple of ``Hkv``).
        mask: as for :func:`flexmask.attention`.
        bias: as for :func:`flexmask.attention`.
        scale: as for :func:`flexmask.attention`.
        softcap: as for :func:`flexmask.attention`.
        max_cells: cap on ``B · Hq · Q · KV``; this is a dense tool for small inputs.

    Returns:
        ``[B, Hq, Q, KV]`` probabilities in float32 (float64 for float64 inputs); rows whose keys
        are all masked are zeros.

    Example:
        >>> import torch, flexmask as fm
        >>> from flexmask.plot import attention_map
        >>> q = k = torch.randn(1, 2, 8, 16)
        >>> p = attention_map(q, k, mask=fm.causal(), bias=fm.alibi(2))
        >>> p.shape, bool(torch.allclose(p.sum(-1), torch.ones(1, 2, 8)))
        (torch.Size([1, 2, 8, 8]), True)
    """
    return _attention_probs(q, k, mask, bias, scale, softcap, max_cells)[0]


def _attention_probs(q, k, mask, bias, scale, softcap, max_cells) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, kept) — both ``[B, Hq, Q, KV]``."""
    layout = _check_inputs(q, k, k)
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(f"mask must be a flexmask mask (e.g. fm.causal()), got {type(mask).__name__}")
    if bias is not None and not isinstance(bias, Bias):
        raise TypeError(f"bias must be a flexmask bias (e.g. fm.alibi(heads)), got {type(bias).__name__}")
    cells = layout.batch * layout.heads * layout.q_len * layout.kv_len
    if cells > max_cells:
        raise ValueError(
            f"attention_map is dense: batch · heads · q_len · kv_len = {cells:,} is more than "
            f"max_cells={max_cells:,}; pass fewer positions or heads (or raise max_cells)"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf
    ):
        raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
    if mask is not None:
        mask._check(layout)
    if bias is not None:
        bias._check(layout)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    # the index grids and the call-local score_mod / mask_mod of the reference backend
    b = torch.arange(layout.batch, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(layout.heads, device=dev).view(1, -1, 1, 1)
    qi = torch.arange(layout.q_len, device=dev).view(1, 1, -1, 1)
    kv = torch.arange(layout.kv_len, device=dev).view(1, 1, 1, -1)
    with torch.no_grad():
        qc = rearrange(q.to(compute), "b (hk g) q d -> b hk g q d", hk=k.shape[1])
        s = torch.einsum("bkgqd,bknd->bkgqn", qc, k.to(compute)) * float(scale)
        s = rearrange(s, "b hk g q n -> b (hk g) q n")
        score_mod = lower_score(bias, softcap, layout)
        if score_mod is not None:
            s = score_mod(s, b, h, qi, kv).to(compute)
        if mask is None:
            keep = torch.ones(s.shape, dtype=torch.bool, device=dev)
        else:
            mask_mod = shift_queries(mask._mask_mod(layout), layout.offset, layout.device)
            keep = torch.as_tensor(mask_mod(b, h, qi, kv), device=dev).expand(s.shape)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        p = torch.where(keep.any(-1, keepdim=True), p, torch.zeros((), dtype=compute, device=dev))
    return p, keep


def plot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: Mask | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    heads: int | Sequence[int] | None = None,
    batch_index: int = 0,
    max_cells: int = MAX_ATTENTION_CELLS,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Heatmaps of the attention probabilities of ``q``, ``k``: one panel per query head.

    All panels share one colour scale (0 to the largest probability shown); masked entries are
    grey. See :func:`attention_map` for the arguments it shares.

    Args:
        heads: number of heads (``0 .. heads-1``) or head indices to show; default all.
        batch_index: the batch row to show.
        ax: draw into this axes (one head only).
        title: figure title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Example:
        >>> import torch, flexmask as fm
        >>> from flexmask.plot import plot_attention
        >>> q = k = torch.randn(1, 4, 32, 16)
        >>> fig = plot_attention(q, k, mask=fm.causal(), bias=fm.alibi(4))
    """
    p, keep = _attention_probs(q, k, mask, bias, scale, softcap, max_cells)
    if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not 0 <= batch_index < p.shape[0]:
        raise ValueError(f"batch_index must be in [0, {p.shape[0]}), got {batch_index!r}")
    _, head_ids = _heads(heads, p.shape[1])
    if max(head_ids) >= p.shape[1] or len(head_ids) > p.shape[1]:
        raise ValueError(f"heads={heads!r} asks for more heads than q has ({p.shape[1]})")
    probs = p[batch_index, list(head_ids)].float().cpu().numpy()
    kept = keep[batch_index, list(head_ids)].cpu().numpy()
    q_len, kv_len = probs.shape[1], probs.shape[2]
    off = kv_len - q_len
    if title is None:
        title = f"attention probabilities, mask: {mask!r}" + ("" if bias is None else f", bias: {bias!r}")
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=COLORS[EMPTY])
    vmax = float(probs.max()) or 1.0
    n = len(head_ids)
    if ax is not None:
        if n != 1:
            raise ValueError(f"ax= draws one head, but {n} heads were asked for; leave ax out for a grid")
        fig, axes = ax.figure, np.array([[ax]])
        ncols = 1
    else:
        ncols = _columns(n)
        nrows = -(-n // ncols)
        panel_w = min(3.2, 14.0 / ncols)
        fig = _figure((panel_w * ncols + 1.2, panel_w * _aspect_ratio(q_len, kv_len) * nrows + 1.0))
        axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for i, a in enumerate(axes.flat):
        if i >= n:
            a.set_axis_off()
            continue
        data = np.ma.masked_array(probs[i], mask=~kept[i])
        image = a.imshow(
            data, cmap=cmap, vmin=0.0, vmax=vmax, extent=(0, kv_len, off + q_len, off),
            interpolation="nearest" if max(q_len, kv_len) <= 512 else "antialiased", aspect="auto",
        )
        a.set_title(f"head {head_ids[i]}", fontsize=8)
        a.xaxis.set_major_locator(_ticks(kv_len))
        a.yaxis.set_major_locator(_ticks(q_len))
        a.tick_params(labelsize=7)
        if i >= n - ncols:
            a.set_xlabel("key position", fontsize=8)
        if i % ncols == 0:
            a.set_ylabel("query position", fontsize=8)
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="probability")
    if ax is None:
        fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# learned masks


@dataclass
class RecordedCall:
    """One :func:`flexmask.attention` call seen by :func:`record_masks`.

    Attributes:
        mask: the mask it was given (``None``: no mask).
        layout: its shapes (batch, query heads, q_len, kv_len, device).
        picture: what the mask kept for ``batch_index``, per head, taken at call time: token level
            when it fits the recorder's ``max_cells``, else a block map.
    """

    mask: Mask | None
    layout: Layout
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


@contextlib.contextmanager
def record_masks(
    *, batch_index: int = 0, level: Level = "auto", max_cells: int = MAX_RECORD_CELLS
) -> Iterator[MaskRecording]:
    """Record the mask of every :func:`flexmask.attention` call made inside the ``with`` block.

    Run a model forward once inside it to see what each flexmask (or Dynamic Mask Attention)
    layer kept, per head; draw it with :func:`plot_layers`. Each call's picture is taken when the
    call is made, at token level when ``batch · heads · q_len · kv_len <= max_cells``, else as a
    block map of at most ``max_cells`` cells. Run the model eagerly (not under ``torch.compile``).

    Yields:
        A :class:`MaskRecording`, filled as calls happen.

    Example:
        >>> import torch, flexmask as fm
        >>> from flexmask.plot import plot_layers, record_masks
        >>> x = torch.randn(1, 2, 16, 8)
        >>> with record_masks() as rec:
        ...     y = fm.attention(x, x, x, mask=fm.causal())
        ...     y = fm.attention(y, y, y, mask=fm.sliding_window(4))
        >>> len(rec), rec[1].dense.shape
        (2, torch.Size([2, 16, 16]))
        >>> fig = plot_layers(rec)
    """
    recording = MaskRecording()

    def observe(mask: Mask | None, layout: Layout) -> None:
        m = full() if mask is None else mask
        picture = mask_picture(
            m, layout.q_len, layout.kv_len, heads=layout.heads, batch_index=batch_index,
            level=level, max_cells=max_cells,
        )
        if mask is None:
            picture = MaskPicture(picture.cells, picture.level, picture.block_size, picture.q_len,
                                  picture.kv_len, picture.heads, "no mask")
        recording.calls.append(RecordedCall(mask, layout, picture))

    observers.append(observe)
    try:
        yield recording
    finally:
        observers.remove(observe)


def plot_layers(
    recording: MaskRecording | Sequence[RecordedCall],
    *,
    layers: Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """A layers × heads grid of recorded masks (rows: calls in order, columns: heads).

    Args:
        recording: from :func:`record_masks`.
        layers: indices of the calls to show; default all.
        heads: number of heads or head indices to show; default all recorded heads.
        title: figure title.

    Returns:
        The ``matplotlib.figure.Figure``; each panel is titled with its sparsity.

    Example:
        >>> import torch, flexmask as fm
        >>> from flexmask.plot import plot_layers, record_masks
        >>> x = torch.randn(1, 2, 16, 8)
        >>> with record_masks() as rec:
        ...     _ = fm.attention(x, x, x, mask=fm.causal())
        >>> fig = plot_layers(rec, heads=[1])
    """
    calls = list(recording)
    if not calls:
        raise ValueError("the recording is empty: no flexmask.attention call ran inside record_masks()")
    idx = list(range(len(calls))) if layers is None else list(layers)
    if not idx or any(not 0 <= i < len(calls) for i in idx):
        raise ValueError(f"layers must be indices in [0, {len(calls)}), got {layers!r}")
    rows = [(i, calls[i].picture) for i in idx]
    if heads is None:
        cols = sorted({h for _, pic in rows for h in pic.heads})
    else:
        cols = list(_heads(heads, None)[1])
    ratio = max(_aspect_ratio(pic.q_len, pic.kv_len) for _, pic in rows)
    panel = min(1.8, 14.0 / len(cols))
    fig = _figure((panel * len(cols) + 0.8, panel * ratio * len(rows) + 1.2))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    levels: set[str] = set()
    for r, (i, pic) in enumerate(rows):
        sparsity = pic.sparsity()
        for c, h in enumerate(cols):
            a = axes[r, c]
            if h not in pic.heads:
                a.set_axis_off()
                continue
            j = pic.heads.index(h)
            levels.add(pic.level)
            _draw_panel(a, pic, j, f"layer {i} · head {h} · {sparsity[j]:.0f}%", xlabel=False, ylabel=False)
            a.title.set_fontsize(7)
            if c == 0:
                a.set_ylabel(f"layer {i}\nquery", fontsize=7)
            else:
                a.set_yticklabels([])
            if r == len(rows) - 1:
                a.set_xlabel("key", fontsize=7)
            else:
                a.set_xticklabels([])
    fig.suptitle(title or f"masks of {len(rows)} attention calls (sparsity: % of scores skipped)", fontsize=10)
    _legend(fig, levels)
    return fig


# ---------------------------------------------------------------------------------------------
# command line and demo


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise _UsageError(message)


def eval_expression(expr: str) -> Mask | torch.Tensor:
    """Evaluate a mask expression over flexmask's public names (bare and as ``fm``) and ``torch``.

    Python builtins are not available (``open``, ``__import__``, ... are undefined). This keeps
    typos and stray code out; it is not a sandbox against hostile input.

    Example:
        >>> from flexmask.plot import eval_expression
        >>> eval_expression("causal() & fm.sliding_window(64)")
        causal() & sliding_window(64)
    """
    import flexmask

    names = {name: getattr(flexmask, name) for name in getattr(flexmask, "__all__", ()) if hasattr(flexmask, name)}
    names.update(fm=flexmask, torch=torch)
    code = compile(expr, "<expr>", "eval")
    return eval(code, {"__builtins__": {}, **names})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flexmask plot EXPR --q-len N [--kv-len N] [--heads H] [--out FILE]``.

    Draws EXPR (see :func:`eval_expression`), a mask or a bool tensor, with :func:`plot` and
    saves it; the format follows ``--out``'s extension (``.png``, ``.svg``, ``.pdf``; default
    ``mask.png``). Errors are one line on stderr and exit status 2.

    Example:
        >>> import os, tempfile
        >>> from flexmask.plot import main
        >>> out = os.path.join(tempfile.mkdtemp(), "window.svg")
        >>> main(["causal() & sliding_window(16)", "--q-len", "64", "--out", out])  # doctest: +ELLIPSIS
        wrote .../window.svg
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(
        prog="flexmask plot",
        description="Draw a flexmask mask expression, one panel per head.",
        epilog='example: flexmask plot "fm.causal() & fm.sliding_window(64)" --q-len 256 --out window.png',
    )
    parser.add_argument("expr", help="mask expression over flexmask's names (fm.causal(), ...) and torch")
    parser.add_argument("--q-len", type=int, help="number of queries (required for a mask)")
    parser.add_argument("--kv-len", type=int, help="number of keys (default: --q-len)")
    parser.add_argument("--heads", type=int, help="number of heads to draw (default: the mask's own, else 1)")
    parser.add_argument("--batch-index", type=int, default=0, help="batch row to draw (default 0)")
    parser.add_argument("--level", choices=("auto", "token", "block"), default="auto")
    parser.add_argument("--block-size", type=int, help="block side at block level")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--out", default="mask.png", help="output file: .png, .svg or .pdf (default mask.png)")
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        return _fail(str(e))
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    out = Path(args.out)
    if out.suffix.lower() not in _SUFFIXES:
        return _fail(f"--out must end in .png, .svg or .pdf, got {args.out!r}")
    try:
        obj = eval_expression(args.expr)
    except Exception as e:
        return _fail(f"bad expression {args.expr!r}: {type(e).__name__}: {e}")
    if not isinstance(obj, (Mask, torch.Tensor)):
        return _fail(f"{args.expr!r} gives {type(obj).__name__}, not a flexmask mask or a bool tensor")
    if isinstance(obj, Mask) and args.q_len is None:
        return _fail("give --q-len N (and optionally --kv-len N) to draw a mask")
    try:
        fig = plot(
            obj, args.q_len, args.kv_len, heads=args.heads, batch_index=args.batch_index,
            level=args.level, block_size=args.block_size, title=args.title,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=args.dpi)
    except Exception as e:
        return _fail(f"{type(e).__name__}: {e}")
    print(f"wrote {out}")
    return 0


def _fail(message: str) -> int:
    print("flexmask plot: error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def save_demo_images(examples: dict[str, Mask], n: int, out_dir: str | Path) -> list[Path]:
    """Draw each named mask at ``n × n`` into ``out_dir/<name>.png``; returns the paths written.

    Example:
        >>> import flexmask as fm
        >>> import tempfile
        >>> from flexmask.plot import save_demo_images
        >>> [p.name for p in save_demo_images({"causal & window": fm.causal()}, 64, tempfile.mkdtemp())]
        ['causal_window.png']
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, m in examples.items():
        stem = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "mask"
        path = out / f"{stem}.png"
        k = 2
        while path in paths:
            path, k = out / f"{stem}_{k}.png", k + 1
        plot(m, n, n, title=name).savefig(path, dpi=120)
        paths.append(path)
    return paths
