"""Attention probabilities as a dense tensor (:func:`attention_map`) and as heatmaps (:func:`plot_attention`).

A small dense tool: scores ``q · kᵀ · scale``, then the call-local ``score_mod`` (softcap, bias)
and ``mask_mod`` that :func:`flexmask.attention` lowers the same arguments to, then a softmax.
The probabilities need only torch; drawing needs matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange

from ..lowering.layout import cdiv
from . import _core, _mpl
from .pictures import EMPTY, head_ids

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Most probabilities (``batch · heads · q_len · kv_len``) :func:`attention_map` computes.
MAX_ATTENTION_CELLS = 1 << 24


def attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: _core.Mask | None = None,
    bias: _core.Bias | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    max_cells: int = MAX_ATTENTION_CELLS,
) -> torch.Tensor:
    """The attention probabilities :func:`flexmask.attention` uses, as a dense tensor.

    The mask, bias and softcap are lowered by the core itself (the same ``mask_mod`` and
    ``score_mod`` the kernels run), so ``attention_map(q, k, ...) @ v`` equals
    ``fm.attention(q, k, v, ...)`` (with ``v`` repeated over query-head groups for GQA).

    Args:
        q: ``[B, Hq, Q, D]``; the queries are the last ``Q`` of the ``KV`` positions.
        k: ``[B, Hkv, KV, D]`` (``Hq`` a multiple of ``Hkv``).
        mask: as for :func:`flexmask.attention`.
        bias: as for :func:`flexmask.attention`.
        scale: as for :func:`flexmask.attention` (default ``1 / sqrt(D)``).
        softcap: as for :func:`flexmask.attention`.
        max_cells: cap on ``B · Hq · Q · KV``; this is a dense tool for small inputs.

    Returns:
        ``[B, Hq, Q, KV]`` probabilities in float32 (float64 for float64 inputs); rows whose keys
        are all masked are zeros.

    Examples:
        >>> import torch, flexmask as fm
        >>> from flexmask.viz import attention_map
        >>> q = k = torch.randn(1, 2, 8, 16)
        >>> p = attention_map(q, k, mask=fm.causal(), bias=fm.alibi(2))
        >>> p.shape, bool(torch.allclose(p.sum(-1), torch.ones(1, 2, 8)))
        (torch.Size([1, 2, 8, 8]), True)
    """
    return _probabilities(q, k, mask, bias, scale, softcap, max_cells)[0]


def _probabilities(q, k, mask, bias, scale, softcap, max_cells) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, kept), both ``[B, Hq, Q, KV]``."""
    layout = _core.check_qk(q, k)
    _core.check_expressions(mask, bias)
    cells = layout.batch * layout.heads * layout.q_len * layout.kv_len
    if cells > max_cells:
        raise ValueError(
            f"attention_map is dense: batch · heads · q_len · kv_len = {cells:,} is more than "
            f"max_cells={max_cells:,}; pass fewer positions or heads (or raise max_cells)"
        )
    scale = _core.check_scale(scale, q.shape[-1])
    softcap = _core.check_softcap(softcap)
    mask_mod, score_mod = _core.call_mods(mask, bias, softcap, layout)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    # FlexAttention's index grids, call-local: b [B,1,1,1], h [1,H,1,1], q [1,1,Q,1], kv [1,1,1,KV]
    b = torch.arange(layout.batch, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(layout.heads, device=dev).view(1, -1, 1, 1)
    qi = torch.arange(layout.q_len, device=dev).view(1, 1, -1, 1)
    kv = torch.arange(layout.kv_len, device=dev).view(1, 1, 1, -1)
    with torch.no_grad():
        qc = rearrange(q.to(compute), "b (hk g) q d -> b hk g q d", hk=k.shape[1])
        s = torch.einsum("bkgqd,bknd->bkgqn", qc, k.to(compute)) * scale
        s = rearrange(s, "b hk g q n -> b (hk g) q n")
        if score_mod is not None:
            s = score_mod(s, b, h, qi, kv).to(compute)
        keep = torch.ones((), dtype=torch.bool, device=dev) if mask_mod is None else mask_mod(b, h, qi, kv)
        keep = torch.as_tensor(keep, device=dev).expand(s.shape)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        p = torch.where(keep.any(-1, keepdim=True), p, torch.zeros((), dtype=compute, device=dev))
    return p, keep


def plot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: _core.Mask | None = None,
    bias: _core.Bias | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    heads: int | Sequence[int] | None = None,
    batch_index: int = 0,
    max_cells: int = MAX_ATTENTION_CELLS,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Heatmaps of the attention probabilities of ``q``, ``k`` (``[B, H, Q, D]``): one panel per query head.

    All panels share one colour scale (0 to the largest probability shown); masked entries are
    grey. See :func:`attention_map` for the arguments it shares.

    Args:
        heads: number of heads (``0 .. heads-1``) or head indices to show; default all.
        batch_index: the batch row to show.
        ax: draw into this axes (one head only).
        title: figure title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Examples:
        >>> import torch, flexmask as fm
        >>> from flexmask.viz import plot_attention
        >>> q = k = torch.randn(1, 4, 32, 16)
        >>> fig = plot_attention(q, k, mask=fm.causal(), bias=fm.alibi(4), heads=[0, 3])
        >>> [a.get_title() for a in fig.axes if a.images]
        ['head 0', 'head 3']
    """
    _mpl.require("flexmask.viz.plot_attention")
    p, keep = _probabilities(q, k, mask, bias, scale, softcap, max_cells)
    if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not 0 <= batch_index < p.shape[0]:
        raise ValueError(f"batch_index must be in [0, {p.shape[0]}), got {batch_index!r}")
    _, ids = head_ids(heads, p.shape[1])
    if max(ids) >= p.shape[1] or len(ids) > p.shape[1]:
        raise ValueError(f"heads={heads!r} asks for more heads than q has ({p.shape[1]})")
    probs = p[batch_index, list(ids)].float().cpu().numpy()
    kept = keep[batch_index, list(ids)].cpu().numpy()
    q_len, kv_len = probs.shape[1], probs.shape[2]
    off = kv_len - q_len
    if title is None:
        title = f"attention probabilities, mask: {mask!r}" + ("" if bias is None else f", bias: {bias!r}")
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=_mpl.COLORS[EMPTY])
    vmax = float(probs.max()) or 1.0
    n = len(ids)
    if ax is not None:
        if n != 1:
            raise ValueError(f"ax= draws one head, but {n} heads were asked for; leave ax out for a grid")
        fig, axes, ncols = ax.figure, np.array([[ax]]), 1
    else:
        ncols = _mpl.columns(n)
        panel_w = min(3.2, 14.0 / ncols)
        fig = _mpl.figure((panel_w * ncols + 1.2, panel_w * _mpl.aspect_ratio(q_len, kv_len) * cdiv(n, ncols) + 1.0))
        axes = fig.subplots(cdiv(n, ncols), ncols, squeeze=False)
    image = None
    for i, a in enumerate(axes.flat):
        if i >= n:
            a.set_axis_off()
            continue
        image = a.imshow(
            np.ma.masked_array(probs[i], mask=~kept[i]),
            cmap=cmap,
            vmin=0.0,
            vmax=vmax,
            extent=(0, kv_len, off + q_len, off),
            aspect="auto",
            interpolation="nearest" if max(q_len, kv_len) <= 512 else "antialiased",
        )
        a.set_title(f"head {ids[i]}", fontsize=8)
        _mpl.set_ticks(a, q_len, kv_len)
        a.tick_params(labelsize=7)
        if i >= n - ncols:
            a.set_xlabel("key position", fontsize=8)
        if i % ncols == 0:
            a.set_ylabel("query position", fontsize=8)
    fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label="probability")
    if ax is None:
        fig.suptitle(title, fontsize=10)
    return fig
