"""Token-level top-k read in place (option ``token_kernel="gather"``, experimental): a lone
``fm.topk`` (with at most an ``fm.key_bias`` of its scores) through the Triton kernels of
:mod:`.triton.token_gather`, which load each query block's kept keys by index."""

from __future__ import annotations

import torch

from ..lowering.plan import Plan
from .triton import token_gather as kernel


def run(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run a ``"token_gather"`` plan: ``[B, Hq, N, Dv]``."""
    d = q.shape[-1]
    if kernel.triton is None or q.dtype not in (torch.float16, torch.bfloat16) or d & (d - 1) or v.shape[-1] != d:
        raise ValueError(
            "option token_kernel='gather' needs CUDA with Triton, float16/bfloat16 inputs and equal "
            f"q/k/v head dims that are a power of two; got {q.dtype} and head dims {d}, {v.shape[-1]}"
        )
    ends, keep = plan.token_ends
    return kernel.token_gather_attention(q, k, v, ends, keep, bias=plan.key_bias, scale=plan.scale)
