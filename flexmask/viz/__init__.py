"""Seeing masks: per-head pictures, learned (DMA) masks of a model, attention probabilities.

* Picture data, with numpy and torch only: :func:`mask_picture` / :func:`mask_image` (a mask at
  token, pooled or block level, with its sparsity), :func:`record_masks` (the mask of every
  :func:`flexmask.attention` call of a forward pass), :func:`attention_map` (probabilities).
* Drawing, with matplotlib (the ``viz`` extra: ``pip install -e '.[viz]'``): :func:`plot`, :func:`draw_picture`,
  :func:`plot_layers`, :func:`plot_attention`, :func:`save_demo_images`. Without matplotlib they
  raise ``ImportError`` naming the extra; ``import flexmask.viz`` works either way.

**Sparsity** means one thing in every title, recording and caption: the percent of (query, key)
scores masked, counted token by token (see :mod:`flexmask.viz.pictures`).

Examples:
    >>> import flexmask as fm
    >>> from flexmask.viz import plot
    >>> fig = plot(fm.causal() & fm.sliding_window(16), 64, 64)   # then fig.savefig("window.png")
    >>> fig.axes[0].get_title()
    'head 0 · sparsity 77.9%'
"""

from ._mpl import COLORS
from .demo import save_demo_images
from .draw import draw_picture, plot, plot_layers
from .levels import mask_image, mask_picture
from .pictures import EMPTY, FULL, MAX_CELLS, MAX_PAIRS, PARTIAL, SPARSITY_CAPTION, Level, MaskPicture
from .probabilities import MAX_ATTENTION_CELLS, attention_map, plot_attention
from .record import MAX_RECORD_CELLS, MaskRecording, RecordedCall, record_masks

__all__ = [
    "COLORS",
    "EMPTY",
    "FULL",
    "MAX_ATTENTION_CELLS",
    "MAX_CELLS",
    "MAX_PAIRS",
    "MAX_RECORD_CELLS",
    "PARTIAL",
    "SPARSITY_CAPTION",
    "Level",
    "MaskPicture",
    "MaskRecording",
    "RecordedCall",
    "attention_map",
    "draw_picture",
    "mask_image",
    "mask_picture",
    "plot",
    "plot_attention",
    "plot_layers",
    "record_masks",
    "save_demo_images",
]
