"""A fused backward for block-sparse attention with a per-key bias (Triton, CUDA): ``dq``, ``dk``,
``dv`` and the bias gradient ``dt`` in one kernel, with no extra pass for ``dt``.

FlexAttention's backward can give a captured bias its gradient only through one atomic add per
score; the closed form (:mod:`.key_bias`) needs a second pass over the scores. Here the bias
gradient is a by-product of the ``dK``/``dV`` programs: each owns one key block, already has
``dS`` for every query that reads it, and sums it over those queries (``dt_j = Σ_i dS_ij``), the
way it sums ``dSᵀ q`` into ``dK``. The ``dQ`` programs (one per query block) run in the same
launch, after the key-block programs of their KV head, so they fill the gaps that unevenly read
key blocks leave. With few KV heads the grid is too small for that: the lists of the most-read
key blocks (block top-k's best-ranked blocks are read by nearly every later query block) are then
split over programs of a few entries each that add into float32 outputs (options ``split_below``
and ``split_chunk``).

Scope (what :func:`supported` checks): a ``BlockMask`` over blocks of 128 whose partial blocks are
causal (``j <= i``: :func:`flexmask.topk_blocks`), self-attention or a run of its rows from a block
boundary (context parallelism's shards), head dim a power of two in
[16, 128], fp16/bf16. The references for its numbers are the float64 tests in
``tests/test_gpu_dma.py`` (bf16, on a GPU) and ``tests/test_fused_bwd.py`` (float32, in Triton's
interpreter).

Its speed against flex's backward is measured in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from ...lowering.layout import cdiv
from .key_mass import BLOCK, LOG2E, kernels_apply, triton

if triton is not None:
    import triton.language as tl

    from .key_mass import _LOG2E, _bias_row, _probabilities, _row_terms

# The kernel's tiles (query rows per step of a key-block program, keys per step of a query-block
# program), warps and stages. An autotuner over 8 candidates (tiles of 32 or 64, 4 or 8 warps, 2 or
# 3 stages) chose these on an H200 in all four shapes measured (2026-11-28: N 32k with Hq/Hkv 16/8
# and 2/1, D 128; N 16k with 16/8, D 64 and 32/8, D 128; split lists or not), 2-7% ahead of the
# next candidate; it cost 22-41 s on a process's first call and a Python pass over ~90 arguments on
# every call (docs/benchmarks.md, "Block top-k's fused backward without an autotuner").
_LAUNCH = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


def supported(q: torch.Tensor, k: torch.Tensor, block_mask: BlockMask | None, q_offset: int = 0) -> bool:
    """Whether :func:`backward` can run for this call: :func:`.key_mass.kernels_apply` with head dims
    up to 128, and queries that are self-attention's rows ``q_offset .. q_offset + Q - 1`` from a
    block boundary on (whole blocks, or up to the last key)."""
    nq, nk = q.shape[2], k.shape[2]
    rows_fit = (
        isinstance(q_offset, int)
        and q_offset % BLOCK == 0
        and q_offset + nq <= nk
        and (nq % BLOCK == 0 or q_offset + nq == nk)
    )
    return rows_fit and kernels_apply(q, block_mask, 128)


def backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
    lse: torch.Tensor, t: torch.Tensor, block_mask: BlockMask, scale: float, split_below: int = 4, chunk: int = 8,
    q_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dt)`` of ``softmax(scale · q kᵀ + t_j) v`` under ``block_mask``.

    Args:
        q, k, v: ``[B, Hq, Q, D]``, ``[B, Hkv, N, D]``, ``[B, Hkv, N, D]``: the queries are the rows
            ``q_offset .. q_offset + Q - 1`` of self-attention over ``N`` positions (``Q = N``: all).
        out, grad_out: ``[B, Hq, Q, D]``; lse: ``[B, Hq, Q]`` natural log (from the forward).
        t: the key bias ``[B|1, Hs, N]`` with ``Hs`` 1 or ``Hkv``.
        split_below: split the most-read key blocks' lists when the grid has fewer key-block
            programs than this per streaming multiprocessor.
        chunk: list entries per program when split.
        q_offset: the first query's position (a multiple of 128; see :func:`supported`). The
            ``BlockMask`` is that of the call: ``Q / 128`` query blocks over ``N / 128`` key blocks.

    Returns:
        ``dq, dk, dv`` in the inputs' dtype and ``dt`` ``[B|1, Hs, N]`` float32.
    """
    q, k, v, grad_out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, grad_out))
    B, hq, nq, d = q.shape
    hkv, hs, n = k.shape[1], t.shape[1], k.shape[2]
    delta = torch.mul(grad_out, out).sum(-1, dtype=torch.float32).contiguous()
    lse = (lse.float() * LOG2E).contiguous()
    dq = torch.empty_like(q)
    dt = torch.zeros(t.shape, device=q.device, dtype=torch.float32)
    bm = block_mask
    if bm.full_kv_num_blocks is not None:
        kv_full, q_full = (bm.full_kv_num_blocks, bm.full_kv_indices), (bm.full_q_num_blocks, bm.full_q_indices)
    else:  # no full blocks: empty lists
        kv_full = (torch.zeros_like(bm.kv_num_blocks), bm.kv_indices)
        q_full = (torch.zeros_like(bm.q_num_blocks), bm.q_indices)
    lists = (bm.q_num_blocks, bm.q_indices, *q_full, bm.kv_num_blocks, bm.kv_indices, *kv_full)
    nb, nbq = cdiv(n, BLOCK), cdiv(nq, BLOCK)
    group = hq // hkv
    # A key block is read by every query block that selected it: with few KV heads the most-read
    # blocks outlast the rest of the grid. Then (SPLIT) each program takes `chunk` entries of one
    # head's list and adds into float32 outputs.
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    split = B * hkv * nb < split_below * sms
    if split:
        dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
        n_dkdv = nb * group * cdiv(nb, chunk)
    else:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        n_dkdv = nb
    # one launch: per KV head, the programs for dK/dV/dt (per key block), then group·nb programs for
    # dQ (per query block), so the dQ work fills the gaps the unevenly loaded key blocks leave
    _backward_kernel[(n_dkdv + nbq * group, B * hkv)](
        q, k, v, grad_out, lse, delta, t, dq, dk, dv, dt, *lists,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *t.stride(), *dt.stride(),
        *dq.stride(), *dk.stride(), *dv.stride(),
        *(stride for x in lists for stride in x.stride()),
        scale * LOG2E, scale, n, nb, nq, nbq, q_offset, n_dkdv, hq, hkv, group, hkv // hs if hs > 1 else 1, hq // hs,
        T_BATCH=t.shape[0] > 1, T_HEADS=hs > 1, BM_BATCH=bm.kv_num_blocks.shape[0] > 1,
        BM_HEADS=bm.kv_num_blocks.shape[1] > 1, D=d, BLOCK=BLOCK, EVEN=n % BLOCK == 0, SPLIT=split, CHUNK=chunk,
        **_LAUNCH,
    )
    if split:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv, dt


