"""The planner: mask, bias and options of a call → a :class:`~flexmask.lowering.plan.Plan`.

It names no mask type. It asks the mask what its lowering offers
(:class:`~flexmask.lowering.layout.Offers`) and the bias whether it is a lone per-key bias, then
chooses:

* ``gather`` for one decoding query under a content mask (or an ``&`` with one), unless the
  options ask for the reference (option ``gather_decode``);
* ``reference`` when the options say so (``backend="reference"``, or ``"auto"`` off CUDA);
* ``token_gather`` (on CUDA, option ``token_kernel``) or ``token_layout`` for a lone ``fm.topk``
  (``token_gather`` also among documents and padding, and for a lone ``fm.topk_blocks`` on Hopper,
  also among them), self-attention, no softcap, and at most a per-key bias shaped like its scores
  (option ``token_layout``);
* ``key_bias`` for a lone per-key bias that needs a gradient on CUDA, eagerly (option ``key_bias_grad``);
* ``flex`` otherwise.

Lowered masks come from the one cache (:mod:`.cache`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..settings import Resolved
from .blocks import build_block_mask
from .cache import constant, lowered
from .decode import Gathered
from .layout import BLOCK, Layout, Lowering, ModFn, Offers, local_mask_mod, shift_queries
from .plan import Plan


def lower(mask: Any, bias: Any, *, layout: Layout, options: Resolved, scale: float, softcap: float | None) -> Plan:
    """The plan of one call (masks and biases already checked against ``layout``)."""
    low = Lowering(layout, options)
    given = mask
    mask = None if mask is None else mask._essential()  # e.g. causal() & topk(...) plans as the top-k alone

    def describe() -> str:
        return f"mask={given!r}, bias={bias!r}, softcap={softcap}"

    common = dict(layout=layout, options=options, scale=scale, describe=describe)
    decoding = layout.q_len == 1
    if decoding and mask is not None and options.gather_decode and options.backend != "reference":
        factor = mask._gather_factor()
        if factor is not None and factor._offers(low) & Offers.GATHER_DECODE:
            gathered, mask_mod = lowered(
                (mask,),
                ("gather", layout),
                lambda: _gather(mask, factor, layout, options),
                enabled=options.cache and not layout.offset_is_tensor,
            )
            score_mod = lower_score(bias, softcap, layout)
            return Plan("gather", gathered=gathered, mask_mod=mask_mod, score_mod=score_mod, softcap=softcap, **common)
    if layout.offset_is_tensor:  # one query at a tensor position: its mask evaluated at every key
        mask_mod, score_mod = lower_mods(mask, bias, softcap, low)
        return Plan(
            "gather", gathered=Gathered(None, None), mask_mod=mask_mod, score_mod=score_mod, softcap=softcap, **common
        )
    backend = options.backend
    if backend == "auto":
        backend = "flex" if layout.device.type == "cuda" else "reference"
    if backend == "reference":
        mask_mod, score_mod = lower_mods(mask, bias, softcap, low)
        return Plan("reference", mask_mod=mask_mod, score_mod=score_mod, **common)

    offers = Offers.NONE if mask is None else mask._offers(low)
    t = None if bias is None else bias._key_bias()
    token_offers = Offers.TOKEN_LAYOUT | Offers.TOKEN_ENDS
    if offers & token_offers and options.token_layout and softcap is None and layout.q_len == layout.kv_len:
        scores_shape = mask._token_scores_shape()
        if scores_shape[1] in (1, layout.kv_heads) and (
            bias is None or (t is not None and t.shape[1:] == scores_shape[1:])
        ):
            if options.token_kernel == "gather" and layout.device.type == "cuda" and offers & Offers.TOKEN_ENDS:
                ends = lowered((mask,), ("token_ends", layout), lambda: mask._token_ends(low), enabled=options.cache)
                return Plan("token_gather", token_ends=(ends, mask._token_keep()), key_bias=t, **common)
            if offers & Offers.TOKEN_LAYOUT:
                graphed = options.graphed_build and layout.device.type == "cuda"
                token = lowered(
                    (mask,),
                    ("token_layout", layout, graphed),
                    lambda: mask._token_layout(low, graphed),
                    enabled=options.cache,
                )
                return Plan("token_layout", token=token, key_bias=t, **common)

    block_mask = None if mask is None else lower_block_mask(mask, low, offers)
    if t is not None and softcap is None and key_bias_path(t, layout, options):
        causal = bool(offers & Offers.CAUSAL_PARTIAL_BLOCKS)
        return Plan("key_bias", block_mask=block_mask, key_bias=t, causal_partial=causal, **common)
    return Plan("flex", block_mask=block_mask, score_mod=lower_score(bias, softcap, layout), **common)


def _gather(mask: Any, factor: Any, layout: Layout, options: Resolved):
    """The gathered positions of ``factor`` and the whole mask's ``mask_mod`` (call-local) with that
    factor's selection left to the gather."""
    low = Lowering(layout, options, gathered_by=factor)
    return factor._decode_gather(low), local_mask_mod(mask, low)


