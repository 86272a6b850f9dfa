"""FlexAttention with a per-key bias whose gradient costs one extra forward-like pass, not atomics.

With a bias ``t[b, h', j]`` added to every score ``s_ij`` (``fm.key_bias``: DMA's content bias),
flex computes the bias gradient inside its backward kernel by atomically adding every ``dS_ij``
of a tile into ``t``'s gradient: all the queries of a tile hit the same few addresses, which cost
+50–60 % of the backward on an H100. The gradient has a closed form instead::

    dt_j = Σ_i dS_ij = Σ_i P_ij (dO_i · v_j − Δ_i)      with Δ_i = dO_i · O_i
         = v_j · dV_j − Σ_i P_ij Δ_i

``dV`` comes from flex's own backward (run without the bias gradient). ``Σ_i P_ij Δ_i`` comes from
an attention *of the keys over the queries*: flex on the transposed problem (keys as queries, the
transposed ``BlockMask``), scores ``s_ij + t_j − lse_i``, values ``Δ``. It returns
``Σ_i P_ij Δ_i / Σ_i P_ij`` and ``log Σ_i P_ij``, whose product is the sum (rounded to bf16 like
``dV`` is).

Masks whose partial blocks are causal (``fm.topk_blocks``, ``fm.causal``; blocks of 128, CUDA,
fp16/bf16) take faster routes: the fused backward of :mod:`.triton.fused_bwd` (``dq, dk, dv, dt``
in one kernel), or flex's backward plus the query-side kernel of :mod:`.triton.key_mass` for the
sum. The option ``key_bias_grad`` chooses (``"auto"``: the first that applies, in that order).
The token layout keeps flex's own gradient: over its key copies the closed form was slower than
flex's atomics (``docs/benchmarks.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..lowering.plan import Plan
from ..lowering.terms import key_term
from ..settings import Resolved
from .flex import with_lse
from .triton import fused_bwd, key_mass

VALUE_WIDTH = 16  # the narrowest value head flex compiles


def run(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run a ``"key_bias"`` plan (see :func:`attention`)."""
    return attention(
        q,
        k,
        v,
        plan.key_bias,
        plan.block_mask,
        plan.scale,
        with_lse,
        options=plan.options,
        causal_partial=plan.causal_partial,
        q_offset=plan.layout.offset,
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    block_mask: BlockMask | None,
    scale: float,
    run: Callable,
    *,
    options: Resolved | None = None,
    causal_partial: bool = False,
    q_offset: int = 0,
) -> torch.Tensor:
    """``softmax(scale · q kᵀ + t[b, h // g, j]) v`` under ``block_mask``, with ``t``'s gradient in closed form.

    Args:
        q, k, v: ``[B, Hq, Q, D]``, ``[B, Hkv, KV, D]``, ``[B, Hkv, KV, Dv]``.
        t: ``[B|1, Hs, KV]`` with ``Hs`` 1 or ``Hkv``.
        run: ``run(q, k, v, score_mod, block_mask, scale)`` → ``(out, lse)``, the flex call
            (natural-log ``lse`` ``[B, Hq, Q]``); differentiable in ``q, k, v``.
        options: ``key_bias_grad``, ``split_below``, ``split_chunk`` (default: the defaults).
        causal_partial: the mask's partial blocks are exactly causal, so the Triton kernels apply.
        q_offset: the queries' first position among the keys (``0``: self-attention; context
            parallelism calls with a shard's rows).
    """
    options = Resolved() if options is None else options
    return _KeyBiasAttention.apply(q, k, v, t, block_mask, scale, run, options, causal_partial, q_offset)


