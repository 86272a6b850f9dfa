"""Token-level top-k attention that reads each query block's kept keys in place (Triton, CUDA).

Under ``fm.topk(scores, w)`` query ``i`` keeps key ``j`` iff ``j <= i < e_j``, where ``e_j`` is the
key's interval end (:func:`flexmask.lowering.selection.topk_ends`). A block of ``BM`` consecutive
queries therefore keeps at most ``w + BM`` distinct keys: those with ``j < (m + 1)·BM`` and
``e_j > m·BM``. Here each query block gets that list (one scan per row lists the keys some query
keeps, ``e_j > j``, about ``w·(1 + ln(N/w))`` of them for random scores; then one scan per block over
those before its end), and one program per (query block, query heads sharing their KV, selection
and bias heads: up to ``STACK_MOST``) walks it in chunks of ``BN`` keys, loading the keys' rows,
values and biases by index. Most of a block's keys are kept by all of its queries (``j <= m·BM``
and ``e_j`` past the block): the list holds those first, and their chunks need no mask; the rest
(the block's own keys and those whose interval ends inside it) follow, masked by the rule
``j <= i < e_j``.
Nothing is copied and no BlockMask is built.

Backward, the same programs recompute the probabilities (and ``Δ_i = dO_i · O_i`` from their rows of
``dO`` and ``O``, with no pass of its own): ``dQ`` stays in registers, ``dK``/``dV``
and the bias gradient (``Σ_i dS_ij``, summed over the chunk's queries first: one atomic per key and
chunk) are added atomically into float32 buffers.

On Hopper the forward and the backward are :mod:`.token_hopper`'s warp-specialised Gluon kernels
for the calls they support (:func:`.token_hopper.supported`), with the same lists and results.

Under ``torch.compile`` the kernels run as two custom ops (``flexmask::token_gather_fwd`` /
``_bwd``), which it treats as opaque calls; eagerly, as a plain autograd function over the same two
bodies (the ops' dispatch cost more host time per call than the launches).
"""

from __future__ import annotations

import math

import torch

