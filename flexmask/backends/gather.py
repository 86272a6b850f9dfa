"""Gather backend: one decoding query attends to the key positions its content selection gathered.

It reads ``S`` keys and values of the cache (``S = k`` for ``fm.topk``, ``(k + 1) · block`` for
``fm.topk_blocks``) instead of all ``L``, then evaluates the call's mask and bias at those positions
with the same lowered ``mask_mod``/``score_mod`` the other backends run, and takes a softmax over
them. Computation in float32 (float64 for float64 inputs); rows with no kept key give zeros.
"""

from __future__ import annotations

import torch

from ..lowering.cache import compiled_on_cuda
from ..lowering.plan import Plan
from .triton import gather_decode


def run(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run a ``"gather"`` plan: ``q`` ``[B, Hq, 1, D]`` → ``[B, Hq, 1, Dv]``.

    On CUDA (fp16/bf16, no softcap, one list of positions per KV head) the attention itself is
    one Triton kernel (:mod:`.triton.gather_decode`); the mask and the bias are evaluated at the
    gathered positions first, as a keep map and an additive term."""
    positions, valid = plan.gathered
    if plan.softcap is None and gather_decode.applies(q, k, v, positions):
        B, Hkv = q.shape[0], k.shape[1]
        keep, add = _terms(positions, valid, q.shape[1], plan.score_mod, plan.mask_mod, torch.float32)
        positions = positions.expand(B, Hkv, positions.shape[-1])
        return gather_decode.gathered_decode(q, k, v, positions, keep, add, plan.scale)
    return _attend(q, k, v, positions, valid, plan.scale, plan.score_mod, plan.mask_mod)


def _terms_eager(
    positions, valid, heads: int, score_mod, mask_mod, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """At the gathered positions ``[B, Hs, S]`` (``Hs`` dividing ``heads``), per query head:
    ``keep`` ``[B, Hq, S]`` (the selection's ``valid`` and the ``mask_mod``) and the additive bias
    ``score_mod(0)`` ``[B, Hq, S]`` in ``dtype`` (``None`` without one)."""
    B, S = positions.shape[0], positions.shape[-1]
    grid, keep = _per_query_head(positions, valid, heads, mask_mod)
    keep = keep.expand(B, heads, 1, S)[:, :, 0]
    if score_mod is None:
        return keep, None
    zero = torch.zeros(B, heads, 1, S, device=positions.device, dtype=dtype)
    return keep, score_mod(zero, *grid).to(dtype).expand(B, heads, 1, S)[:, :, 0]


def _per_query_head(positions, valid, heads: int, mask_mod) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """At the gathered positions ``[B, Hs, S]`` (``Hs`` dividing ``heads``): the index grid the mask
    and score functions take, ``(b, h, q_idx, kv_idx)`` (``kv_idx`` ``[B, Hq, 1, S]``, ``q_idx``
    call-local: the one query), and ``keep`` ``[B, Hq, 1, S]``, the selection's ``valid`` and the
    ``mask_mod``."""
    B, hs = positions.shape[0], positions.shape[1]
    dev = positions.device
    kv_idx = positions.repeat_interleave(heads // hs, 1)[:, :, None, :]
    keep = valid.repeat_interleave(heads // hs, 1)[:, :, None, :]
    b = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    q_idx = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    if mask_mod is not None:
        keep = keep & mask_mod(b, h, q_idx, kv_idx)
    return (b, h, q_idx, kv_idx), keep


# a few elementwise kernels on CUDA (the mask and bias at the gathered positions); automatic dynamic shapes
_terms = compiled_on_cuda(_terms_eager, dynamic=None)


def _attend_eager(q, k, v, positions, valid, scale: float, score_mod, mask_mod) -> torch.Tensor:
    B, Hq, _, D = q.shape
    Hkv, L, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    if positions is None:  # every key: the cache as it is, no copy
        positions = torch.arange(L, device=q.device).expand(B, 1, L)
        valid = torch.ones(B, 1, L, dtype=torch.bool, device=q.device)
        ks, vs = k, v
    else:
        ks = vs = None
    hs, S = positions.shape[1], positions.shape[-1]
    positions = positions.expand(B, hs, S)
    valid = valid.expand(B, hs, S)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    if hs in (1, Hkv):  # one selection per KV head: gather once per KV head, shared by its query group
        positions, valid = positions.expand(B, Hkv, S), valid.expand(B, Hkv, S)
        rows = (torch.arange(B * Hkv, device=dev).view(B, Hkv, 1) * L + positions).reshape(-1)
        if ks is None:
            ks = k.reshape(B * Hkv * L, D).index_select(0, rows).view(B, Hkv, S, D)
            vs = v.reshape(B * Hkv * L, Dv).index_select(0, rows).view(B, Hkv, S, Dv)
        scores = _dots(q.view(B, Hkv, group, D), ks, compute).view(B, Hq, 1, S)
    else:  # one selection per query head
        kv_head = torch.arange(Hq, device=dev) // group
        base = (torch.arange(B, device=dev).view(B, 1, 1) * Hkv + kv_head.view(1, Hq, 1)) * L
        rows = (base + positions).reshape(-1)
        ks = k.reshape(B * Hkv * L, D).index_select(0, rows).view(B, Hq, S, D)
        vs = v.reshape(B * Hkv * L, Dv).index_select(0, rows).view(B, Hq, S, Dv)
        scores = _dots(q, ks, compute)  # [B, Hq, 1, S]
    grid, keep = _per_query_head(positions, valid, Hq, mask_mod)
    scores = scores * scale
    if score_mod is not None:
        scores = score_mod(scores, *grid).to(compute)
    scores = scores.masked_fill(~keep, float("-inf"))
    alive = keep.any(-1, keepdim=True)
    p = torch.softmax(torch.where(alive, scores, torch.zeros_like(scores)), dim=-1) * alive
    if hs in (1, Hkv):
        return _mix(p.view(B, Hkv, group, S), vs, compute).view(B, Hq, 1, Dv).to(q.dtype)
    return _mix(p, vs, compute).to(q.dtype)


def _dots(q: torch.Tensor, ks: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``q [.., G, D] · ks [.., S, D]`` → ``[.., G, S]`` in ``compute``.

    Traced (compiled), as a broadcast product and a sum that inductor fuses with the gather into one
    reduction reading the keys once in their own dtype; a batched matmul of a few rows there became
    a float32 cuBLAS GEMV over a float32 copy of the keys (35 µs of a 150 µs H200 decoding step).
    Eagerly, a matmul (no ``[.., G, S, D]`` temporary).
    """
    if torch.compiler.is_compiling():
        return (q[..., :, None, :].to(compute) * ks[..., None, :, :].to(compute)).sum(-1)
    return q.to(compute) @ ks.to(compute).transpose(-1, -2)


def _mix(p: torch.Tensor, vs: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``p [.., G, S] @ vs [.., S, Dv]`` → ``[.., G, Dv]`` in ``compute``, as :func:`_dots` does it."""
    if torch.compiler.is_compiling():
        return (p[..., :, :, None] * vs[..., None, :, :].to(compute)).sum(-2)
    return p @ vs.to(compute)


# On CUDA the gathers, the dot products, the mask and bias evaluation and the softmax fuse into a few
# kernels (about forty launches eagerly, which cost more than the arithmetic at decoding sizes);
# automatic dynamic shapes, so that a cache growing by one key per step does not recompile.
_attend = compiled_on_cuda(_attend_eager, dynamic=None)
