"""Backends: each runs one kind of :class:`~flexmask.lowering.plan.Plan` with one kernel call.

* :mod:`.flex`: ``torch.nn.attention.flex_attention`` compiled by ``torch.compile`` (fused GPU
  kernels; on CPU, compiled forward only).
* :mod:`.reference`: exact PyTorch, chunked over queries; runs anywhere, trains on CPU (where flex
  has no backward) and bounds memory.
* :mod:`.token_layout`: token-level top-k (``fm.topk``) through a key layout that skips work.
* :mod:`.token_gather`: token-level top-k read in place by the Triton kernels of :mod:`.triton`.
* :mod:`.gather`: one decoding query attends to the keys its content selection gathered.
* :mod:`.key_bias`: a per-key bias whose gradient avoids flex's atomics, with the Triton kernels
  of :mod:`.triton`.
"""

from __future__ import annotations

import torch

from ..lowering.plan import Plan
from ..settings import Resolved
from . import flex, gather, key_bias, reference, token_gather, token_layout


def choose_kernels(options: Resolved, q: torch.Tensor, v: torch.Tensor) -> Resolved:
    """``options`` with the choices that depend on the inputs made: ``token_kernel="auto"``."""
    if options.token_kernel != "auto":
        return options
    return options.merged({"token_kernel": "gather" if token_gather.applies(q, v, auto=True) else "flex"})


def run(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run ``plan`` on ``q`` ``[B, Hq, Q, D]``, ``k`` ``[B, Hkv, KV, D]``, ``v`` ``[B, Hkv, KV, Dv]``."""
    if plan.kind == "reference":
        return reference.reference(q, k, v, plan.score_mod, plan.mask_mod, plan.scale)
    if plan.kind == "gather":
        return gather.run(plan, q, k, v)
    if plan.kind == "token_layout":
        return token_layout.run(plan, q, k, v)
    if plan.kind == "token_gather":
        return token_gather.run(plan, q, k, v)
    if plan.kind == "key_bias":
        return key_bias.run(plan, q, k, v)
    return flex.run(plan, q, k, v)
