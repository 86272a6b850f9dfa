"""flexmask: sparse and structured attention in a few lines, on FlexAttention.

The pipeline, one folder per stage: expressions (:mod:`flexmask.algebra`) → a plan
(:mod:`flexmask.lowering`) → one kernel call (:mod:`flexmask.backends`), behind
:func:`flexmask.attention` (module :mod:`flexmask.functional`).

Examples:
    >>> import torch, flexmask as fm
    >>> q = k = v = torch.randn(1, 4, 64, 32)
    >>> mask = fm.causal() & (fm.sliding_window(16) | fm.prefix_lm(8))
    >>> fm.attention(q, k, v, mask=mask, bias=fm.alibi(4)).shape
    torch.Size([1, 4, 64, 32])
"""

from __future__ import annotations

import importlib
from typing import Any

from .algebra.bias import Bias, alibi, head_bias, key_bias, relative_bias, tensor_bias
from .algebra.content import topk, topk_blocks
from .algebra.masks import (
    Mask,
    causal,
    chunked,
    document,
    full,
    key_mask,
    mask,
    padding,
    prefix_lm,
    sliding_window,
)
from .dma import DMAConfig, DynamicMaskAttention, dynamic_bias
from .functional import attention
from .integrations.sdpa import route_sdpa
from .lowering.cache import clear as clear_cache
from .settings import Options, options, options_in_effect

__version__ = "0.2.0.dev0"

# Loaded on first use: pictures (numpy/torch only until you draw, which needs matplotlib) and the
# transformers integration (which needs transformers).
_LAZY = {
    "plot": "flexmask.viz",
    "plot_layers": "flexmask.viz",
    "plot_attention": "flexmask.viz",
    "attention_map": "flexmask.viz",
    "record_masks": "flexmask.viz",
}


def __getattr__(name: str) -> Any:
    if name == "hf":  # `fm.hf` without importing transformers at `import flexmask`
        return importlib.import_module(".hf", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexmask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"hf"})


__all__ = [
    "Bias",
    "DMAConfig",
    "DynamicMaskAttention",
    "Mask",
    "Options",
    "alibi",
    "attention",
    "attention_map",
    "causal",
    "chunked",
    "clear_cache",
    "document",
    "dynamic_bias",
    "full",
    "head_bias",
    "key_bias",
    "key_mask",
    "mask",
    "options",
    "options_in_effect",
    "padding",
    "plot",
    "plot_attention",
    "plot_layers",
    "prefix_lm",
    "record_masks",
    "relative_bias",
    "route_sdpa",
    "sliding_window",
    "tensor_bias",
    "topk",
    "topk_blocks",
]
