"""The ``k`` keys one decoding query keeps under token top-``k``: a radix select in Triton (CUDA).

A decoding query at position ``q`` keeps, per row (batch × selection head), the ``k`` best
candidates by (score, later position). Each key gets a unique integer whose order is exactly that:
its float32 score's order-preserving bits above its position; keys that are not candidates (after
the query, or in another document) get score bits 0, below every candidate. The ``k``-th largest
integer ``τ`` is found digit by digit (11 bits per pass, most significant first): every pass counts,
over the keys that still match the digits found so far, how many fall in each of 2048 buckets, and
the next pass reads those counts to fix one more digit. The kept keys are then exactly those with
an integer ``≥ τ``, written in ascending position order.

``R × S`` programs (``S`` slices of each row) share the work, so a handful of rows over a long
cache fill the GPU; counts meet in global memory by atomic adds, and each launch re-derives the
digits fixed so far from the counts of the passes before it (a few thousand integers), so the
passes need no other state. ``passes + 2`` launches, ``O(L)`` work each, no host synchronisation:
capturable in a CUDA graph. :func:`flexmask.lowering.decode.topk_candidates` uses it on CUDA and
keeps its ``torch.topk`` over 64-bit keys elsewhere (CPU, float64 scores); both return the same set.
"""

from __future__ import annotations

import torch

from .layout import cdiv

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

DIGIT = 11  # bits fixed per pass: 2048 buckets
BLOCK = 1024  # keys per program and loop step
_PROGRAMS = 256  # programs per launch to aim for (two per SM of an H100/H200)


def available(scores: torch.Tensor) -> bool:
    """Whether :func:`topk_positions` serves ``scores`` ``[..., L]``: CUDA, Triton, and a float32
    ranking (any dtype but float64, which is ranked in float64 by sorting)."""
    return triton is not None and scores.is_cuda and scores.dtype != torch.float64 and scores.shape[-1] < 1 << 31