if triton is not None:

    @triton.jit
    def _dkdv_rows(q_base, do_base, LSE, DELTA, row0, sqn, sdon, k, v, t, offs_n, offs_d, n, qoff, scale2,
                   lo, hi, idx_ptr, s_idx, dk, dv, dt,
                   CAUSAL: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
        # the query blocks idx_ptr[lo:hi], BLOCK_M rows at a time, in one flat loop (Triton
        # pipelines the innermost loop only). Rows are absolute positions (the call's + qoff);
        # q_base, do_base and row0 are shifted back by qoff.
        per_block: tl.constexpr = BLOCK // BLOCK_M
        for it in range(lo * per_block, hi * per_block):
            start = tl.load(idx_ptr + (it // per_block) * s_idx) * BLOCK + (it % per_block) * BLOCK_M + qoff
            offs_m = start + tl.arange(0, BLOCK_M)
            rows = offs_m < n
            if EVEN:
                q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :])
                do = tl.load(do_base + offs_m[:, None] * sdon + offs_d[None, :])
            else:
                q = tl.load(q_base + offs_m[:, None] * sqn + offs_d[None, :], mask=rows[:, None], other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdon + offs_d[None, :], mask=rows[:, None], other=0.0)
            lse, delta = _row_terms(LSE, DELTA, row0, offs_m, rows)
            # keys x queries; padded rows have lse = +inf, so P = 0 there
            p_t = tl.exp2(tl.dot(k, tl.trans(q)) * scale2 + t[:, None] - lse[None, :])
            if CAUSAL:
                p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
            dt += tl.sum(ds_t, 1)
        return dk, dv, dt

    @triton.jit
    def _dq_cols(q, do, lse, delta, k_base, v_base, t_base, skn, svn, stn, offs_m, offs_d, n, scale2,
                 num_ptr, idx_ptr, s_idx, dq,
                 CAUSAL: tl.constexpr, EVEN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
        # the key blocks listed at idx_ptr (num_ptr of them), BLOCK_N keys at a time, in one flat loop
        per_block: tl.constexpr = BLOCK // BLOCK_N
        for it in range(0, tl.load(num_ptr) * per_block):
            start = tl.load(idx_ptr + (it // per_block) * s_idx) * BLOCK + (it % per_block) * BLOCK_N
            offs_n = start + tl.arange(0, BLOCK_N)
            cols = offs_n < n
            if EVEN:
                k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :])
                v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :])
                t = tl.load(t_base + offs_n * stn).to(tl.float32) * _LOG2E
            else:
                k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=cols[:, None], other=0.0)
                v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=cols[:, None], other=0.0)
                t = tl.load(t_base + offs_n * stn, mask=cols, other=0.0).to(tl.float32) * _LOG2E
            p = _probabilities(q, k, t, lse, offs_m, offs_n, n, scale2, CAUSAL, EVEN)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        return dq

    @triton.jit
    def _dkdv_program(Q, K, V, DO, LSE, DELTA, T, DK, DV, DT, Q_NUM, Q_IDX, FULLQ_NUM, FULLQ_IDX,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, stb, sth, stn,
                      sdtb, sdth, sdtn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                      snb, snh, snk, sib, sih, sik, siq, sfb, sfh, sfk, sjb, sjh, sjk, sjq,
                      scale2, scale, n, nq, qoff, kb, b, hk, g0, g1, part, hq, GROUP, GROUP_T,
                      T_BATCH: tl.constexpr, T_HEADS: tl.constexpr, BM_BATCH: tl.constexpr,
                      BM_HEADS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                      EVEN: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr):
        # one key block of one KV head: dK, dV and the bias gradient over the queries of heads
        # g0..g1-1 of its group that read it; if SPLIT, only the part-th CHUNK of those (one head),
        # added atomically to float32 outputs
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        cols = offs_n < n
        bm_b = b if BM_BATCH else 0
        work = 1
        if SPLIT:  # programs past the end of their head's list have nothing to do
            bm_h0 = hk * GROUP + g0 if BM_HEADS else 0
            listed = tl.load(FULLQ_NUM + bm_b * sfb + bm_h0 * sfh + kb * sfk) + tl.load(
                Q_NUM + bm_b * snb + bm_h0 * snh + kb * snk)
            work = listed > part * CHUNK
        if work:
            k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], mask=cols[:, None],
                        other=0.0)
            v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], mask=cols[:, None],
                        other=0.0)
            t_base = _bias_row(T, b, hk // GROUP_T, stb, sth, T_BATCH, T_HEADS)
            dt_base = _bias_row(DT, b, hk // GROUP_T, sdtb, sdth, T_BATCH, T_HEADS)
            t = tl.load(t_base + offs_n * stn, mask=cols, other=0.0).to(tl.float32) * _LOG2E
            dk = tl.zeros([BLOCK, D], dtype=tl.float32)
            dv = tl.zeros([BLOCK, D], dtype=tl.float32)
            dt = tl.zeros([BLOCK], dtype=tl.float32)
            for g in range(g0, g1):
                h = hk * GROUP + g
                bm_h = h if BM_HEADS else 0
                q_base = Q + b * sqb + h * sqh - qoff * sqn
                do_base = DO + b * sob + h * soh - qoff * son
                row0 = (b * hq + h) * nq - qoff
                n_full = tl.load(FULLQ_NUM + bm_b * sfb + bm_h * sfh + kb * sfk)
                n_part = tl.load(Q_NUM + bm_b * snb + bm_h * snh + kb * snk)
                if SPLIT:  # entries [lo, hi) of the full list followed by the partial one
                    lo = part * CHUNK
                    hi = lo + CHUNK
                    full_lo, full_hi = tl.minimum(lo, n_full), tl.minimum(hi, n_full)
                    part_lo = tl.minimum(tl.maximum(lo - n_full, 0), n_part)
                    part_hi = tl.minimum(tl.maximum(hi - n_full, 0), n_part)
                else:
                    full_lo, full_hi, part_lo, part_hi = 0, n_full, 0, n_part
                dk, dv, dt = _dkdv_rows(q_base, do_base, LSE, DELTA, row0, sqn, son, k, v, t, offs_n, offs_d,
                                        n, qoff, scale2, full_lo, full_hi,
                                        FULLQ_IDX + bm_b * sjb + bm_h * sjh + kb * sjk,
                                        sjq, dk, dv, dt, CAUSAL=False, EVEN=EVEN, BLOCK=BLOCK, BLOCK_M=BLOCK_M)
                dk, dv, dt = _dkdv_rows(q_base, do_base, LSE, DELTA, row0, sqn, son, k, v, t, offs_n, offs_d,
                                        n, qoff, scale2, part_lo, part_hi,
                                        Q_IDX + bm_b * sib + bm_h * sih + kb * sik,
                                        siq, dk, dv, dt, CAUSAL=True, EVEN=EVEN, BLOCK=BLOCK, BLOCK_M=BLOCK_M)
            dk_ptrs = DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :]
            dv_ptrs = DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :]
            if SPLIT:
                tl.atomic_add(dk_ptrs, dk * scale, mask=cols[:, None])
                tl.atomic_add(dv_ptrs, dv, mask=cols[:, None])
            else:
                tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=cols[:, None])
                tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=cols[:, None])
            tl.atomic_add(dt_base + offs_n * sdtn, dt, mask=cols)  # heads/batch sharing one bias row add up

    @triton.jit
    def _dq_program(Q, K, V, DO, LSE, DELTA, T, DQ, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, stb, sth, stn, sdqb, sdqh, sdqn,
                    snb, snh, snq, sib, sih, siq, sik, sfb, sfh, sfq, sjb, sjh, sjq, sjk,
                    scale2, scale, n, nq, qoff, qb, b, h, hq, GROUP, GROUP_TQ,
                    T_BATCH: tl.constexpr, T_HEADS: tl.constexpr, BM_BATCH: tl.constexpr,
                    BM_HEADS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                    EVEN: tl.constexpr):
        # one query block (the call's qb-th) of one query head: dQ over the key blocks it reads;
        # offs_m are absolute positions, local ones are offs_m - qoff
        offs_m = qb * BLOCK + qoff + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        rows = offs_m < n
        local = offs_m - qoff
        q = tl.load(Q + b * sqb + h * sqh + local[:, None] * sqn + offs_d[None, :], mask=rows[:, None], other=0.0)
        do = tl.load(DO + b * sob + h * soh + local[:, None] * son + offs_d[None, :], mask=rows[:, None],
                     other=0.0)
        lse, delta = _row_terms(LSE, DELTA, (b * hq + h) * nq - qoff, offs_m, rows)
        k_base = K + b * skb + (h // GROUP) * skh
        v_base = V + b * svb + (h // GROUP) * svh
        t_base = _bias_row(T, b, h // GROUP_TQ, stb, sth, T_BATCH, T_HEADS)
        bm_b = b if BM_BATCH else 0
        bm_h = h if BM_HEADS else 0
        dq = tl.zeros([BLOCK, D], dtype=tl.float32)
        dq = _dq_cols(q, do, lse, delta, k_base, v_base, t_base, skn, svn, stn, offs_m, offs_d, n, scale2,
                      FULL_NUM + bm_b * sfb + bm_h * sfh + qb * sfq, FULL_IDX + bm_b * sjb + bm_h * sjh + qb * sjq,
                      sjk, dq, CAUSAL=False, EVEN=EVEN, BLOCK=BLOCK, BLOCK_N=BLOCK_N)
        dq = _dq_cols(q, do, lse, delta, k_base, v_base, t_base, skn, svn, stn, offs_m, offs_d, n, scale2,
                      KV_NUM + bm_b * snb + bm_h * snh + qb * snq, KV_IDX + bm_b * sib + bm_h * sih + qb * siq,
                      sik, dq, CAUSAL=True, EVEN=EVEN, BLOCK=BLOCK, BLOCK_N=BLOCK_N)
        tl.store(DQ + b * sdqb + h * sdqh + local[:, None] * sdqn + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=rows[:, None])

    @triton.jit
    def _backward_kernel(
        Q, K, V, DO, LSE, DELTA, T, DQ, DK, DV, DT,
        Q_NUM, Q_IDX, FULLQ_NUM, FULLQ_IDX, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
        stb, sth, stn, sdtb, sdth, sdtn,
        sdqb, sdqh, sdqn, sdqd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
        s1b, s1h, s1k, s2b, s2h, s2k, s2q, s3b, s3h, s3k, s4b, s4h, s4k, s4q,
        s5b, s5h, s5q, s6b, s6h, s6q, s6k, s7b, s7h, s7q, s8b, s8h, s8q, s8k,
        scale2, scale, n, nb, nq, nbq, qoff, n_dkdv, hq, hkv, GROUP, GROUP_T, GROUP_TQ,
        T_BATCH: tl.constexpr, T_HEADS: tl.constexpr, BM_BATCH: tl.constexpr, BM_HEADS: tl.constexpr,
        D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
        SPLIT: tl.constexpr, CHUNK: tl.constexpr,
    ):
        # the last dimension of every tensor is contiguous (the wrapper makes it so)
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // hkv
        hk = bh % hkv
        if pid < n_dkdv:
            if SPLIT:  # program (key block, head of the group, part of its list)
                g0 = (pid // nb) % GROUP
                g1 = g0 + 1
                part = pid // nb // GROUP
            else:
                g0, g1, part = 0, GROUP, 0
            _dkdv_program(Q, K, V, DO, LSE, DELTA, T, DK, DV, DT, Q_NUM, Q_IDX, FULLQ_NUM, FULLQ_IDX,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, stb, sth, stn,
                          sdtb, sdth, sdtn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                          s1b, s1h, s1k, s2b, s2h, s2k, s2q, s3b, s3h, s3k, s4b, s4h, s4k, s4q,
                          scale2, scale, n, nq, qoff, pid % nb, b, hk, g0, g1, part, hq, GROUP, GROUP_T,
                          T_BATCH, T_HEADS, BM_BATCH, BM_HEADS, D, BLOCK, BLOCK_M, EVEN, SPLIT, CHUNK)
        else:
            rest = pid - n_dkdv
            _dq_program(Q, K, V, DO, LSE, DELTA, T, DQ, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, stb, sth, stn,
                        sdqb, sdqh, sdqn,
                        s5b, s5h, s5q, s6b, s6h, s6q, s6k, s7b, s7h, s7q, s8b, s8h, s8q, s8k,
                        scale2, scale, n, nq, qoff, rest % nbq, b, hk * GROUP + rest // nbq, hq, GROUP, GROUP_TQ,
                        T_BATCH, T_HEADS, BM_BATCH, BM_HEADS, D, BLOCK, BLOCK_N, EVEN)
