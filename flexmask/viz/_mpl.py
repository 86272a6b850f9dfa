"""matplotlib, imported only when something is drawn: the guard, figures, colours, ticks, legends.

matplotlib is an optional dependency (the ``viz`` extra: ``pip install -e '.[viz]'``): picture data
(:mod:`flexmask.viz.levels`, :mod:`flexmask.viz.record`, :func:`flexmask.viz.attention_map`) needs
only numpy and torch; every drawing function calls :func:`require` first.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .pictures import EMPTY

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The colours of masked/empty, partial, and kept/full cells, shared by every panel.
COLORS = ("#e8e8e8", "#f28e2b", "#1f4e79")
#: Pooled cells: the share of pairs kept, from a light blue (a few pairs) to the "kept" colour (all).
FRACTION_COLORS = ("#d6e6f5", "#6b9fd1", COLORS[2])
#: Pooled colour scale: ``share ** FRACTION_GAMMA``, so that one kept key in a 16-token cell (1/16)
#: sits a quarter of the way up the scale instead of near its bottom.
FRACTION_GAMMA = 0.5


def require(what: str) -> None:
    """Raise ``ImportError`` naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{what} draws with matplotlib, which is not installed; install flexmask's `viz` extra "
            "(`pip install -e '.[viz]'` in a flexmask checkout) or `pip install matplotlib`. Picture data "
            "(mask_picture, mask_image, attention_map, record_masks) works without it."
        ) from e


def figure(size: tuple[float, float]) -> Figure:
    """A ``Figure`` with an Agg canvas, not registered with ``pyplot``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def columns(n: int) -> int:
    return n if n <= 3 else min(8, math.ceil(math.sqrt(n)))


def aspect_ratio(q_len: int, kv_len: int) -> float:
    return min(1.0, max(0.3, q_len / kv_len))


def set_ticks(ax, q_len: int, kv_len: int) -> None:
    """Ticks every power of two that gives about five of them (0, 16, 32, ... for 64), labelled
    in binary thousands past 8192 (``16k``, ``1M``) rather than matplotlib's ``1e6`` offsets."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    def label(v: float, _pos=None) -> str:
        v = int(v)
        if v and v % (1 << 20) == 0:
            return f"{v >> 20}M"
        return f"{v >> 10}k" if v > 8192 and v % 1024 == 0 else str(v)

    for axis, length in ((ax.xaxis, kv_len), (ax.yaxis, q_len)):
        axis.set_major_locator(MultipleLocator(2 ** max(0, math.ceil(math.log2(length / 5)))))
        axis.set_major_formatter(FuncFormatter(label))


def code_cmap():
    """Colour codes ``EMPTY``/``PARTIAL``/``FULL`` → ``COLORS``: ``(cmap, norm)``."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    return ListedColormap(list(COLORS), name="flexmask"), BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3)


def fraction_cmap():
    """Shares of kept pairs in ``(0, 1]`` → colours; masked values (nothing kept) grey: ``(cmap, norm)``."""
    from matplotlib.colors import LinearSegmentedColormap, PowerNorm

    cmap = LinearSegmentedColormap.from_list("flexmask_kept", list(FRACTION_COLORS))
    return cmap.with_extremes(bad=COLORS[EMPTY]), PowerNorm(FRACTION_GAMMA, vmin=0.0, vmax=1.0)


def legend(fig: Figure, levels: set[str], axes) -> None:
    """The key of the colours used by ``levels``; a colour bar when pooled cells are drawn."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.patches import Patch

    names: list[list[str]] = [[], [], []]
    if "token" in levels:
        names[0].append("masked")
        names[2].append("kept")
    if "pooled" in levels:
        names[0].append("nothing kept")
    if "block" in levels:
        names[0].append("empty block")
        names[1].append("partial block")
        names[2].append("full block")
    handles = [
        Patch(facecolor=c, edgecolor="#999999", label=" / ".join(nm)) for c, nm in zip(COLORS, names, strict=True) if nm
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=8)
    if "pooled" in levels:
        cmap, norm = fraction_cmap()
        bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes, shrink=0.8, aspect=30)
        bar.set_label("share of a cell's (query, key) pairs kept", fontsize=8)
        bar.set_ticks([0.01, 0.0625, 0.25, 0.5, 1.0], labels=["1%", "1/16", "1/4", "1/2", "all"])
        bar.ax.tick_params(labelsize=7)
