"""The token top-k forward and backward for Hopper (sm_90), warp-specialised in Gluon (Triton's
tile-level dialect).

Same contract as the Triton kernels of :mod:`flexmask.backends.triton.token_gather` (the kept-key
lists, their unmasked chunks first, the per-key bias, the rule ``j <= i < e_j`` on the rest, the
natural-log logsumexp; the gradients of ``q``, ``k``, ``v`` and the bias) for the layouts DMA uses:
query heads in pairs that share one KV head, one selection head and one bias head (a GQA group of
2, or of 4, 6, ... with its selection and bias heads shared by pairs at least). One program per
(query block, pair of query heads) has three partitions of 4 warps:

- a producer gathers each chunk's rows of ``K`` and ``V``, and the chunk's list entries, interval
  ends and biases, by index with ``cp.async`` into a ring of shared-memory stages, each signalled by
  an mbarrier when its copies land;
- two consumers, one per query head of the pair (64 queries each), run the chunk's products on the
  tensor cores (``wgmma``) from those stages, then free the stage. Forward: the scores, the online
  softmax in registers, the output. Backward: the scores and ``dP`` (in flight together), ``dQ`` in
  registers; each writes its head's ``P`` and ``dS`` to shared memory, then one consumer adds the
  pair's ``dV`` and the other the pair's ``dK`` (one atomic per key row and chunk).

So the copies, one consumer's products and the other's softmax overlap. On an H200 the forward takes
1.40 ms where the Triton forward takes 1.90 (32k, Hq 16 / Hkv 8, w 2048); the Triton kernel reading
contiguous rows instead of gathered ones takes 1.84, so the gain is this overlap, not a cheaper
gather (``docs/benchmarks.md``, "The token forward on Hopper, in Gluon"). The backward takes 6.02 ms
where the Triton backward takes 6.31 (same call, including zeroing ``dK``, ``dV``, ``dT``).
"""

from __future__ import annotations

import torch

from ...lowering.layout import hopper

try:  # Gluon ships with Triton (3.6 with torch 2.11; compiles with 3.6 to 3.9); CPU-only installs have neither
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # pragma: no cover - depends on the install
    gluon = None

LOG2E = 1.4426950408889634
BLOCK_M = 64  # queries of a block: one consumer's rows (a warpgroup's wgmma has 64 rows)
BACKWARD_BLOCK_N = 64  # keys of a backward chunk: 128 would need 334 KB of shared memory (227 KB on sm_90)


def supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: dict, block_m: int, block_n: int, backward: bool = False
) -> bool:
    """Whether :func:`forward` (or with ``backward``, :func:`backward`) runs this call: Gluon
    present, an sm_90 GPU, 16-bit inputs, a head dim of 64 or 128, query blocks of 64, query heads
    whose pairs share their KV, selection and bias heads (``heads`` from ``_launch_args``), ``q``,
    ``k``, ``v`` at 16-byte aligned addresses (the gathers copy 16 bytes a thread), and chunks of
    64 or 128 keys forward, 64 backward (0: the kernel's own)."""
    return (
        gluon is not None
        and hopper(q.device)
        and q.dtype in (torch.float16, torch.bfloat16)
        and heads["G"] % 2 == 0  # pairs of consecutive heads share a KV head,
        and heads["HS_DIV"] % 2 == 0  # a selection head
        and heads["T_HEADS_DIV"] % 2 == 0  # and a bias head
        and heads["D"] in (64, 128)
        and block_m == BLOCK_M
        and all(x.data_ptr() % 16 == 0 for x in (q, k, v))
        and block_n in ((0, BACKWARD_BLOCK_N) if backward else (0, 64, 128))
    )


