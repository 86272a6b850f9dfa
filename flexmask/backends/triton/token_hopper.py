"""The token top-k forward for Hopper (sm_90), warp-specialised in Gluon (Triton's tile-level dialect).

Same contract as :func:`flexmask.backends.triton.token_gather._fwd` (the kept-key lists, their
unmasked chunks first, the per-key bias, the rule ``j <= i < e_j`` on the rest, the output and the
natural-log logsumexp) for the layouts DMA uses: query heads in pairs that share one KV head, one
selection head and one bias head (a GQA group of 2, or of 4, 6, ... with its selection and bias
heads shared by pairs at least). One program per (query block, pair of query heads) has three
partitions of 4 warps:

- a producer gathers each chunk's rows of ``K`` and ``V``, and the chunk's list entries, interval
  ends and biases, by index with ``cp.async`` into a ring of shared-memory stages, each signalled by
  an mbarrier when its copies land;
- two consumers, one per query head of the pair (64 queries each), run the chunk's two products on
  the tensor cores (``wgmma``) from those stages and the online softmax in registers, then free the
  stage.

So the copies, one consumer's products and the other's softmax overlap. On an H200 the kernel takes
1.40 ms where the Triton forward takes 1.90 (32k, Hq 16 / Hkv 8, w 2048); the Triton kernel reading
contiguous rows instead of gathered ones takes 1.84, so the gain is this overlap, not a cheaper
gather (``docs/benchmarks.md``, "The token forward on Hopper, in Gluon").
"""

from __future__ import annotations

import torch

try:  # Gluon ships with Triton (3.6 with torch 2.11; compiles with 3.6 to 3.9); CPU-only installs have neither
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma
except ImportError:  # pragma: no cover - depends on the install
    gluon = None

LOG2E = 1.4426950408889634
BLOCK_M = 64  # queries of a block: one consumer's rows (a warpgroup's wgmma has 64 rows)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: dict, block_m: int, block_n: int) -> bool:
    """Whether :func:`forward` runs this call: Gluon present, an sm_90 GPU, 16-bit inputs, a head dim
    of 64 or 128, query blocks of 64, query heads whose pairs share their KV, selection and bias heads
    (``heads`` from ``_launch_args``), ``q``,
    ``k``, ``v`` at 16-byte aligned addresses (the gathers copy 16 bytes a thread), and chunks of
    64 or 128 keys (0: the kernel's own)."""
    return (
        gluon is not None
        and q.is_cuda
        and torch.cuda.get_device_capability(q.device) == (9, 0)
        and q.dtype in (torch.float16, torch.bfloat16)
        and heads["G"] % 2 == 0  # pairs of consecutive heads share a KV head,
        and heads["HS_DIV"] % 2 == 0  # a selection head
        and heads["T_HEADS_DIV"] % 2 == 0  # and a bias head
        and heads["D"] in (64, 128)
        and block_m == BLOCK_M
        and all(x.data_ptr() % 16 == 0 for x in (q, k, v))
        and block_n in (0, 64, 128)
    )


if gluon is not None:
    _LOG2E = gl.constexpr(LOG2E)
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared  # renamed in triton 3.9

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
        rows_s: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], K.dtype.element_ty)
        keys_s: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        kb = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BN, D], rows_s)
        vb = gl.allocate_shared_memory(K.dtype.element_ty, [STAGES, BN, D], rows_s)
        jb = gl.allocate_shared_memory(gl.int32, [STAGES, BN], keys_s)
        eb = gl.allocate_shared_memory(gl.int32, [STAGES, BN], keys_s)
        tb = gl.allocate_shared_memory(gl.float32, [STAGES, BN], keys_s)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=128)  # each producer thread's copies arrive (no increment)
            mbarrier.init(free.index(s), count=2)  # both consumers release the stage
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
