"""``Σ_i P_ij Δ_i`` per key, from the query side: one Triton kernel (CUDA).

The closed-form key-bias gradient (:mod:`flexmask.backends.key_bias`) needs, for every key ``j``, the sum over the
queries that attend to it of ``P_ij Δ_i``. A flex pass over the transposed problem computes it with
one program per *key* block, which is unbalanced when a few key blocks are read by almost every
query block (block top-k: the best-ranked blocks). Here each program takes one *query* block and
its key blocks (the rows of the ``BlockMask``: every program does the same work for block top-k),
recomputes ``P`` for each tile, sums it over the tile's queries first, and adds the 128 column
sums atomically: one atomic per key and tile, not one per score.

Partial blocks are masked causally (``j <= i``): that is exact for masks whose partial blocks are
the diagonal blocks of a causal mask, which is what :func:`flexmask.topk_blocks` builds.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from ...lowering.layout import cdiv

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 128
LOG2E = 1.4426950408889634  # the kernels work in base 2: P = exp2(scale·log2(e)·q·k + t·log2(e) − lse·log2(e))

def kernels_apply(q: torch.Tensor, block_mask: BlockMask | None, max_head_dim: int) -> bool:
    """Whether this module's kernels (and :mod:`.fused_bwd`'s) can run: CUDA, Triton, fp16/bf16
    (float32/float64 inputs keep exact paths: the kernels' dot products would round through TF32),
    head dim a power of two in [16, ``max_head_dim``], and a ``BlockMask`` over blocks of 128."""
    d = q.shape[-1]
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and block_mask is not None
        and tuple(block_mask.BLOCK_SIZE) == (BLOCK, BLOCK)
        and 16 <= d <= max_head_dim
        and d & (d - 1) == 0
    )


def supported(q: torch.Tensor, block_mask: BlockMask | None) -> bool:
    """Whether :func:`key_mass` can run: see :func:`kernels_apply`."""
    return kernels_apply(q, block_mask, 256)


def key_mass(
    q: torch.Tensor, k: torch.Tensor, t: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
    block_mask: BlockMask, scale: float,
) -> torch.Tensor:
    """``Σ_i P_ij Δ_i`` ``[B, Hq, KV]`` (float32) with ``P_ij = exp(scale · q_i·k_j + t_j − lse_i)``.

    Args:
        q, k: ``[B, Hq, N, D]``, ``[B, Hkv, N, D]``.
        t: the key bias ``[B|1, Hs, N]``, ``Hs`` dividing ``Hq``.
        lse, delta: ``[B, Hq, N]`` (natural-log ``lse``; ``Δ_i = dO_i · O_i``).
        block_mask: blocks of 128, partial blocks causal (see the module docstring).
    """
    B, hq, n, d = q.shape
    hkv, hs = k.shape[1], t.shape[1]
    kv_num, kv_idx = block_mask.kv_num_blocks, block_mask.kv_indices
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    if full_num is None:
        full_num, full_idx = torch.zeros_like(kv_num), kv_idx
    mass = torch.zeros(B, hq, n, device=q.device, dtype=torch.float32)
    lse, delta = (lse.float() * LOG2E).contiguous(), delta.float().contiguous()

    def grid(meta):
        return (cdiv(n, meta["BLOCK_M"]), B * hq)

    _key_mass_kernel[grid](
        q, k, t, lse, delta, mass,
        kv_num, kv_idx, full_num, full_idx,
        *q.stride(), *k.stride(), *t.stride(),
        *kv_num.stride(), *kv_idx.stride(), *full_num.stride(), *full_idx.stride(),
        scale * LOG2E, n, hq,
        hq // hkv, hq // hs,
        t.shape[0] > 1, hs > 1, kv_num.shape[0] > 1, kv_num.shape[1] > 1,
        BLOCK_N=BLOCK, D=d, EVEN=n % BLOCK == 0,
    )
    return mass


if triton is not None:

    _LOG2E = tl.constexpr(LOG2E)

    @triton.jit
    def _row_terms(LSE, DELTA, row0, offs_m, rows):
        # lse (base 2) and Δ of some query rows; rows past the end or with no key get lse = +inf (P = 0)
        lse = tl.load(LSE + row0 + offs_m, mask=rows, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        return lse, tl.load(DELTA + row0 + offs_m, mask=rows, other=0.0)

    @triton.jit
    def _bias_row(T, b, hs, stb, sth, T_BATCH: tl.constexpr, T_HEADS: tl.constexpr):
        # the start of bias row (batch b, bias head hs); a bias shared over the batch or the heads
        # (T_BATCH / T_HEADS false) has one row there
        row = T
        if T_BATCH:
            row += b * stb
        if T_HEADS:
            row += hs * sth
        return row

    @triton.jit
    def _probabilities(q, k, t, lse, offs_m, offs_n, n, scale, CAUSAL: tl.constexpr, EVEN: tl.constexpr):
        # P = exp2(scale · q kᵀ + t − lse) of a tile (scale, t, lse in base 2), 0 for keys past the
        # end (unless EVEN: n is a multiple of the block) and after the query if CAUSAL
        s = tl.dot(q, tl.trans(k)) * scale + t[None, :] - lse[:, None]
        if CAUSAL:
            keep = offs_n[None, :] <= offs_m[:, None]
            if not EVEN:
                keep = keep & (offs_n < n)[None, :]
            return tl.where(keep, tl.exp2(s), 0.0)
        if EVEN:
            return tl.exp2(s)
        return tl.where((offs_n < n)[None, :], tl.exp2(s), 0.0)

    @triton.jit
    def _row(acc_base, q, k_ptrs, skn, t_base, stn, lse, delta, offs_m, n, scale, num_ptr, idx_ptr, s_idx,
             CAUSAL: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr):
        # add the column sums of P·Δ over the key blocks listed at idx_ptr (num_ptr of them)
        for j in range(0, tl.load(num_ptr)):
            offs_n = tl.load(idx_ptr + j * s_idx) * BLOCK_N + tl.arange(0, BLOCK_N)
            in_range = offs_n < n
            k = tl.load(k_ptrs + offs_n[:, None] * skn, mask=in_range[:, None], other=0.0)
            t = tl.load(t_base + offs_n * stn, mask=in_range, other=0.0).to(tl.float32) * _LOG2E
            p = _probabilities(q, k, t, lse, offs_m, offs_n, n, scale, CAUSAL, EVEN)
            tl.atomic_add(acc_base + offs_n, tl.sum(p * delta[:, None], 0), mask=in_range)

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=st)
            for bm in (64, 128) for w in (4, 8) for st in (2, 3)
        ],
        key=["D", "GROUP_KV"],
        reset_to_zero=["MASS"],  # the kernel accumulates: each timed trial starts from zeros
    )
    @triton.jit
    def _key_mass_kernel(
        Q, K, T, LSE, DELTA, MASS,
        KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, stb, sth, stn,
        snb, snh, snq, sib, sih, siq, sik, sfb, sfh, sfq, sjb, sjh, sjq, sjk,
        scale, n, hq,
        GROUP_KV, GROUP_T,
        T_BATCH: tl.constexpr, T_HEADS: tl.constexpr, BM_BATCH: tl.constexpr, BM_HEADS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, EVEN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        qb = pid * BLOCK_M // BLOCK_N  # the BlockMask row (query block of BLOCK_N) of this tile
        bh = tl.program_id(1)
        b = bh // hq
        h = bh % hq
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        rows = offs_m < n
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=rows[:, None], other=0.0)
        lse, delta = _row_terms(LSE, DELTA, bh * n, offs_m, rows)
        k_base = K + b * skb + (h // GROUP_KV) * skh
        t_base = _bias_row(T, b, h // GROUP_T, stb, sth, T_BATCH, T_HEADS)
        bm_b = b if BM_BATCH else 0
        bm_h = h if BM_HEADS else 0
        acc_base = MASS + bh * n
        k_ptrs = k_base + offs_d[None, :] * skd
        # full blocks (no mask), then partial blocks (causal)
        _row(acc_base, q, k_ptrs, skn, t_base, stn, lse, delta, offs_m, n, scale,
             FULL_NUM + bm_b * sfb + bm_h * sfh + qb * sfq, FULL_IDX + bm_b * sjb + bm_h * sjh + qb * sjq, sjk,
             CAUSAL=False, EVEN=EVEN, BLOCK_N=BLOCK_N)
        _row(acc_base, q, k_ptrs, skn, t_base, stn, lse, delta, offs_m, n, scale,
             KV_NUM + bm_b * snb + bm_h * snh + qb * snq, KV_IDX + bm_b * sib + bm_h * sih + qb * siq, sik,
             CAUSAL=True, EVEN=EVEN, BLOCK_N=BLOCK_N)