if gluon is not None:
    _LOG2E = gl.constexpr(LOG2E)
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared  # renamed in triton 3.9
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed after triton 3.6

    @gluon.jit
    def _block(CNT, N, CAP, NQB, HQ: gl.constexpr, G: gl.constexpr, HS_DIV: gl.constexpr):
        """This program's query block, batch, first query head of the pair, KV head, selection row, and
        its list (offset, entries every query keeps, length)."""
        m = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // (HQ // 2)
        first = (bh % (HQ // 2)) * 2
        hkv = first // G
        row = (b * (HQ // HS_DIV) + first // HS_DIV).to(gl.int64)
        n_full = gl.load(CNT + (row * NQB + m) * 2)
        count = gl.load(CNT + (row * NQB + m) * 2 + 1)
        return m, b, first, hkv, row, (row * NQB + m) * CAP, n_full, count

    @gluon.jit
    def _entries(c, n_full, CAP):
        """List slots of entries ``c``: those kept by every query from the front, the rest from the end."""
        return gl.where(c < n_full, c, CAP - 1 - (c - n_full))

    @gluon.jit
    def _stages(dtype: gl.constexpr, D: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr):
        """The ring of shared-memory stages the producer fills and the consumers read: per stage a
        chunk's ``K`` and ``V`` rows, list entries, interval ends and biases, and its two mbarriers."""
        rows_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)
        keys_s: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        kb = gl.allocate_shared_memory(dtype, [STAGES, BN, D], rows_s)
        vb = gl.allocate_shared_memory(dtype, [STAGES, BN, D], rows_s)
        jb = gl.allocate_shared_memory(gl.int32, [STAGES, BN], keys_s)
        eb = gl.allocate_shared_memory(gl.int32, [STAGES, BN], keys_s)
        tb = gl.allocate_shared_memory(gl.float32, [STAGES, BN], keys_s)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=128)  # each producer thread's copies arrive (no increment)
            mbarrier.init(free.index(s), count=2)  # both consumers release the stage
        return kb, vb, jb, eb, tb, ready, free

    @gluon.jit
    def _producer(
        K, V, T, E, LIST, CNT, N, CAP, NQB, kb, vb, jb, eb, tb, ready, free,
        HQ: gl.constexpr, G: gl.constexpr, HS_DIV: gl.constexpr, T_HEADS_DIV: gl.constexpr, T_BATCH: gl.constexpr,
        HAS_T: gl.constexpr, D: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        rows_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])  # 16 B a thread
        keys_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        m, b, first, hkv, row, list_base, n_full, count = _block(CNT, N, CAP, NQB, HQ, G, HS_DIV)
        kv_base = (b * (HQ // G) + hkv).to(gl.int64) * N * D
        t_row = ((b % T_BATCH) * (HQ // T_HEADS_DIV) + first // T_HEADS_DIV).to(gl.int64) * N
        r = gl.arange(0, BN, gl.SliceLayout(1, rows_l))
        d = gl.arange(0, D, gl.SliceLayout(0, rows_l))
        c1 = gl.arange(0, BN, keys_l)
        for chunk in range(gl.cdiv(count, BN)):
            s = chunk % STAGES
            mbarrier.wait(free.index(s), ((chunk // STAGES) & 1) ^ 1)
            c = chunk * BN + r
            j = gl.load(LIST + list_base + _entries(c, n_full, CAP), mask=c < count, other=0)  # 0: a valid row
            off = kv_base + j.to(gl.int64)[:, None] * D + d[None, :]
            _async_load(kb.index(s), K + off)
            _async_load(vb.index(s), V + off)
            c = chunk * BN + c1
            listed = c < count
            _async_load(jb.index(s), LIST + list_base + _entries(c, n_full, CAP), mask=listed)
            j = gl.load(LIST + list_base + _entries(c, n_full, CAP), mask=listed, other=0)
            # entries past the list copy nothing (stale or unset values): the consumers mask them by c < count
            _async_load(eb.index(s), E + row * N + j, mask=listed)
            if HAS_T:
                _async_load(tb.index(s), T + t_row + j, mask=listed)
            cp.mbarrier_arrive(ready.index(s), increment_count=False)  # once this thread's copies land

    @gluon.jit
    def _consumer(
        Q, O, LSE, CNT, qk_scale, N, CAP, NQB, kb, vb, jb, eb, tb, ready, free,
        W: gl.constexpr, HQ: gl.constexpr, G: gl.constexpr, HS_DIV: gl.constexpr, HAS_T: gl.constexpr, D: gl.constexpr,
        BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        m, b, first, hkv, row, list_base, n_full, count = _block(CNT, N, CAP, NQB, HQ, G, HS_DIV)
        head = first + W
        io_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])
        s_l: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, BN, 16])  # scores, a chunk
        o_l: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, D, 16])  # output rows
        p_l: gl.constexpr = gl.DotOperandLayout(0, o_l, 2)  # probabilities as the second product's A
        i_io = m * BM + gl.arange(0, BM, gl.SliceLayout(1, io_l))
        d_io = gl.arange(0, D, gl.SliceLayout(0, io_l))
        q_rows = ((b * HQ + head).to(gl.int64) * N + i_io) * D
        q = gl.load(Q + q_rows[:, None] + d_io[None, :], mask=(i_io < N)[:, None], other=0.0)
        q_s = gl.allocate_shared_memory(q.dtype, [BM, D], gl.NVMMASharedLayout.get_default_for([BM, D], q.dtype), q)
        fence_async_shared()
        i = m * BM + gl.arange(0, BM, gl.SliceLayout(1, s_l))
        cols = gl.arange(0, BN, gl.SliceLayout(0, s_l))
        m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_l))
        l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_l))
        acc = gl.zeros([BM, D], gl.float32, o_l)
        whole = (n_full - n_full % BN) // BN  # chunks before this hold keys every query of the block keeps
        for chunk in range(gl.cdiv(count, BN)):
            s = chunk % STAGES
            mbarrier.wait(ready.index(s), (chunk // STAGES) & 1)
            fence_async_shared()
            x = warpgroup_mma(q_s, kb.index(s).permute((1, 0)), gl.zeros([BM, BN], gl.float32, s_l)) * qk_scale
            if HAS_T:
                x = x + (tb.index(s).load(gl.SliceLayout(0, s_l)) * _LOG2E)[None, :]
            if chunk >= whole:
                j = jb.index(s).load(gl.SliceLayout(0, s_l))
                e = eb.index(s).load(gl.SliceLayout(0, s_l))
                keep = (chunk * BN + cols < count)[None, :] & (j[None, :] <= i[:, None]) & (i[:, None] < e[None, :])
                x = gl.where(keep, x, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(x, 1))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(x - m_safe[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None]
            acc = warpgroup_mma(gl.convert_layout(p.to(q.dtype), p_l), vb.index(s), acc)
            mbarrier.arrive(free.index(s))
            m_i = m_new
        alive = l_i > 0
        out = acc / gl.convert_layout(gl.where(alive, l_i, 1.0), gl.SliceLayout(1, o_l))[:, None]
        i_o = m * BM + gl.arange(0, BM, gl.SliceLayout(1, o_l))
        d_o = gl.arange(0, D, gl.SliceLayout(0, o_l))
        o_rows = ((b * HQ + head).to(gl.int64) * N + i_o) * D
        gl.store(O + o_rows[:, None] + d_o[None, :], out.to(O.dtype.element_ty), mask=(i_o < N)[:, None])
        lse = gl.where(alive, (m_i + gl.log2(gl.where(alive, l_i, 1.0))) / _LOG2E, float("inf"))
        gl.store(LSE + (b * HQ + head).to(gl.int64) * N + i, lse, mask=i < N)

    @gluon.jit
    def _fwd(
        Q, K, V, T, E, LIST, CNT, O, LSE, qk_scale, N, CAP, NQB,
        HQ: gl.constexpr, G: gl.constexpr, HS_DIV: gl.constexpr, T_HEADS_DIV: gl.constexpr, T_BATCH: gl.constexpr,
        HAS_T: gl.constexpr, D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """Grid ``(query blocks, B · Hq / 2)`` (one program a pair of query heads), 4 warps (the first
        consumer) plus two 4-warp workers."""
        kb, vb, jb, eb, tb, ready, free = _stages(K.dtype.element_ty, D, BN, STAGES)
        gl.warp_specialize(
            [
                (_consumer, (Q, O, LSE, CNT, qk_scale, N, CAP, NQB, kb, vb, jb, eb, tb, ready, free,
                             0, HQ, G, HS_DIV, HAS_T, D, BM, BN, STAGES)),
                (_consumer, (Q, O, LSE, CNT, qk_scale, N, CAP, NQB, kb, vb, jb, eb, tb, ready, free,
                             1, HQ, G, HS_DIV, HAS_T, D, BM, BN, STAGES)),
                (_producer, (K, V, T, E, LIST, CNT, N, CAP, NQB, kb, vb, jb, eb, tb, ready, free,
                             HQ, G, HS_DIV, T_HEADS_DIV, T_BATCH, HAS_T, D, BN, STAGES)),
            ],
            [4, 4],
            [232, 56],
        )  # fmt: skip

    @gluon.jit
    def _bwd_consumer(
        Q, O, DO, LSE, DQ, DK, DV, DT, CNT, qk_scale, sm_scale, N, CAP, NQB,
        kb, vb, jb, eb, tb, ready, free, q_s, do_s, p_s, ds_s, pds_full, pds_free,
        W: gl.constexpr, HQ: gl.constexpr, G: gl.constexpr, HS_DIV: gl.constexpr, T_HEADS_DIV: gl.constexpr,
        T_BATCH: gl.constexpr, HAS_T: gl.constexpr, T_GRAD: gl.constexpr, D: gl.constexpr, BM: gl.constexpr,
        BN: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """One query head of the pair: per chunk its scores and ``dP`` (both products in flight at
        once), ``P`` and ``dS``, and its ``dQ`` in registers (that product running while ``P`` and
        ``dS`` go to shared memory); then, from both heads' ``P``/``dS`` halves, ``dV`` (``W == 0``)
        or ``dK`` (``W == 1``) for the pair, added atomically: one atomic per key row and chunk."""
        m, b, first, hkv, row, list_base, n_full, count = _block(CNT, N, CAP, NQB, HQ, G, HS_DIV)
        head = first + W
        io_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])
        s_l: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, BN, 16])  # [BM, BN]
        o_l: gl.constexpr = gl.NVMMADistributedLayout([3, 0], [4, 1], [16, D, 16])  # [BM, D] and [BN, D]
        a_l: gl.constexpr = gl.DotOperandLayout(0, o_l, 2)  # dS as the A operand of dQ += dS K
        i_io = m * BM + gl.arange(0, BM, gl.SliceLayout(1, io_l))
        d_io = gl.arange(0, D, gl.SliceLayout(0, io_l))
        rows = ((b * HQ + head).to(gl.int64) * N + i_io) * D
        live = (i_io < N)[:, None]
        q = gl.load(Q + rows[:, None] + d_io[None, :], mask=live, other=0.0)
        do = gl.load(DO + rows[:, None] + d_io[None, :], mask=live, other=0.0)
        o = gl.load(O + rows[:, None] + d_io[None, :], mask=live, other=0.0)
        delta = gl.convert_layout(gl.sum(do.to(gl.float32) * o.to(gl.float32), 1), gl.SliceLayout(1, s_l))
        q_s.index(W).store(q)
        do_s.index(W).store(do)
        fence_async_shared()
        _barrier()
        i = m * BM + gl.arange(0, BM, gl.SliceLayout(1, s_l))
        lse2 = gl.load(LSE + (b * HQ + head).to(gl.int64) * N + i, mask=i < N, other=float("inf")) * _LOG2E
        cols = gl.arange(0, BN, gl.SliceLayout(0, s_l))
        d_o = gl.arange(0, D, gl.SliceLayout(0, o_l))
        kv_base = (b * (HQ // G) + hkv).to(gl.int64) * N * D
        t_row = ((b % T_BATCH) * (HQ // T_HEADS_DIV) + first // T_HEADS_DIV).to(gl.int64) * N
        dq = gl.zeros([BM, D], gl.float32, o_l)
        whole = (n_full - n_full % BN) // BN
        for chunk in range(gl.cdiv(count, BN)):
            s = chunk % STAGES
            u = chunk % 2  # the P/dS slot
            mbarrier.wait(ready.index(s), (chunk // STAGES) & 1)
            fence_async_shared()
            listed = chunk * BN + cols < count
            j = jb.index(s).load(gl.SliceLayout(0, s_l))
            j_rows = jb.index(s).load(gl.SliceLayout(1, o_l))
            listed_rows = chunk * BN + gl.arange(0, BN, gl.SliceLayout(1, o_l)) < count
            zero = gl.zeros([BM, BN], gl.float32, s_l)
            x = warpgroup_mma(q_s.index(W), kb.index(s).permute((1, 0)), zero, is_async=True)
            dp = warpgroup_mma(do_s.index(W), vb.index(s).permute((1, 0)), zero, is_async=True)
            x, dp = warpgroup_mma_wait(0, deps=[x, dp])
            x = x * qk_scale
            if HAS_T:
                x = x + (tb.index(s).load(gl.SliceLayout(0, s_l)) * _LOG2E)[None, :]
            if chunk >= whole:
                e = eb.index(s).load(gl.SliceLayout(0, s_l))
                keep = listed[None, :] & (j[None, :] <= i[:, None]) & (i[:, None] < e[None, :])
                x = gl.where(keep, x, float("-inf"))
            p = gl.exp2(x - lse2[:, None])  # 0 where masked, and in rows past N or keeping nothing
            ds = p * (dp - delta[:, None])
            ds_a = gl.convert_layout(ds.to(q.dtype), a_l)
            dq = warpgroup_mma(ds_a, kb.index(s), dq, is_async=True)
            if T_GRAD:
                gl.atomic_add(DT + t_row + j, gl.sum(ds, 0), mask=listed, sem="relaxed")
            mbarrier.wait(pds_free.index(u), ((chunk // 2) & 1) ^ 1)
            p_s.index(2 * u + W).store(p.to(q.dtype))
            ds_s.index(2 * u + W).store(ds.to(q.dtype))
            fence_async_shared()
            _barrier()
            dq, ds_a = warpgroup_mma_wait(0, deps=[dq, ds_a])
            mbarrier.arrive(free.index(s))  # the stage is read: K, V and the chunk's entries
            mbarrier.arrive(pds_full.index(u))
            mbarrier.wait(pds_full.index(u), (chunk // 2) & 1)
            acc = gl.zeros([BN, D], gl.float32, o_l)
            if W == 0:  # dV = Σ_heads Pᵀ dO
                acc = warpgroup_mma(p_s.index(2 * u).permute((1, 0)), do_s.index(0), acc)
                acc = warpgroup_mma(p_s.index(2 * u + 1).permute((1, 0)), do_s.index(1), acc)
                out = DV
            else:  # dK = Σ_heads dSᵀ Q · scale
                acc = warpgroup_mma(ds_s.index(2 * u).permute((1, 0)), q_s.index(0), acc)
                acc = warpgroup_mma(ds_s.index(2 * u + 1).permute((1, 0)), q_s.index(1), acc)
                acc = acc * sm_scale
                out = DK
            mbarrier.arrive(pds_free.index(u))
            ptrs = out + kv_base + j_rows.to(gl.int64)[:, None] * D + d_o[None, :]
            gl.atomic_add(ptrs, acc, mask=listed_rows[:, None], sem="relaxed")
        i_o = m * BM + gl.arange(0, BM, gl.SliceLayout(1, o_l))
        o_rows = ((b * HQ + head).to(gl.int64) * N + i_o) * D
        gl.store(DQ + o_rows[:, None] + d_o[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=(i_o < N)[:, None])

    @gluon.jit
    def _bwd(
        Q, K, V, T, E, LIST, CNT, O, DO, LSE, DQ, DK, DV, DT, qk_scale, sm_scale, N, CAP, NQB,
        HQ: gl.constexpr, G: gl.constexpr, HS_DIV: gl.constexpr, T_HEADS_DIV: gl.constexpr, T_BATCH: gl.constexpr,
        HAS_T: gl.constexpr, T_GRAD: gl.constexpr, D: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
        STAGES: gl.constexpr,
    ):  # fmt: skip
        """Grid ``(query blocks, B · Hq / 2)``: the forward's producer and two backward consumers."""
        dtype: gl.constexpr = K.dtype.element_ty
        kb, vb, jb, eb, tb, ready, free = _stages(dtype, D, BN, STAGES)
        q_s = gl.allocate_shared_memory(dtype, [2, BM, D], gl.NVMMASharedLayout.get_default_for([BM, D], dtype))
        do_s = gl.allocate_shared_memory(dtype, [2, BM, D], gl.NVMMASharedLayout.get_default_for([BM, D], dtype))
        p_s = gl.allocate_shared_memory(dtype, [4, BM, BN], gl.NVMMASharedLayout.get_default_for([BM, BN], dtype))
        ds_s = gl.allocate_shared_memory(dtype, [4, BM, BN], gl.NVMMASharedLayout.get_default_for([BM, BN], dtype))
        pds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        pds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for u in gl.static_range(2):
            mbarrier.init(pds_full.index(u), count=2)  # both heads' halves written
            mbarrier.init(pds_free.index(u), count=2)  # both cross products done
        gl.warp_specialize(
            [
                (_bwd_consumer, (Q, O, DO, LSE, DQ, DK, DV, DT, CNT, qk_scale, sm_scale, N, CAP, NQB,
                                 kb, vb, jb, eb, tb, ready, free, q_s, do_s, p_s, ds_s, pds_full, pds_free,
                                 0, HQ, G, HS_DIV, T_HEADS_DIV, T_BATCH, HAS_T, T_GRAD, D, BM, BN, STAGES)),
                (_bwd_consumer, (Q, O, DO, LSE, DQ, DK, DV, DT, CNT, qk_scale, sm_scale, N, CAP, NQB,
                                 kb, vb, jb, eb, tb, ready, free, q_s, do_s, p_s, ds_s, pds_full, pds_free,
                                 1, HQ, G, HS_DIV, T_HEADS_DIV, T_BATCH, HAS_T, T_GRAD, D, BM, BN, STAGES)),
                (_producer, (K, V, T, E, LIST, CNT, N, CAP, NQB, kb, vb, jb, eb, tb, ready, free,
                             HQ, G, HS_DIV, T_HEADS_DIV, T_BATCH, HAS_T, D, BN, STAGES)),
            ],
            [4, 4],
            [232, 56],
        )  # fmt: skip


def forward(q, k, v, t, ends, lists, counts, o, lse, scale: float, heads: dict, block_n: int = 0) -> None:
    """Fill ``o`` and ``lse`` as :func:`.token_gather.triton_forward` does (see :func:`supported` for
    when it applies). ``block_n``: keys of a chunk (0: 128)."""
    B, Hq, N, D = q.shape
    nqb, cap = lists.shape[-2:]
    bn = block_n or 128
    t = None if t is None else t.float()  # the bias's stages hold float32 (cp.async copies 4 bytes or more)
    # No maxnreg: warp_specialize sets the partitions' register budgets; with maxnreg=168 the cubin is the same
    # (triton 3.6 and 3.8), so the option only adds to the launch's arguments.
    _fwd[(nqb, B * Hq // 2)](
        q, k, v, lse if t is None else t, ends, lists, counts, o, lse, scale * LOG2E, N, cap, nqb,
        HQ=Hq, G=heads["G"], HS_DIV=heads["HS_DIV"], T_HEADS_DIV=heads["T_HEADS_DIV"], T_BATCH=heads["T_BATCH"],
        HAS_T=t is not None, D=D, BM=BLOCK_M, BN=bn, STAGES=2 if bn == 128 else 3, num_warps=4,
    )  # fmt: skip


def backward(q, k, v, t, ends, lists, counts, o, do, lse, dq, dk, dv, dt, scale: float, heads: dict) -> None:
    """Fill ``dq`` (like ``q``) and add into ``dk``, ``dv`` (float32, zeroed) and ``dt`` (float32 like
    ``t``, zeroed; empty for no bias gradient) as :func:`.token_gather.triton_backward` does, for the
    calls :func:`supported` admits with ``backward=True``. ``o`` and ``do`` contiguous like ``q``."""
    B, Hq, N, D = q.shape
    nqb, cap = lists.shape[-2:]
    t = None if t is None else t.float()
    _bwd[(nqb, B * Hq // 2)](
        q, k, v, lse if t is None else t, ends, lists, counts, o, do, lse, dq, dk, dv, dt if dt.numel() else lse,
        scale * LOG2E, scale, N, cap, nqb,
        HQ=Hq, G=heads["G"], HS_DIV=heads["HS_DIV"], T_HEADS_DIV=heads["T_HEADS_DIV"], T_BATCH=heads["T_BATCH"],
        HAS_T=t is not None, T_GRAD=dt.numel() > 0, D=D, BM=BLOCK_M, BN=BACKWARD_BLOCK_N, STAGES=2, num_warps=4,
    )  # fmt: skip
