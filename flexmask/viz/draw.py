"""Drawing mask pictures with matplotlib: one mask per head (:func:`plot`, :func:`draw_picture`)
and a recording as a layers × heads grid (:func:`plot_layers`).

Figures are plain ``matplotlib.figure.Figure`` objects with an Agg canvas, not registered with
``pyplot``: save them with ``fig.savefig(path)`` (``.png``, ``.svg``, ``.pdf``); notebooks display
them. To draw one head into axes of your own, pass ``ax=``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..lowering.layout import cdiv
from . import _core, _mpl
from .levels import mask_picture
from .pictures import MAX_CELLS, MAX_PAIRS, SPARSITY_CAPTION, Level, MaskPicture, format_sparsity, head_ids

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .record import MaskRecording, RecordedCall


def plot(
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
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw a mask: one panel per head in a grid, query positions down, key positions across.

    Small masks are drawn token by token (kept / masked). Larger ones (``heads · q_len · kv_len``
    over ``max_cells``) are drawn in cells of ``cell_size × cell_size`` tokens: content masks
    (``fm.topk``, ``fm.topk_blocks``: DMA), custom functions and tensors *pooled*, each cell
    coloured by the share of its pairs kept; structured masks as the map of their ``BlockMask``
    (empty / partial / full blocks), built from the structure, never dense. Each panel's title gives
    the head's **sparsity**: the percent of (query, key) scores masked, counted token by token (for
    a block map too; a range when its partial blocks exceed ``max_pairs`` and were not evaluated).

    Args:
        mask: a flexmask mask, or a bool tensor ``[Q, KV]``, ``[H, Q, KV]`` or ``[B, H, Q, KV]``
            (True = kept).
        q_len: query length to draw a mask at; queries are the last ``q_len`` of the ``kv_len``
            positions. Taken from a tensor's shape.
        kv_len: key length (defaults to ``q_len``).
        heads: number of heads (panels ``0 .. heads-1``) or a sequence of head indices; default:
            the mask's own heads, else one.
        batch_index: which batch row to draw, for masks holding per-row tensors.
        level: ``"token"``, ``"pooled"``, ``"block"``, or ``"auto"`` (see :func:`mask_picture`).
        cell_size: tokens per cell side when pooled or in blocks; default the smallest power of two
            (at least 128 for blocks) giving at most 256 cells a side and ``max_cells`` cells.
        max_cells: cap on the cells of the picture.
        max_pairs: cap on the (query, key) pairs the mask function is evaluated at.
        ax: draw into this axes (one head only) instead of a new figure.
        title: figure title; default: the mask's expression, lengths and the sparsity definition.

    Returns:
        The ``matplotlib.figure.Figure`` (``fig.savefig("mask.png")``; ``.svg``/``.pdf`` too).

    Examples:
        >>> import flexmask as fm
        >>> from flexmask.viz import plot
        >>> fig = plot(fm.causal() & fm.sliding_window(16), 64, 64, heads=2)
        >>> [a.get_title() for a in fig.axes if a.images]
        ['head 0 · sparsity 77.9%', 'head 1 · sparsity 77.9%']
    """
    _mpl.require("flexmask.viz.plot")
    pic = mask_picture(
        mask,
        q_len,
        kv_len,
        heads=heads,
        batch_index=batch_index,
        level=level,
        cell_size=cell_size,
        max_cells=max_cells,
        max_pairs=max_pairs,
    )
    return draw_picture(pic, ax=ax, title=title)


