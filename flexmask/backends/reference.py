"""Reference backend: exact attention in plain PyTorch, chunked over queries.

It evaluates the same lowered ``mask_mod``/``score_mod`` as the flex backend, on broadcast index
tensors, so both backends compute one function. Memory: the scores of one chunk of queries,
at most ``CHUNK_ELEMENTS`` elements (``B · Hq · rows · KV``), plus the inputs; with autograd each
chunk is checkpointed, so training keeps one chunk's scores alive at a time, not ``Q × KV``.
Computation runs in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 24


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None,
    mask_mod: Callable | None,
    scale: float,
) -> torch.Tensor:
    """Attention ``softmax(mask(score_mod(q kᵀ · scale))) v`` with fully masked rows giving 0."""
    B, Hq, Q, _ = q.shape
    Hkv, KV = k.shape[1], k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc = rearrange(q.to(compute), "b (hk g) q d -> b hk g q d", hk=Hkv)
    kc, vc = k.to(compute), v.to(compute)
    rows = max(1, CHUNK_ELEMENTS // max(1, B * Hq * KV))
    dev = q.device
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, -1, 1, 1)
    kv = torch.arange(KV, device=dev).view(1, 1, 1, -1)

    def chunk(q_part: torch.Tensor, start: int, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        s = torch.einsum("bkgqd,bknd->bkgqn", q_part, kc) * scale
        s = rearrange(s, "b hk g q n -> b (hk g) q n")
        qi = torch.arange(start, start + s.shape[2], device=dev).view(1, 1, -1, 1)
        if score_mod is not None:
            s = score_mod(s, b, h, qi, kv).to(compute)
        if mask_mod is not None:
            keep = mask_mod(b, h, qi, kv)
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
                got = keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__
                raise TypeError(f"a mask function must return a bool tensor, got {got}")
            s = s.masked_fill(~keep, float("-inf"))
        row_max = s.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        e = torch.exp(s - row_max)
        p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(compute).tiny)
        p = rearrange(p, "b (hk g) q n -> b hk g q n", hk=Hkv)
        return rearrange(torch.einsum("bkgqn,bknd->bkgqd", p, vc), "b hk g q d -> b (hk g) q d")

    outs = []
    for start in range(0, Q, rows):
        q_part = qc[:, :, :, start : start + rows]
        if torch.is_grad_enabled():
            outs.append(checkpoint(chunk, q_part, start, kc, vc, use_reentrant=False))
        else:
            outs.append(chunk(q_part, start, kc, vc))
    return torch.cat(outs, dim=2).to(q.dtype)