class _KeyBiasAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, t, block_mask, scale, run, options, causal_partial, q_offset):
        # The fused backward needs only the forward's output and lse: then flex runs without
        # autograd (no backward graph, and no flex backward kernel compiled that would never run).
        fused = (
            causal_partial
            and options.key_bias_grad in ("auto", "fused")
            and fused_bwd.supported(q, k, block_mask, q_offset)
        )
        inner = [x.detach().requires_grad_(not fused) for x in (q, k, v)]
        t_ = t.detach()
        with torch.set_grad_enabled(not fused):
            out, lse = run(*inner, _key_bias_mod(t_, q.shape[1]), block_mask, scale)
        ctx.graph, ctx.fused = (out, inner), fused
        ctx.lse, ctx.t, ctx.block_mask, ctx.scale, ctx.run = lse.detach(), t_, block_mask, scale, run
        ctx.options, ctx.causal_partial, ctx.q_offset = options, causal_partial, q_offset
        ctx.t_shape, ctx.t_dtype = t.shape, t.dtype
        return out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        out, inner = ctx.graph
        q, k, v = inner
        choice = ctx.options.key_bias_grad
        causal = ctx.causal_partial
        if ctx.fused:
            opts = ctx.options  # all four gradients in one kernel
            dq, dk, dv, dt = fused_bwd.backward(
                q.detach(),
                k.detach(),
                v.detach(),
                out.detach(),
                grad_out,
                ctx.lse,
                ctx.t,
                ctx.block_mask,
                ctx.scale,
                opts.split_below,
                opts.split_chunk,
                ctx.q_offset,
            )
            ctx.graph = None
            dt = dt.to(ctx.t_dtype) if ctx.needs_input_grad[3] else None
            return dq, dk, dv, dt, None, None, None, None, None, None
        dq, dk, dv = torch.autograd.grad(out, inner, grad_out)
        dt = None
        if ctx.needs_input_grad[3]:
            query_side = causal and choice != "transposed"
            dt = _bias_grad(
                q.detach(),
                k.detach(),
                v.detach(),
                out.detach(),
                grad_out,
                ctx.lse,
                ctx.t,
                dv,
                ctx.block_mask,
                ctx.scale,
                ctx.run,
                query_side,
            )
            dt = dt.sum(0, keepdim=True) if ctx.t_shape[0] == 1 else dt
            dt = dt.to(ctx.t_dtype)
        ctx.graph = None
        return dq, dk, dv, dt, None, None, None, None, None, None


def _key_bias_mod(t: torch.Tensor, hq: int):
    term = key_term(t, hq)

    def key_bias(score, b, h, q_idx, kv_idx):
        return score + term(b, h, q_idx, kv_idx)

    return key_bias


def _bias_grad(q, k, v, out, grad_out, lse, t, dv, block_mask, scale, run, query_side=False) -> torch.Tensor:
    """``dt`` ``[B, Hs, KV]`` (float32, float64 for float64 inputs) from the closed form in the module docstring."""
    B, hq, n, _ = q.shape
    hkv, kv = k.shape[1], k.shape[2]
    hs = t.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # products in the inputs' dtype, sums in float32
    delta = torch.mul(grad_out, out).sum(-1, dtype=acc)  # [B, Hq, Q]
    first = torch.mul(v, dv).sum(-1, dtype=acc)  # v_j · dV_j, dV summed over each query group [B, Hkv, KV]
    if query_side and n == kv and key_mass.supported(q, block_mask):
        mass = key_mass.key_mass(q, k, t, lse, delta, block_mask, scale)  # Σ_i P_ij Δ_i  [B, Hq, KV]
        return first.view(B, hs, hkv // hs, kv).sum(2) - mass.view(B, hs, hq // hs, kv).sum(2)
    values = torch.zeros(B, hq, n, VALUE_WIDTH, dtype=q.dtype, device=q.device)
    values[..., 0] = delta
    keys_as_queries = k.repeat_interleave(hq // hkv, dim=1)  # [B, Hq, KV, D]
    term = key_term(t, hq)

    def transposed(score, b, h, kv_idx, q_idx):  # "queries" are keys, "keys" are queries
        return score + term(b, h, q_idx, kv_idx) - lse[b, h, q_idx]

    with torch.no_grad():
        mass_avg, log_mass = run(keys_as_queries, q, values, transposed, _transpose(block_mask), scale)
    mass = mass_avg[..., 0].to(acc) * log_mass.to(acc).exp()  # Σ_i P_ij Δ_i  [B, Hq, KV]
    return first.view(B, hs, hkv // hs, kv).sum(2) - mass.view(B, hs, hq // hs, kv).sum(2)


def _transpose(bm: BlockMask | None) -> BlockMask | None:
    """The ``BlockMask`` of the transposed problem (keys as queries), sharing ``bm``'s tensors."""
    if bm is None:
        return None
    mod = bm.mask_mod

    def transposed_mask(b, h, kv_idx, q_idx):
        return mod(b, h, q_idx, kv_idx)

    q_len, kv_len = bm.seq_lengths
    return BlockMask(
        (kv_len, q_len),
        bm.q_num_blocks,
        bm.q_indices,
        bm.full_q_num_blocks,
        bm.full_q_indices,
        bm.kv_num_blocks,
        bm.kv_indices,
        bm.full_kv_num_blocks,
        bm.full_kv_indices,
        BLOCK_SIZE=(bm.BLOCK_SIZE[1], bm.BLOCK_SIZE[0]),
        mask_mod=transposed_mask,
    )