if triton is not None:

    @triton.jit
    def _keys(s_ptr, seg_ptr, q_ptr, row, offs, L, PB: tl.constexpr, HAS_SEG: tl.constexpr):
        """Unique order keys of positions ``offs`` of ``row`` (``in_range``: ``offs < L``)."""
        in_range = offs < L
        row = row.to(tl.int64)
        s = tl.load(s_ptr + row * L + offs, mask=in_range, other=float("-inf"))
        bits = (s + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes 0.0, which it equals
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float's value
        u = ordered.to(tl.int64) - (-2147483648)  # [0, 2^32); -inf is 2^23 - 1, so 0 is free
        q = tl.load(q_ptr)
        candidate = in_range & (offs <= q)
        if HAS_SEG:
            mine = tl.load(seg_ptr + row * L + q)
            candidate = candidate & (tl.load(seg_ptr + row * L + offs, mask=in_range, other=-1) == mine)
        u = tl.where(candidate, u, 0)
        return (u << PB) | offs.to(tl.int64), in_range

    @triton.jit
    def _fixed(hist_ptr, row, R, k, PASS: tl.constexpr, DIGIT: tl.constexpr):
        """The digits fixed by passes ``0 .. PASS - 1`` (as one integer) and how many keys still
        have to be taken among those matching them."""
        bins = tl.arange(0, 1 << DIGIT)
        prefix = tl.zeros((), dtype=tl.int64)
        need = tl.zeros((), dtype=tl.int64) + k
        for p in tl.static_range(PASS):
            h = tl.load(hist_ptr + (p * R + row.to(tl.int64)) * (1 << DIGIT) + bins).to(tl.int64)
            total = tl.sum(h, 0)
            at_or_above = total - tl.cumsum(h, 0) + h  # keys in buckets >= b
            b = tl.max(tl.where(at_or_above >= need, bins, -1), 0)
            above = tl.sum(tl.where(bins == b, at_or_above - h, 0), 0)
            need = need - above
            prefix = (prefix << DIGIT) | b.to(tl.int64)
        return prefix, need

    @triton.jit
    def _count_pass(
        s_ptr, seg_ptr, q_ptr, hist_ptr, L, R, k, SLICE,
        PB: tl.constexpr, HAS_SEG: tl.constexpr, PASS: tl.constexpr, PASSES: tl.constexpr,
        DIGIT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row, part = tl.program_id(0), tl.program_id(1)
        prefix, _ = _fixed(hist_ptr, row, R, k, PASS, DIGIT)
        shift = DIGIT * (PASSES - 1 - PASS)
        bins = tl.arange(0, 1 << DIGIT)
        counts = tl.zeros((1 << DIGIT,), dtype=tl.int32)
        for start in range(part * SLICE, tl.minimum(part * SLICE + SLICE, L), BLOCK):
            key, in_range = _keys(s_ptr, seg_ptr, q_ptr, row, start + tl.arange(0, BLOCK), L, PB, HAS_SEG)
            match = in_range & ((key >> (shift + DIGIT)) == prefix)
            digit = tl.where(match, (key >> shift) & ((1 << DIGIT) - 1), 0).to(tl.int32)
            counts += tl.histogram(digit, 1 << DIGIT)
            counts -= tl.where(bins == 0, tl.sum((~match).to(tl.int32), 0), 0)  # unmatched went to bucket 0
        tl.atomic_add(hist_ptr + (PASS * R + row.to(tl.int64)) * (1 << DIGIT) + bins, counts, sem="relaxed")

    @triton.jit
    def _kept_count(
        s_ptr, seg_ptr, q_ptr, hist_ptr, kept_ptr, L, R, k, SLICE, S,
        PB: tl.constexpr, HAS_SEG: tl.constexpr, PASSES: tl.constexpr, DIGIT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row, part = tl.program_id(0), tl.program_id(1)
        tau, _ = _fixed(hist_ptr, row, R, k, PASSES, DIGIT)
        n = tl.zeros((), dtype=tl.int32)
        for start in range(part * SLICE, tl.minimum(part * SLICE + SLICE, L), BLOCK):
            key, in_range = _keys(s_ptr, seg_ptr, q_ptr, row, start + tl.arange(0, BLOCK), L, PB, HAS_SEG)
            n += tl.sum((in_range & (key >= tau)).to(tl.int32), 0)
        tl.store(kept_ptr + row * S + part, n)

    @triton.jit
    def _kept_write(
        s_ptr, seg_ptr, q_ptr, hist_ptr, kept_ptr, out_ptr, L, R, k, SLICE, S,
        PB: tl.constexpr, HAS_SEG: tl.constexpr, PASSES: tl.constexpr, S_POW2: tl.constexpr,
        DIGIT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row, part = tl.program_id(0), tl.program_id(1)
        tau, _ = _fixed(hist_ptr, row, R, k, PASSES, DIGIT)
        parts = tl.arange(0, S_POW2)
        base = tl.sum(tl.load(kept_ptr + row * S + parts, mask=parts < part, other=0), 0)
        for start in range(part * SLICE, tl.minimum(part * SLICE + SLICE, L), BLOCK):
            offs = start + tl.arange(0, BLOCK)
            key, in_range = _keys(s_ptr, seg_ptr, q_ptr, row, offs, L, PB, HAS_SEG)
            kept = (in_range & (key >= tau)).to(tl.int32)
            slot = base + tl.cumsum(kept, 0) - kept
            tl.store(out_ptr + row.to(tl.int64) * k + slot, offs.to(tl.int64), mask=kept == 1)
            base += tl.sum(kept, 0)


@torch.library.custom_op("flexmask::topk_positions", mutates_args=())
def topk_positions(scores: torch.Tensor, segments: torch.Tensor | None, query: torch.Tensor, k: int) -> torch.Tensor:
    """The positions ``[R, k]`` int64 (ascending) of the ``k`` best keys of each row for the query
    at ``query`` (a one-element int64 tensor): higher score first, then the later key; keys after
    the query, or whose ``segments`` differ from the query's, only fill rows with fewer than ``k``
    candidates (the later first).

    Args:
        scores: ``[R, L]`` float32 on CUDA, no NaN (as :func:`~flexmask.lowering.selection.key_candidates` gives).
        segments: ``[R, L]`` integer segment numbers, or ``None``.
        query: ``[1]`` int64 on the scores' device.
        k: keys kept per row, ``1 <= k <= L``.

    Example:
        >>> pos = topk_positions(torch.randn(8, 16384, device="cuda"), None, torch.tensor([16383], device="cuda"), 2048)
    """
    scores = scores.contiguous()
    rows, n = scores.shape
    position_bits = max(1, (n - 1).bit_length())
    passes = cdiv(32 + position_bits, DIGIT)
    slices = max(1, min(cdiv(n, BLOCK), _PROGRAMS // max(rows, 1)))  # about _PROGRAMS programs in all
    slice_len = cdiv(cdiv(n, slices), BLOCK) * BLOCK
    slices = cdiv(n, slice_len)
    hist = torch.zeros(passes, rows, 1 << DIGIT, dtype=torch.int32, device=scores.device)
    kept = torch.empty(rows, slices, dtype=torch.int32, device=scores.device)
    out = torch.empty(rows, k, dtype=torch.int64, device=scores.device)
    has_seg = segments is not None
    seg = segments.contiguous() if has_seg else scores  # a placeholder pointer when there are none
    q = query.reshape(1).to(device=scores.device, dtype=torch.int64)
    grid = (rows, slices)
    common = dict(PB=position_bits, HAS_SEG=has_seg, DIGIT=DIGIT, BLOCK=BLOCK)  # Triton reads no globals
    for p in range(passes):
        _count_pass[grid](scores, seg, q, hist, n, rows, k, slice_len, PASS=p, PASSES=passes, **common)
    _kept_count[grid](scores, seg, q, hist, kept, n, rows, k, slice_len, slices, PASSES=passes, **common)
    s_pow2 = triton.next_power_of_2(slices)
    _kept_write[grid](
        scores, seg, q, hist, kept, out, n, rows, k, slice_len, slices, PASSES=passes, S_POW2=s_pow2, **common
    )
    return out


@topk_positions.register_fake
def _(scores: torch.Tensor, segments: torch.Tensor | None, query: torch.Tensor, k: int) -> torch.Tensor:
    return scores.new_empty((scores.shape[0], k), dtype=torch.int64)
