"""Test helpers that reach into flexmask's lowering (what ``fm.attention`` hands the kernels)."""

from __future__ import annotations

from flexmask.lowering.layout import BLOCK, Layout, Lowering
from flexmask.lowering.planner import lower_block_mask, lower_score
from flexmask.settings import Resolved

__all__ = ["Layout", "block_mask_for", "lower_score", "lowering"]


def lowering(layout: Layout, **options) -> Lowering:
    """A lowering context for ``layout`` with default options (overridden by ``options``)."""
    return Lowering(layout, Resolved().merged(options))


def block_mask_for(mask, layout: Layout, block_size: int = BLOCK):
    """The (cached) BlockMask ``fm.attention`` would use for ``mask`` over ``layout``."""
    return lower_block_mask(mask, lowering(layout), block_size=block_size)
