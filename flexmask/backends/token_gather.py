"""Token-level top-k read in place (option ``token_kernel``, ``"gather"`` or ``"auto"``): a lone
``fm.topk`` (with at most an ``fm.key_bias`` of its scores) through the Triton kernels of
:mod:`.triton.token_gather`, which load each query block's kept keys by index."""

from __future__ import annotations

import torch

from ..lowering.plan import Plan
from .triton import token_gather as kernel


def applies(q: torch.Tensor, v: torch.Tensor, auto: bool = False) -> bool:
    """Whether the kernels run these inputs: CUDA with Triton, float16/bfloat16, equal q/k/v head
    dims that are a power of two (from 16; ``auto``: at most 128, the sizes tuned)."""
    d = q.shape[-1]
    return (
        kernel.triton is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and v.shape[-1] == d
        and d >= 16
        and d & (d - 1) == 0
        and (not auto or d <= 128)
    )


def run(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run a ``"token_gather"`` plan: ``[B, Hq, N, Dv]``."""
    if not applies(q, v):
        raise ValueError(
            "option token_kernel='gather' needs CUDA with Triton, float16/bfloat16 inputs and equal "
            f"q/k/v head dims that are a power of two (from 16); got {q.dtype} on {q.device.type} and head dims "
            f"{q.shape[-1]}, {v.shape[-1]}: use token_kernel='auto' or 'flex'"
        )
    ends, keep = plan.token_ends
    return kernel.token_gather_attention(q, k, v, ends, keep, bias=plan.key_bias, scale=plan.scale)
