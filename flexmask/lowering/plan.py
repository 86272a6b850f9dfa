"""The plan: everything one :func:`flexmask.attention` call runs, decided before any kernel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..settings import Resolved
from .decode import Gathered
from .layout import Layout, ModFn
from .token_layout import TokenLayout

Kind = Literal["reference", "flex", "key_bias", "token_layout", "token_gather", "gather"]


@dataclass(frozen=True)
class Plan:
    """An immutable description of one attention call, for a backend to run.

    Attributes:
        kind: which backend runs it: ``"reference"`` (exact chunked PyTorch), ``"flex"`` (compiled
            FlexAttention), ``"key_bias"`` (flex with a per-key bias whose gradient is computed
            without atomics), ``"token_layout"`` (flex over the key layout of a lone ``fm.topk``),
            ``"token_gather"`` (a lone ``fm.topk``, also among documents and padding, read in place
            by a Triton kernel) or
            ``"gather"`` (one decoding query attends to the keys its content selection gathered).
        layout: the call's shapes and device.
        options: the options in effect.
        scale: the score scale.
        mask_mod: the mask in call-local positions (``reference``, ``gather``), or ``None`` for no mask.
        score_mod: bias and softcap in call-local positions (``reference``, ``flex``), or ``None``.
        block_mask: the BlockMask (``flex``, ``key_bias``), or ``None`` for no mask.
        key_bias: the per-key bias tensor ``[B|1, Hs, KV]`` (``key_bias``; ``token_layout`` when the
            call has one), else ``None``.
        token: the key layout (``token_layout``).
        token_ends: ``(ends, k)``: the interval ends ``[B, Hs, KV]`` int32 of a lone ``fm.topk`` and
            its ``k`` (``token_gather``).
        gathered: the key positions a decoding query may keep (``gather``).
        softcap: the softcap inside ``score_mod`` (``gather``: without one the bias is additive,
            ``score_mod(s) = s + score_mod(0)``).
        causal_partial: every partial block of ``block_mask`` is causal inside (kernels may apply
            ``j <= i`` there instead of the ``mask_mod``).
        describe: a function naming the call's mask, bias and softcap (for messages and for
            remembering kernel configurations).
    """

    kind: Kind
    layout: Layout
    options: Resolved
    scale: float
    mask_mod: ModFn | None = None
    score_mod: Callable[..., torch.Tensor] | None = None
    block_mask: BlockMask | None = None
    key_bias: torch.Tensor | None = None
    token: TokenLayout | None = None
    token_ends: tuple[torch.Tensor, int] | None = None
    gathered: Gathered | None = None
    softcap: float | None = None
    causal_partial: bool = False
    describe: Callable[[], str] = str