def key_bias_path(t: torch.Tensor, layout: Layout, options: Resolved) -> bool:
    """Whether a lone per-key bias ``t`` ``[B|1, Hs, KV]`` takes the ``key_bias`` backend: its gradient
    is needed, on CUDA, eagerly (under an outer ``torch.compile`` the autograd function is not traced
    and flex's own gradient is used), and ``Hs`` is 1 or the KV heads (``dV`` is summed per group)."""
    return (
        options.key_bias_grad != "flex"
        and layout.device.type == "cuda"
        and torch.is_grad_enabled()
        and t.requires_grad
        and not torch.compiler.is_compiling()
        and t.shape[1] in (1, layout.kv_heads)
    )


def lower_block_mask(mask: Any, low: Lowering, offers: int | None = None, block_size: int = BLOCK):
    """The mask's BlockMask for ``low.layout`` (blocks of ``block_size``), from the one cache."""
    layout, options = low.layout, low.options
    if offers is None:
        offers = mask._offers(low)
    # Under torch.compile no graph is captured and the build is traced instead: there the generic
    # builder is traced (the graphed build's function, traced into a compiled decoder layer at 64k,
    # failed inductor's code generation on an H200 with torch 2.11; the generic one compiled).
    graphed = bool(
        block_size == BLOCK
        and offers & Offers.GRAPHED_BUILD
        and options.graphed_build
        and layout.device.type == "cuda"
        and not torch.compiler.is_compiling()
        and mask._graphed_build_fits(layout)
    )

    def build():
        return mask._graphed_block_mask(low) if graphed else build_block_mask(mask, low, block_size)

    return lowered((mask,), ("blocks", layout, block_size, graphed), build, enabled=options.cache)


def lower_mods(mask: Any, bias: Any, softcap: float | None, low: Lowering) -> tuple[ModFn | None, Any]:
    """``(mask_mod, score_mod)`` of a call in call-local positions (either may be ``None``)."""
    return local_mask_mod(mask, low), lower_score(bias, softcap, low.layout)


def lower_score(bias: Any, softcap: float | None, layout: Layout):
    """The ``score_mod`` (call-local positions) for a bias and an optional softcap, or ``None``."""
    if bias is None and softcap is None:
        return None
    term = None if bias is None else shift_queries(bias._term(layout), layout.offset, layout.device)
    # a 1-element tensor, not a Python float: dynamo turns a captured float into a 0-d CPU tensor
    # input, which dynamic-shape flex kernels fail to lower ("unbacked_bindings", torch 2.11, H100)
    cap = None if softcap is None else constant(float(softcap), layout.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap[0] * torch.tanh(score / cap[0])
        if term is not None:
            score = score + term(b, h, q_idx, kv_idx)
        return score

    return score_mod
