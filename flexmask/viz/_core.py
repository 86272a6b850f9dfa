"""The one place :mod:`flexmask.viz` reaches into flexmask's internals.

Everything else in ``flexmask.viz`` uses public names (``Mask``, ``Bias``, ``Mask.block_mask``) or
the functions below, so that a change of the core's internals is absorbed here. What viz needs:

* the shapes of a call (:class:`Layout`) and the same input checks as :func:`flexmask.attention`;
* a hook told about every :func:`flexmask.attention` call (``(mask, layout)``), to record masks;
* the call-local ``mask_mod`` / ``score_mod`` of a mask, bias and softcap for a layout, exactly as
  the core lowers them: pictures and probabilities evaluate the same functions the kernels run;
* the ``(any, all)`` block maps of a ``BlockMask``;
* which masks have no known structure (content masks, custom functions): their pictures default to
  pooled token-level maps, since every block of theirs may be "partial".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..algebra.bias import Bias
from ..algebra.masks import Custom, Mask, full
from ..functional import _checked, check_expressions, check_inputs, check_scale, check_softcap, observers
from ..lowering.blocks import states_from_block_mask
from ..lowering.layout import Layout, Lowering
from ..lowering.planner import lower_mods
from ..settings import options_in_effect

__all__ = [
    "Bias",
    "Layout",
    "Mask",
    "add_observer",
    "block_states",
    "call_mods",
    "check_expressions",
    "check_qk",
    "check_scale",
    "check_softcap",
    "full",
    "has_custom",
    "mask_dims",
    "mask_layout",
    "remove_observer",
    "unstructured",
]

ModFn = Callable[..., torch.Tensor]
Observer = Callable[[Mask | None, Layout], None]


def check_qk(q: torch.Tensor, k: torch.Tensor) -> Layout:
    """The layout of ``q`` ``[B, Hq, Q, D]`` and ``k`` ``[B, Hkv, KV, D]``, checked as ``fm.attention`` checks them."""
    return check_inputs(q, k, k)


def add_observer(observe: Observer) -> None:
    """Call ``observe(mask, layout)`` at every :func:`flexmask.attention` call, until removed."""
    observers.append(observe)


def remove_observer(observe: Observer) -> None:
    observers.remove(observe)


def call_mods(
    mask: Mask | None, bias: Bias | None, softcap: float | None, layout: Layout
) -> tuple[ModFn | None, ModFn | None]:
    """``(mask_mod, score_mod)`` of call-local positions (query ``0`` is position ``layout.offset``).

    Checks that the mask and bias fit ``layout`` first (errors name the expression). ``None`` for
    what is absent.
    """
    for expr in (mask, bias):
        if expr is not None:
            _checked(expr, layout)
    return lower_mods(mask, bias, softcap, Lowering(layout, options_in_effect()))


def mask_dims(mask: Mask) -> tuple[int | None, int | None]:
    """``(batch, heads)`` fixed by the mask's own tensors, ``None`` where it broadcasts."""
    return mask._dims()


def mask_layout(mask: Mask, q_len: int, kv_len: int, heads: int) -> Layout:
    """The layout a mask is drawn for (batch from its own tensors); checks lengths and its tensors."""
    return mask._layout(q_len, kv_len, None, heads, None)


def block_states(bm: BlockMask) -> tuple[torch.Tensor, torch.Tensor]:
    """``(any, all)`` bool maps ``[B|1, H|1, num_q_blocks, num_kv_blocks]`` of a ``BlockMask``."""
    return states_from_block_mask(bm)


def _walk(mask: Mask) -> Iterator[Mask]:
    yield mask
    for child in mask._children():
        yield from _walk(child)


def unstructured(mask: Mask) -> bool:
    """Whether any part of ``mask`` is a content mask (``fm.topk``, ``fm.topk_blocks``) or a custom
    function (``fm.mask``): parts whose block maps say little about which keys were kept."""
    return mask._blocks_say_little()


def has_custom(mask: Mask) -> bool:
    """Whether ``mask`` holds a custom function (``fm.mask``), which CPU block maps evaluate densely."""
    return any(isinstance(m, Custom) for m in _walk(mask))
