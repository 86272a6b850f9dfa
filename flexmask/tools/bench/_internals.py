"""Every use of flexmask's internal (non-public) names by the benchmarks, in one place.

The benchmarks time pieces of flexmask that have no public API: building a ``BlockMask`` from a
mask's structure without the cache, and what :func:`flexmask.attention` builds (plans) for a new
mask. When the core moves, repoint the imports and the names the reports quote (``*_NAME``) here;
nothing else in :mod:`flexmask.tools` imports flexmask's submodules.

Examples:
    >>> import flexmask as fm
    >>> from flexmask.tools.bench import _internals
    >>> layout = _internals.make_layout(1, 2, 256, 256, "cpu")
    >>> _internals.build_block_mask_uncached(fm.causal(), layout).kv_num_blocks.shape
    torch.Size([1, 1, 2])
"""

from __future__ import annotations

from typing import Any

import torch

import flexmask as fm
from flexmask.backends import choose_kernels
from flexmask.lowering.blocks import build_block_mask
from flexmask.lowering.layout import BLOCK, Layout, Lowering
from flexmask.lowering.planner import lower

#: How the reports name flexmask's structural BlockMask builder.
BUILD_NAME = "flexmask.lowering.blocks.build_block_mask"
#: How the reports name what ``fm.attention`` builds for a call (its plan: token layout or BlockMask).
PLAN_NAME = "flexmask.lowering.planner.lower"


def make_layout(
    batch: int, heads: int, q_len: int, kv_len: int, device: torch.device | str, kv_heads: int | None = None
) -> Any:
    """flexmask's description of a call's shapes, which its builders take."""
    return Layout(batch, heads, q_len, kv_len, torch.device(device), kv_heads)


def build_block_mask_uncached(mask: Any, layout: Any) -> Any:
    """The mask's ``BlockMask`` for ``layout`` (blocks of 128), built from its structure every call."""
    return build_block_mask(mask, Lowering(layout, fm.options_in_effect()), BLOCK)


def fresh_mask_build(mask: Any, bias: Any, layout: Any, q: torch.Tensor, v: torch.Tensor, options: Any = None) -> Any:
    """What :func:`flexmask.attention` builds for a new mask and bias before any kernel runs (its
    plan: the token selection's interval ends or key layout, or the ``BlockMask``) for inputs like
    ``q``, ``v`` and per-call ``options``, with the cache off."""
    resolved = fm.options_in_effect().merged({**(options or {}), "cache": False})
    resolved = choose_kernels(resolved, q, v)
    return lower(mask, bias, layout=layout, options=resolved, scale=1.0, softcap=None)