def draw_picture(pic: MaskPicture, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Draw a :class:`MaskPicture` (from :func:`mask_picture`) as :func:`plot` does.

    Examples:
        >>> import flexmask as fm
        >>> from flexmask.viz import draw_picture, mask_picture
        >>> fig = draw_picture(mask_picture(fm.chunked(4), 16, 16))
        >>> fig.get_suptitle().splitlines()[-1]
        'sparsity: % of (query, key) scores masked'
    """
    _mpl.require("flexmask.viz.draw_picture")
    n = len(pic.heads)
    if title is None:
        title = f"{pic.label}\nq_len={pic.q_len}, kv_len={pic.kv_len}\n{_caption([pic])}"
    if ax is not None:
        if n != 1:
            raise ValueError(f"ax= draws one head, but {n} heads were asked for; leave ax out for a grid")
        _draw_panel(ax, pic, 0, f"{title}\n{_panel_title(pic, 0)}")
        return ax.figure
    ncols = _mpl.columns(n)
    nrows = cdiv(n, ncols)
    panel_w = min(3.2, 14.0 / ncols)
    panel_h = panel_w * _mpl.aspect_ratio(pic.q_len, pic.kv_len)
    fig = _mpl.figure((panel_w * ncols + 0.6 + (0.9 if pic.level == "pooled" else 0), panel_h * nrows + 1.5))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, a in enumerate(axes.flat):
        if i < n:
            _draw_panel(a, pic, i, _panel_title(pic, i), xlabel=i >= n - ncols, ylabel=i % ncols == 0)
        else:
            a.set_axis_off()
    fig.suptitle(title, fontsize=10)
    _mpl.legend(fig, {pic.level}, list(axes.flat))
    return fig


def plot_layers(
    recording: MaskRecording | Sequence[RecordedCall],
    *,
    layers: Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """A layers × heads grid of recorded masks (rows: calls in order, columns: heads).

    Each panel is titled with its head's sparsity (percent of (query, key) scores masked, token
    level); the figure's caption states that definition and how cells were drawn.

    Args:
        recording: from :func:`record_masks`.
        layers: indices of the calls to show; default all.
        heads: number of heads or head indices to show; default all recorded heads.
        title: figure title (the caption line is added below it).

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> import torch, flexmask as fm
        >>> from flexmask.viz import plot_layers, record_masks
        >>> x = torch.randn(1, 2, 16, 8)
        >>> with record_masks() as rec:
        ...     _ = fm.attention(x, x, x, mask=fm.causal())
        >>> [a.get_title() for a in plot_layers(rec, heads=[1]).axes if a.images]
        ['layer 0 · head 1 · 46.9%']
    """
    _mpl.require("flexmask.viz.plot_layers")
    calls = list(recording)
    if not calls:
        raise ValueError("the recording is empty: no flexmask.attention call ran inside record_masks()")
    idx = list(range(len(calls))) if layers is None else list(layers)
    if not idx or any(not 0 <= i < len(calls) for i in idx):
        raise ValueError(f"layers must be indices in [0, {len(calls)}), got {layers!r}")
    rows = [(i, calls[i].picture) for i in idx]
    cols = sorted({h for _, pic in rows for h in pic.heads}) if heads is None else list(head_ids(heads, None)[1])
    pics = [pic for _, pic in rows]
    ratio = max(_mpl.aspect_ratio(pic.q_len, pic.kv_len) for pic in pics)
    panel = min(1.8, 14.0 / len(cols))
    pooled = any(pic.level == "pooled" for pic in pics)
    fig = _mpl.figure((panel * len(cols) + 0.8 + (0.9 if pooled else 0), panel * ratio * len(rows) + 1.4))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r, (i, pic) in enumerate(rows):
        bounds = pic.sparsity_bounds()
        for c, h in enumerate(cols):
            a = axes[r, c]
            if h not in pic.heads:
                a.set_axis_off()
                continue
            j = pic.heads.index(h)
            _draw_panel(a, pic, j, f"layer {i} · head {h} · {format_sparsity(*bounds[j])}", xlabel=False, ylabel=False)
            a.title.set_fontsize(7)
            if c == 0:
                a.set_ylabel(f"layer {i}\nquery", fontsize=7)
            else:
                a.set_yticklabels([])
            if r == len(rows) - 1:
                a.set_xlabel("key", fontsize=7)
            else:
                a.set_xticklabels([])
    head = title or f"masks of {len(rows)} attention calls (layers) × heads"
    fig.suptitle(f"{head}\n{_caption(pics)}", fontsize=9)
    _mpl.legend(fig, {pic.level for pic in pics}, list(axes.flat))
    return fig


def _cells_note(pic: MaskPicture) -> str:
    """What one cell of the picture is (empty at token level)."""
    c = pic.cell_size
    if pic.level == "block":
        return f"each cell: a {c}×{c}-token block"
    if pic.level == "pooled":
        return f"each cell: {c}×{c} tokens, coloured by the share kept"
    return ""


def _caption(pics: Sequence[MaskPicture]) -> str:
    """What the cells are, and the one definition of sparsity used by every panel title."""
    notes = list(dict.fromkeys(note for pic in pics if (note := _cells_note(pic))))
    caption = SPARSITY_CAPTION
    if not all(pic.exact for pic in pics):
        caption += "\n(a range where partial blocks were not evaluated)"
    return "\n".join([*notes, caption])


def _panel_title(pic: MaskPicture, i: int) -> str:
    return f"head {pic.heads[i]} · sparsity {format_sparsity(*pic.sparsity_bounds()[i])}"


def _draw_panel(ax: Axes, pic: MaskPicture, i: int, title: str, *, xlabel: bool = True, ylabel: bool = True) -> None:
    if pic.level == "pooled":
        cmap, norm = _mpl.fraction_cmap()
        data = np.ma.masked_equal(pic.cells[i], 0.0)  # nothing kept: the "masked" grey
    else:
        cmap, norm = _mpl.code_cmap()
        data = pic.codes()[i]
    rows, cols = data.shape
    c, off = pic.cell_size, pic.offset
    ax.imshow(
        data,
        cmap=cmap,
        norm=norm,
        extent=(0, cols * c, off + rows * c, off),
        # pooled maps are often drawn with fewer pixels than cells: blend them, so that a one-cell
        # stripe stays visible instead of being dropped by nearest-neighbour sampling
        interpolation="antialiased" if pic.level == "pooled" or max(rows, cols) > 512 else "nearest",
        interpolation_stage="rgba",
        aspect="auto",
    )
    ax.set_xlim(0, pic.kv_len)
    ax.set_ylim(off + pic.q_len, off)
    _mpl.set_ticks(ax, pic.q_len, pic.kv_len)
    ax.tick_params(labelsize=7)
    if xlabel:
        ax.set_xlabel("key position", fontsize=8)
    if ylabel:
        ax.set_ylabel("query position", fontsize=8)
    ax.set_title(title, fontsize=8)
