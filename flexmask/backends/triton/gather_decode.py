"""One decoding query per sequence and head against the keys its selection gathered (Triton, CUDA).

The gather plan (:mod:`flexmask.backends.gather`) knows, per sequence and KV head, the ``S`` cache
positions a decoding query may keep (``fm.topk``: ``k``; ``fm.topk_blocks``: ``(k + 1)·block``),
whether each is kept (the selection, the rest of the mask) and the additive bias there. This
kernel is the attention over those positions: flash decoding with gathered rows. The ``S``
positions are split over ``splits`` programs per (sequence, KV head); each loads its keys' and
values' rows by index for the ``G`` query heads of the group at once, keeps an online softmax and
writes a partial result; a second kernel merges the partials. Rows that keep nothing are zeros.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:
    from .key_mass import _LOG2E  # the kernels work in base 2

    @triton.jit
    def _partial(
        Q, K, V, POS, KEEP, ADD, M, L, ACC,
        sm_scale, S, LEN, CHUNK, SPLITS,
        HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        HAS_ADD: tl.constexpr, BS: tl.constexpr,
    ):  # fmt: skip
        """Program (sequence·KV head, split): the split's positions, every query head of the group."""
        bh = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        g = tl.arange(0, GP)
        live = g < G
        heads = (bh // HKV) * (HKV * G) + (bh % HKV) * G + g  # query heads of this KV head (rows of Q, KEEP, ADD)
        d = tl.arange(0, D)
        dv = tl.arange(0, DV)
        q = tl.load(Q + heads[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, DV), tl.float32)
        qk_scale = sm_scale * _LOG2E
        begin = split * CHUNK
        end = tl.minimum(begin + CHUNK, S)
        for start in range(begin, end, BS):
            j = start + tl.arange(0, BS)
            inside = j < end
            pos = tl.load(POS + bh * S + j, mask=inside, other=0)
            rows = bh * LEN + pos  # the gathered cache rows
            k = tl.load(K + rows[:, None] * D + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # [GP, BS], base 2
            cell = heads[:, None] * S + j[None, :]
            both = live[:, None] & inside[None, :]
            keep = tl.load(KEEP + cell, mask=both, other=0) != 0
            if HAS_ADD:
                s += tl.load(ADD + cell, mask=both, other=0.0) * _LOG2E
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + rows[:, None] * DV + dv[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = (bh * SPLITS + split) * G + g  # rows of M, L, ACC: [B·Hkv, splits, G]
        tl.store(M + out, m_i, mask=live)
        tl.store(L + out, l_i, mask=live)
        tl.store(ACC + out[:, None] * DV + dv[None, :], acc, mask=live[:, None])

    @triton.jit
    def _merge(M, L, ACC, O, SPLITS, G: tl.constexpr, DV: tl.constexpr, SP: tl.constexpr):
        """Program per (sequence, query head): the splits' partial softmaxes merged (base 2)."""
        row = tl.program_id(0).to(tl.int64)  # b·Hq + h = (b·Hkv + h // G)·G + h % G
        bh, g = row // G, row % G
        sp = tl.arange(0, SP)
        there = sp < SPLITS
        part = (bh * SPLITS + sp) * G + g
        m = tl.load(M + part, mask=there, other=float("-inf"))
        top = tl.max(m, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - top))
        total = tl.sum(tl.load(L + part, mask=there, other=0.0) * w, 0)
        dv = tl.arange(0, DV)
        acc = tl.load(ACC + part[:, None] * DV + dv[None, :], mask=there[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(O + row * DV + dv, out.to(O.dtype.element_ty))


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None) -> bool:
    """Whether the kernels run these inputs: CUDA with Triton, float16/bfloat16, head dims that are
    powers of two from 16 to 256, one gathered list per KV head (``positions`` ``[B, 1|Hkv, S]``),
    and no gradient to compute (decoding)."""
    d, dv = q.shape[-1], v.shape[-1]
    return (
        triton is not None
        and positions is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == v.dtype == q.dtype
        and all(16 <= x <= 256 and x & (x - 1) == 0 for x in (d, dv))
        and positions.shape[1] in (1, k.shape[1])
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    )


def gathered_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    keep: torch.Tensor,
    add: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """:func:`decode`, as the custom op ``flexmask::gathered_decode`` under ``torch.compile`` (which
    keeps it whole) and called directly otherwise (an eager step pays no op dispatch)."""
    op = _gathered_decode_op if torch.compiler.is_compiling() else decode
    return op(q, k, v, positions, keep, add, scale)


def decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    keep: torch.Tensor,
    add: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence and head over gathered cache positions.

    Args:
        q: ``[B, Hq, 1, D]``; k: ``[B, Hkv, L, D]``; v: ``[B, Hkv, L, Dv]`` (``Hkv`` divides ``Hq``).
        positions: ``[B, Hkv, S]`` int64 cache positions (in range) of each KV head's candidates.
        keep: ``[B, Hq, S]`` bool, whether query head ``h`` keeps candidate ``s``.
        add: ``[B, Hq, S]`` float32 added to the scaled scores, or ``None``.
        scale: score scale.

    Returns:
        ``[B, Hq, 1, Dv]`` in ``q``'s dtype; rows that keep nothing are zeros.

    Example:
        >>> out = gathered_decode(q, k, v, positions, keep, None, 128**-0.5)  # doctest: +SKIP
    """
    B, Hq, _, D = q.shape
    Hkv, L, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G, S = Hq // Hkv, positions.shape[-1]
    gp = max(16, triton.next_power_of_2(G))
    bs = 64 if D <= 128 and Dv <= 128 else 32
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4  # (4: interpreter)
    splits = max(1, min(triton.cdiv(S, bs), triton.cdiv(2 * sms, B * Hkv)))
    chunk = triton.cdiv(triton.cdiv(S, splits), bs) * bs
    splits = triton.cdiv(S, chunk)
    m = torch.empty(B * Hkv, splits, G, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty(B * Hkv, splits, G, Dv, device=q.device, dtype=torch.float32)
    keep8 = keep.contiguous().view(torch.uint8)
    add_arg = add.contiguous() if add is not None else m  # a placeholder pointer without a bias
    _partial[(B * Hkv, splits)](
        q.contiguous(), k.contiguous(), v.contiguous(), positions.contiguous(), keep8, add_arg, m, l_sum, acc,
        scale, S, L, chunk, splits,
        HKV=Hkv, G=G, GP=gp, D=D, DV=Dv, HAS_ADD=add is not None, BS=bs, num_warps=4,
    )  # fmt: skip
    out = torch.empty(B, Hq, 1, Dv, device=q.device, dtype=q.dtype)
    _merge[(B * Hq,)](m, l_sum, acc, out, splits, G=G, DV=Dv, SP=max(2, triton.next_power_of_2(splits)))
    return out


_gathered_decode_op = torch.library.custom_op("flexmask::gathered_decode", decode, mutates_args=())


@_gathered_decode_op.register_fake
def _(q, k, v, positions, keep, add, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])