from ...lowering.layout import cdiv
from . import token_hopper

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def kept_lists(ends: torch.Tensor, block: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query block ``m`` of ``block`` queries, the keys it keeps: ``(lists, counts)``,
    ``[R, nqb, cap]`` int32 positions and ``[R, nqb, 2]`` int32, with ``R = B·Hs`` rows of ``ends``
    ``[B, Hs, N]``. ``counts[..., 0]`` keys kept by every query of the block come first, ascending;
    the others (``counts[..., 1]`` in all) fill the list from its end, ascending towards the front;
    zeros between.

    Pure PyTorch reference of the kernels (:func:`_build_lists`), ``O(N² / block)`` per row."""
    b, hs, n = ends.shape
    e = ends.reshape(b * hs, 1, n).long()
    nqb = cdiv(n, block)
    lo = torch.arange(nqb, device=ends.device).view(1, -1, 1) * block
    hi = (lo + block).clamp(max=n)
    j = torch.arange(n, device=ends.device).view(1, 1, -1)
    keep = (j < hi) & (e > lo) & (e > j)  # [R, nqb, N]; e_j = j: a key no query keeps
    full = keep & (j <= lo) & (e >= hi)
    partial = keep & ~full
    slot = torch.where(full, full.cumsum(-1) - 1, cap - partial.cumsum(-1))
    lists = torch.zeros(b * hs, nqb, cap + 1, dtype=torch.int32, device=ends.device)
    lists.scatter_(-1, torch.where(keep, slot, cap), j.expand_as(keep).to(torch.int32))  # column cap: a sink
    counts = torch.stack([full.sum(-1), keep.sum(-1)], -1)
    return lists[..., :cap].contiguous(), counts.to(torch.int32)


if triton is not None:
    from .key_mass import _LOG2E  # the kernels work in base 2

    @triton.jit
    def _ever_kept(E, KEPT, BELOW, N, NQB, BM: tl.constexpr, CHUNK: tl.constexpr):
        """One program per row: the keys some query keeps (``e_j > j``), ascending, and for each query
        block ``m`` how many of them lie before its end (``BELOW``)."""
        row = tl.program_id(0).to(tl.int64)
        total = tl.zeros((), tl.int32)
        for start in range(0, N, CHUNK):
            j = start + tl.arange(0, CHUNK)
            inside = j < N
            e = tl.load(E + row * N + j, mask=inside, other=0)
            ever = (inside & (e > j)).to(tl.int32)
            upto = total + tl.cumsum(ever, 0)  # kept keys at or before j
            tl.store(KEPT + row * N + upto - 1, j, mask=ever == 1)
            block_end = inside & (((j + 1) % BM == 0) | (j == N - 1))
            tl.store(BELOW + row * NQB + j // BM, upto, mask=block_end)
            total += tl.sum(ever, 0)

    @triton.jit
    def _lists(E, KEPT, BELOW, LIST, CNT, N, CAP, NQB, BM: tl.constexpr, CHUNK: tl.constexpr):  # CHUNK < 2**16
        """One program per (query block, row): of the kept keys before the block's end (``j < hi``,
        from :func:`_ever_kept`), those with ``e_j > lo``; the ones kept by every query of the block
        (``j <= lo``, ``e_j >= hi``) from the front, the others from the end (layout of
        :func:`kept_lists`)."""
        m = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        lo = m * BM
        hi = tl.minimum(lo + BM, N)
        n_full = tl.zeros((), tl.int32)
        n_part = tl.zeros((), tl.int32)
        out = LIST + (row * NQB + m) * CAP
        stop = tl.load(BELOW + row * NQB + m)
        for start in range(0, stop, CHUNK):
            c = start + tl.arange(0, CHUNK)
            listed = c < stop
            j = tl.load(KEPT + row * N + c, mask=listed, other=0)
            e = tl.load(E + row * N + j, mask=listed, other=0)
            keep = listed & (e > lo)  # j < hi and e_j > j hold for every listed key
            full = (keep & (j <= lo) & (e >= hi)).to(tl.int32)
            part = keep.to(tl.int32) - full
            both = full + (part << 16)  # one scan for both kinds (a chunk counts at most CHUNK < 2**16)
            before = tl.cumsum(both, 0) - both
            slot = n_full + (before & 0xFFFF)
            tl.store(out + slot, j, mask=(full == 1) & (slot < CAP))
            slot = CAP - 1 - (n_part + (before >> 16))
            tl.store(out + slot, j, mask=(part == 1) & (slot >= 0))
            total = tl.sum(both, 0)
            n_full += total & 0xFFFF
            n_part += total >> 16
        tl.store(CNT + (row * NQB + m) * 2, tl.minimum(n_full, CAP))
        tl.store(CNT + (row * NQB + m) * 2 + 1, tl.minimum(n_full + n_part, CAP))

    @triton.jit
    def _rows(
        CNT, m, bh, N, CAP, NQB,
        HQ: tl.constexpr, G: tl.constexpr, HS_DIV: tl.constexpr, T_HEADS_DIV: tl.constexpr, T_BATCH: tl.constexpr,
        STACK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
    ):  # fmt: skip
        """The program's ``STACK · BM`` query rows: ``STACK`` heads of one KV group (sharing their
        selection and bias heads) times ``BM`` queries. Returns the selection row (of ``E``/``LIST``),
        the bias row's offset, per query row its position and offsets, the KV head's offset, and
        the query block's list (its keys kept by all queries, its length and its offset)."""
        b = bh // (HQ // STACK)
        first = (bh % (HQ // STACK)) * STACK
        hkv = first // G
        r = tl.arange(0, STACK * BM)
        heads = first + r // BM
        i = m * BM + r % BM
        row = (b * (HQ // HS_DIV) + first // HS_DIV).to(tl.int64)
        t_row = ((b % T_BATCH) * (HQ // T_HEADS_DIV) + first // T_HEADS_DIV).to(tl.int64) * N
        q_rows = ((b * HQ + heads).to(tl.int64) * N + i) * D  # offsets of the query rows in Q, O, dO, dQ
        kv_base = ((b * (HQ // G) + hkv).to(tl.int64) * N) * D
        stats = (b * HQ + heads).to(tl.int64) * N + i  # offsets in LSE
        n_full = tl.load(CNT + (row * NQB + m) * 2)
        count = tl.load(CNT + (row * NQB + m) * 2 + 1)
        list_base = (row * NQB + m) * CAP
        return row, t_row, i, q_rows, kv_base, stats, n_full, count, list_base

    @triton.jit
    def _chunk(
        q, K, T, E, LIST, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP, qk_scale,
        HAS_T: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, FULL: tl.constexpr,
    ):  # fmt: skip
        """One chunk of a query block's list: the keys' rows (offsets of ``K``/``V``), their keys, the
        scores in base 2 and which entries are in the list. A ``FULL`` chunk holds keys every query
        of the block keeps; otherwise entries past ``n_full`` are read from the list's end and the
        scores are ``-inf`` where ``j <= i < e_j`` fails."""
        c = start + tl.arange(0, BN)
        in_list = c < count
        if FULL:
            j = tl.load(LIST + list_base + c)
        else:
            j = tl.load(LIST + list_base + tl.where(c < n_full, c, CAP - 1 - (c - n_full)), mask=in_list, other=0)
        rows = kv_base + j[:, None].to(tl.int64) * D + tl.arange(0, D)[None, :]  # the kept keys' rows, gathered
        k = tl.load(K + rows, mask=in_list[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_T:
            s += tl.load(T + t_row + j, mask=in_list, other=0.0).to(tl.float32)[None, :] * _LOG2E
        if not FULL:
            e = tl.load(E + row * N + j, mask=in_list, other=0)
            keep = in_list[None, :] & (j[None, :] <= i[:, None]) & (i[:, None] < e[None, :])
            s = tl.where(keep, s, float("-inf"))
        return j, rows, k, s, in_list

    @triton.jit
    def _fwd_chunk(
        q, K, V, T, E, LIST, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP, qk_scale, m_i, l_i, acc,
        HAS_T: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, FULL: tl.constexpr,
    ):  # fmt: skip
        """The online softmax's running max, sum and output after one chunk."""
        j, rows, k, s, in_list = _chunk(
            q, K, T, E, LIST, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP, qk_scale,
            HAS_T, D, BN, FULL,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        v = tl.load(V + rows, mask=in_list[:, None], other=0.0)
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    @triton.jit
    def _fwd(
        Q, K, V, T, E, LIST, CNT, O, LSE,
        sm_scale, N, CAP, NQB,
        HQ: tl.constexpr, G: tl.constexpr, HS_DIV: tl.constexpr, T_HEADS_DIV: tl.constexpr, T_BATCH: tl.constexpr,
        HAS_T: tl.constexpr, STACK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        row, t_row, i, q_rows, kv_base, stats, n_full, count, list_base = _rows(
            CNT, tl.program_id(0), tl.program_id(1), N, CAP, NQB, HQ, G, HS_DIV, T_HEADS_DIV, T_BATCH, STACK, D, BM
        )  # fmt: skip
        d = tl.arange(0, D)
        live = i < N
        q = tl.load(Q + q_rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
        qk_scale = sm_scale * _LOG2E
        m_i = tl.full((STACK * BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((STACK * BM,), tl.float32)
        acc = tl.zeros((STACK * BM, D), tl.float32)
        whole = n_full - n_full % BN  # chunks of keys every query keeps: no mask
        for start in range(0, whole, BN):
            m_i, l_i, acc = _fwd_chunk(
                q, K, V, T, E, LIST, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP, qk_scale,
                m_i, l_i, acc, HAS_T, D, BN, True,
            )  # fmt: skip
        for start in range(whole, count, BN):
            m_i, l_i, acc = _fwd_chunk(
                q, K, V, T, E, LIST, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP, qk_scale,
                m_i, l_i, acc, HAS_T, D, BN, False,
            )  # fmt: skip
        alive = l_i > 0
        out = acc / tl.where(alive, l_i, 1.0)[:, None]
        tl.store(O + q_rows[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=live[:, None])
        lse = tl.where(alive, (m_i + tl.log2(tl.where(alive, l_i, 1.0))) / _LOG2E, float("inf"))
        tl.store(LSE + stats, lse, mask=live)

    @triton.jit
    def _bwd_chunk(
        q, K, V, T, E, LIST, DK, DV, DT, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP,
        qk_scale, sm_scale, do, lse2, delta, dq,
        HAS_T: tl.constexpr, T_GRAD: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, FULL: tl.constexpr,
    ):  # fmt: skip
        """``dQ`` after one chunk; the chunk's ``dK``, ``dV`` and bias gradient added atomically."""
        j, rows, k, s, in_list = _chunk(
            q, K, T, E, LIST, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP, qk_scale,
            HAS_T, D, BN, FULL,
        )  # fmt: skip
        v = tl.load(V + rows, mask=in_list[:, None], other=0.0)
        p = tl.exp2(s - lse2[:, None])  # 0 where masked (-inf)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * sm_scale  # the stacked heads summed: one atomic each
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
        tl.atomic_add(DK + rows, dk, mask=in_list[:, None], sem="relaxed")
        tl.atomic_add(DV + rows, dv, mask=in_list[:, None], sem="relaxed")
        if T_GRAD:
            tl.atomic_add(DT + t_row + j, tl.sum(ds, 0), mask=in_list, sem="relaxed")
        return dq + tl.dot(ds.to(k.dtype), k)

    @triton.jit
    def _bwd(
        Q, K, V, T, E, LIST, CNT, O, DO, LSE, DQ, DK, DV, DT,
        sm_scale, N, CAP, NQB,
        HQ: tl.constexpr, G: tl.constexpr, HS_DIV: tl.constexpr, T_HEADS_DIV: tl.constexpr, T_BATCH: tl.constexpr,
        HAS_T: tl.constexpr, T_GRAD: tl.constexpr, STACK: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
        BN: tl.constexpr,
    ):  # fmt: skip
        row, t_row, i, q_rows, kv_base, stats, n_full, count, list_base = _rows(
            CNT, tl.program_id(0), tl.program_id(1), N, CAP, NQB, HQ, G, HS_DIV, T_HEADS_DIV, T_BATCH, STACK, D, BM
        )  # fmt: skip
        d = tl.arange(0, D)
        live = i < N
        q = tl.load(Q + q_rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
        do = tl.load(DO + q_rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
        lse = tl.load(LSE + stats, mask=live, other=float("inf"))
        o = tl.load(O + q_rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # Δ_i = dO_i · O_i, in float32
        lse2 = lse * _LOG2E
        qk_scale = sm_scale * _LOG2E
        dq = tl.zeros((STACK * BM, D), tl.float32)
        whole = n_full - n_full % BN  # chunks of keys every query keeps: no mask
        for start in range(0, whole, BN):
            dq = _bwd_chunk(
                q, K, V, T, E, LIST, DK, DV, DT, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP,
                qk_scale, sm_scale, do, lse2, delta, dq, HAS_T, T_GRAD, D, BN, True,
            )  # fmt: skip
        for start in range(whole, count, BN):
            dq = _bwd_chunk(
                q, K, V, T, E, LIST, DK, DV, DT, list_base, n_full, count, start, row, t_row, kv_base, i, N, CAP,
                qk_scale, sm_scale, do, lse2, delta, dq, HAS_T, T_GRAD, D, BN, False,
            )  # fmt: skip
        dq = (dq * sm_scale).to(DQ.dtype.element_ty)
        tl.store(DQ + q_rows[:, None] + d[None, :], dq, mask=live[:, None])


# Heads a Triton program stacks at most. H200, 32k, Hq 32 / Hkv 8 (groups of 4 sharing their selection
# and bias), w 2048: STACK 2 forward 3.70 ms, backward 12.5; STACK 4 forward 8.71, backward 16.8 (its
# 256 rows of accumulators spill).
STACK_MOST = 2


def _launch_args(q, k, ends, t, most: int = STACK_MOST):
    """The kernels' head arithmetic, and how many query heads one program stacks: consecutive heads
    that share one KV head, one selection head and one bias head (DMA's usual layout), as many as
    the largest power of two up to ``most`` that divides all three groupings."""
    B, Hq, N, D = q.shape
    Hkv, Hs = k.shape[1], ends.shape[1]
    t_batch, t_heads = (t.shape[0], t.shape[1]) if t is not None else (1, Hs)
    g, hs_div, t_div = Hq // Hkv, Hq // Hs, Hq // t_heads
    stack = 1
    while stack < most and all(x % (2 * stack) == 0 for x in (g, hs_div, t_div)):
        stack *= 2
    return dict(HQ=Hq, G=g, HS_DIV=hs_div, T_HEADS_DIV=t_div, T_BATCH=t_batch, STACK=stack, D=D)


def _launch(heads: dict, block_m: int, block_n: int, backward: bool) -> dict:
    """A kernel's key chunk ``BN`` (``block_n``, or the tuned one for 0), warps and stages.

    Tuned on an H200 (N 32k, Hq 16 / Hkv 8, D 128, w 2048, ``block_m`` 64 with the GQA pair
    stacked: 128 query rows a program): forward 1.89 ms with chunks of 32 keys, 4 warps and 2
    stages (3 stages: 2.02 ms; the backward's settings: 1.98 ms); backward 6.34 ms with chunks of
    64, 8 warps and 3 stages (2 stages: 7.0 ms; ``block_m`` 128: 8.6 ms). The same order at
    Hq 2 / Hkv 1, and again after the backward took over ``Δ`` (backward 6.25 ms; chunks of 32
    with 8 warps: 7.4 ms; ``block_m`` 128: 8.5 ms). One head a program (a selection per query head,
    H200, 32k, Hq 16 / Hkv 8): backward 8.30 ms with chunks of 32 and 4 warps (2 or 3 stages), 11.6
    with chunks of 64 and 8 warps, 32.4 with chunks of 64 and 4 warps."""
    if not backward:
        return dict(BN=block_n or 32, num_warps=4, num_stages=2)
    if heads["STACK"] == 1:
        return dict(BN=block_n or 32, num_warps=4, num_stages=3)
    wide = heads["STACK"] * block_m * heads["D"] >= 128 * 128  # registers: 8 warps from 128 × 128
    return dict(BN=block_n or 64, num_warps=8 if wide else 4, num_stages=3)


def _lists_shape(ends: torch.Tensor, keep: int, block_m: int) -> tuple[int, int, int]:
    """``(rows, query blocks, list capacity)`` of the kept-key lists: a block keeps at most
    ``keep + block_m - 1`` keys."""
    b, hs, n = ends.shape
    return b * hs, cdiv(n, block_m), min(keep + block_m, n)


def _build_lists(
    ends: torch.Tensor, keep: int, block_m: int, chunks: tuple[int, int] = (4096, 1024)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept-key lists of :func:`kept_lists` by the kernels: the keys some query keeps, then each
    query block's list from those before its end. For random scores about ``w·(1 + ln(N/w))`` keys
    of a row are kept by some query, so the block scans read ``N/block_m`` times that rather than
    ``N²/(2·block_m)``; where every key is (scores rising along the keys) it is the same work plus
    the row scan. ``chunks``: positions per step of the row scan (one program per row, so long
    steps) and of the block scans."""
    rows, nqb, cap = _lists_shape(ends, keep, block_m)
    n = ends.shape[-1]
    kept = torch.empty(rows, n, device=ends.device, dtype=torch.int32)
    below = torch.empty(rows, nqb, device=ends.device, dtype=torch.int32)
    _ever_kept[(rows,)](ends, kept, below, n, nqb, BM=block_m, CHUNK=chunks[0], num_warps=8)
    lists = torch.zeros(rows, nqb, cap, device=ends.device, dtype=torch.int32)  # deterministic padding
    counts = torch.empty(rows, nqb, 2, device=ends.device, dtype=torch.int32)
    _lists[(nqb, rows)](ends, kept, below, lists, counts, n, cap, nqb, BM=block_m, CHUNK=chunks[1])
    return lists, counts


def triton_forward(q, k, v, t, ends, lists, counts, o, lse, scale: float, heads: dict, block_m: int, block_n: int):
    """Fill ``o`` and ``lse`` with the Triton forward kernel :func:`_fwd` over the kept-key lists
    (``heads`` from :func:`_launch_args`; ``block_n`` 0 takes the tuned chunk, :func:`_launch`)."""
    B, Hq, N, _ = q.shape
    nqb, cap = lists.shape[-2:]
    _fwd[(nqb, B * Hq // heads["STACK"])](
        q, k, v, lse if t is None else t, ends, lists, counts, o, lse, scale, N, cap, nqb,
        HAS_T=t is not None, BM=block_m, **_launch(heads, block_m, block_n, backward=False), **heads,
    )  # fmt: skip


def triton_backward(
    q, k, v, t, ends, lists, counts, o, do, lse, dq, dk, dv, dt, scale: float, heads: dict, block_m: int, block_n: int
):
    """Fill ``dq`` and add into ``dk``, ``dv`` (float32, zeroed) and ``dt`` (float32 like ``t``, zeroed;
    empty for no bias gradient) with the Triton backward kernel :func:`_bwd`."""
    B, Hq, N, _ = q.shape
    nqb, cap = lists.shape[-2:]
    _bwd[(nqb, B * Hq // heads["STACK"])](
        q, k, v, lse if t is None else t, ends, lists, counts, o, do, lse, dq, dk, dv, dt if dt.numel() else lse,
        scale, N, cap, nqb,
        HAS_T=t is not None, T_GRAD=dt.numel() > 0, BM=block_m, **_launch(heads, block_m, block_n, backward=True),
        **heads,
    )  # fmt: skip


def _forward_impl(q, k, v, t, ends, keep: int, scale: float, block_m: int, block_n: int):
    """``(out, lse, lists, counts)``: the attention, its natural-log logsumexp ``[B, Hq, N]`` and
    the kept-key lists the backward reuses."""
    lists, counts = _build_lists(ends, keep, block_m)
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], device=q.device, dtype=torch.float32)
    heads = _launch_args(q, k, ends, t)
    if token_hopper.supported(q, k, v, heads, block_m, block_n):
        token_hopper.forward(q, k, v, t, ends, lists, counts, o, lse, scale, heads, block_n)
    else:
        triton_forward(q, k, v, t, ends, lists, counts, o, lse, scale, heads, block_m, block_n)
    return o, lse, lists, counts


def _backward_impl(q, k, v, t, ends, lists, counts, o, lse, do, scale: float, block_m: int, block_n: int, t_grad: bool):
    """``(dq, dk, dv, dt)``; ``dt`` float32 like ``t`` (empty without ``t_grad``)."""
    do, o = do.contiguous(), o.contiguous()
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    dt = torch.zeros(t.shape if t_grad else (0,), device=q.device, dtype=torch.float32)
    heads = _launch_args(q, k, ends, t)
    if token_hopper.supported(q, k, v, heads, block_m, block_n, backward=True):
        token_hopper.backward(q, k, v, t, ends, lists, counts, o, do, lse, dq, dk, dv, dt, scale, heads)
    else:
        triton_backward(q, k, v, t, ends, lists, counts, o, do, lse, dq, dk, dv, dt, scale, heads, block_m, block_n)
    return dq, dk.to(k.dtype), dv.to(v.dtype), dt


# Custom ops: opaque to torch.compile (dynamo does not trace into the launches, so it needs no
# mutation analysis of the kernels' pointer arguments), with fake implementations for tracing.
@torch.library.custom_op("flexmask::token_gather_fwd", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | None,
    ends: torch.Tensor,
    keep: int,
    scale: float,
    block_m: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_forward_impl` as an op."""
    return _forward_impl(q, k, v, t, ends, keep, scale, block_m, block_n)


@_forward.register_fake
def _(q, k, v, t, ends, keep, scale, block_m, block_n):
    rows, nqb, cap = _lists_shape(ends, keep, block_m)
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return torch.empty_like(q), lse, ends.new_empty(rows, nqb, cap), ends.new_empty(rows, nqb, 2)


@torch.library.custom_op("flexmask::token_gather_bwd", mutates_args=())
def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | None,
    ends: torch.Tensor,
    lists: torch.Tensor,
    counts: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    scale: float,
    block_m: int,
    block_n: int,
    t_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward_impl` as an op."""
    return _backward_impl(q, k, v, t, ends, lists, counts, o, lse, do, scale, block_m, block_n, t_grad)


@_backward.register_fake
def _(q, k, v, t, ends, lists, counts, o, lse, do, scale, block_m, block_n, t_grad):
    dt = q.new_empty(t.shape if t_grad else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dt


def _setup_context(ctx, inputs, output):
    q, k, v, t, ends, keep, scale, block_m, block_n = inputs
    o, lse, lists, counts = output
    ctx.save_for_backward(q, k, v, t, ends, lists, counts, o, lse)
    ctx.scale, ctx.blocks = scale, (block_m, block_n)


def _gradients(ctx, do: torch.Tensor, backward) -> tuple:
    """The inputs' gradients from what :func:`_setup_context` saved, by ``backward`` (the op or its body)."""
    q, k, v, t, ends, lists, counts, o, lse = ctx.saved_tensors
    t_grad = t is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dt = backward(q, k, v, t, ends, lists, counts, o, lse, do, ctx.scale, *ctx.blocks, t_grad)
    return dq, dk, dv, dt.to(t.dtype) if t_grad else None, None, None, None, None, None


def _backward_rule(ctx, do, _dlse, _dlists, _dcounts):
    return _gradients(ctx, do, _backward)


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The two ops' bodies as a plain autograd function, for calls outside ``torch.compile``: the
    same kernels without the ops' dispatch, which costs more host time per call than the kernels'
    launches (a fwd+bwd at the paper configuration: see ``docs/benchmarks.md``)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, _dlse, _dlists, _dcounts):
        return _gradients(ctx, do, _backward_impl)


def token_gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ends: torch.Tensor,
    keep: int,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 0,
) -> torch.Tensor:
    """Attention under the interval rule ``j <= i < ends[j]`` (token top-k) with an optional per-key
    bias, reading each query block's kept keys in place.

    Args:
        q: ``[B, Hq, N, D]``; k, v: ``[B, Hkv, N, D]`` (GQA: ``Hkv`` divides ``Hq``); D a power of two.
        ends: ``[B, Hs, N]`` int32 interval ends of the selection heads (``Hs`` divides ``Hq``).
        keep: keys one query keeps at most (``fm.topk``'s ``k``; ``fm.topk_blocks``' ``k`` past blocks
            and its own, ``(k + 1) · block_size``): bounds the lists.
        bias: ``[B|1, Ht, N]`` per-key bias added to the scores (``Ht`` divides ``Hq``), or ``None``;
            it gets a gradient.
        scale: score scale (default ``1/sqrt(D)``).
        block_m: queries of a block (one kept-key list each).
        block_n: keys of a chunk in both kernels; 0 takes the tuned chunk of each (:func:`_launch`).

    Returns:
        ``[B, Hq, N, D]``; rows that keep no key are zeros.

    Example:
        >>> out = token_gather_attention(q, k, v, topk_ends(scores, None, 2048), 2048, bias=scores)  # doctest: +SKIP
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k, v, ends = (x.contiguous() for x in (q, k, v, ends))
    t = None if bias is None else bias.contiguous()
    op = _forward if torch.compiler.is_compiling() else _Eager.apply
    return op(q, k, v, t, ends, keep, scale, block_m, block_n)[0]
