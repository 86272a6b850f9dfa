"""Dynamic Mask Attention (DMA): trainable content-aware sparse attention (arXiv 2508.02124).

Each key ``j`` carries one score per head (the *dynamic bias*, computed from the value states).
Query ``i`` keeps the ``w`` keys ``j <= i`` with the highest score (ties to the later key) and adds
the score to the attention logits of the kept keys.

Because the score depends on the key only, the prefix top-``w`` threshold only rises as queries
advance, so key ``j``, once kept, stays kept for one contiguous run of queries ``[j, e_j)`` and is
never kept again. flexmask stores that interval end ``e`` — ``O(N)`` integers per head — and the
mask is ``j <= i < e[j]``. ``e`` comes from an exact prefix order statistic (a wavelet matrix over
the keys' score ranks): ``O(N log N)`` work in a few dozen vectorised steps, no ``N × N`` tensor.

Public names: :func:`topk`, :func:`topk_blocks`, :func:`dynamic_bias`,
:class:`DynamicMaskAttention`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .bias import key_bias
from .blocks import (
    CudaGraphed,
    Layout,
    _block_tensors,
    block_mask_from_tensors,
    classify,
    compiled_on_cuda,
    per_block_min_max,
)
from .masks import And, Causal, Document, Mask, Padding, _positive_int

# ---------------------------------------------------------------------------------------------
# exact prefix top-k


def _rank_keys(scores: torch.Tensor, segments: torch.Tensor | None) -> torch.Tensor:
    """Rank of every key, 0 = best: by segment (later first), score (higher first), position (later first).

    ``scores`` [R, N] float; ``segments`` [R, N] nondecreasing ints or None. Returns int64 [R, N].
    """
    n = scores.shape[-1]
    order = torch.arange(n - 1, -1, -1, device=scores.device).expand_as(scores)  # later first
    order = order.gather(-1, torch.sort(scores.gather(-1, order), dim=-1, descending=True, stable=True).indices)
    if segments is not None:
        order = order.gather(-1, torch.sort(segments.gather(-1, order), dim=-1, descending=True, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return rank


def prefix_kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """For every prefix ``values[..., : i + 1]``, its ``k``-th smallest value (``k`` is 1-based).

    ``values`` [R, N] holds distinct ints in ``[0, N)`` (a permutation per row). Prefixes with fewer
    than ``k`` entries get ``N``. Exact, ``O(N log N)``: a wavelet matrix answers all ``N``
    quantile queries level by level.
    """
    rows, n = values.shape
    dev = values.device
    levels = max(1, (n - 1).bit_length())
    positions = torch.arange(n, device=dev).expand(rows, n)
    cur = values
    zero_prefix, zero_count = [], []
    for level in range(levels - 1, -1, -1):
        bit = (cur >> level) & 1
        zp = F.pad(torch.cumsum(1 - bit, -1), (1, 0))  # [R, N + 1] zeros before each position
        nz = zp[:, -1:]
        dest = torch.where(bit == 0, zp[:, :-1], nz + positions - zp[:, :-1])
        cur = torch.empty_like(cur).scatter_(-1, dest, cur)
        zero_prefix.append(zp)
        zero_count.append(nz)

    lo = torch.zeros(rows, n, dtype=torch.int64, device=dev)
    hi = torch.arange(1, n + 1, device=dev).expand(rows, n)
    kk = torch.full((rows, n), k - 1, dtype=torch.int64, device=dev)
    result = torch.zeros(rows, n, dtype=torch.int64, device=dev)
    for i, level in enumerate(range(levels - 1, -1, -1)):
        zp, nz = zero_prefix[i], zero_count[i]
        z_lo, z_hi = zp.gather(-1, lo), zp.gather(-1, hi)
        zeros_here = z_hi - z_lo
        go_zero = kk < zeros_here
        result = result | ((~go_zero).to(torch.int64) << level)
        kk = torch.where(go_zero, kk, kk - zeros_here)
        lo = torch.where(go_zero, z_lo, nz + lo - z_lo)
        hi = torch.where(go_zero, z_hi, nz + hi - z_hi)
    return torch.where(positions + 1 >= k, result, torch.full_like(result, n))


def interval_ends(scores: torch.Tensor, k: int, segments: torch.Tensor | None = None) -> torch.Tensor:
    """End ``e_j`` of the run of queries that keep key ``j`` under prefix top-``k`` selection.

    Query ``i`` keeps key ``j`` iff ``j <= i < e_j``. ``scores`` [R, N]; ``segments`` [R, N]
    (nondecreasing, e.g. packed documents) ranks later segments above earlier ones so that, once
    intersected with the document mask, each document's top-k is taken within the document.
    Returns int64 [R, N].
    """
    n = scores.shape[-1]
    rank = _rank_keys(scores, segments)
    threshold = prefix_kth_smallest(rank, k)  # nonincreasing in i
    first_drop = torch.searchsorted(-threshold, -rank, right=True)
    return torch.maximum(first_drop, torch.arange(n, device=scores.device))


def _block_ranks(block_scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[2, R, nb]``: each block's rank and the threshold of each query block (blocks before it).

    Block counts are small (``N / 128``), so the ``k``-th smallest rank before each query block
    comes from one ``[R, nb, nb]`` block-level matrix and ``kthvalue``: a handful of kernels,
    nothing to compile (``O((N / 128)²)`` like the BlockMask itself).
    """
    rank = _rank_keys(block_scores, None)
    rows, nb = rank.shape
    if k > nb:
        return torch.stack([rank, torch.full_like(rank, nb)])
    u = torch.arange(nb, device=rank.device)
    before = torch.where(u[None, :] < u[:, None], rank[:, None, :], nb)  # [R, t, u]: ranks of blocks u < t
    threshold = before.kthvalue(k, dim=-1).values  # nb while fewer than k blocks precede t
    return torch.stack([rank, threshold])


_interval_ends_fused = compiled_on_cuda(interval_ends)


# ---------------------------------------------------------------------------------------------
# the masks


def _candidates(among: Mask | None) -> tuple[Document | None, Padding | None]:
    """Split ``among`` into the document and padding parts top-k selection understands."""
    docs, pads = [], []

    def visit(m):
        if isinstance(m, And):
            for part in m.parts:
                visit(part)
        elif isinstance(m, Document):
            docs.append(m)
        elif isinstance(m, Padding):
            pads.append(m)
        elif not isinstance(m, Causal):
            raise ValueError(
                "among must be built from fm.padding(...), fm.document(...) and fm.causal() "
                f"combined with `&`, got {m!r}"
            )

    if among is not None:
        if not isinstance(among, Mask):
            raise TypeError(f"among must be a flexmask mask, got {type(among).__name__}")
        visit(among)
    if len(docs) > 1 or len(pads) > 1:
        raise ValueError(f"among may hold at most one document and one padding mask, got {among!r}")
    return (docs[0] if docs else None), (pads[0] if pads else None)


def _check_scores(name: str, scores) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} scores must be a tensor [batch, heads, kv_len], got {type(scores).__name__}")
    if scores.dim() != 3 or not scores.dtype.is_floating_point:
        raise ValueError(
            f"{name} scores must be a floating tensor [batch, heads, kv_len], "
            f"got dtype {scores.dtype} and shape {tuple(scores.shape)}"
        )
    return scores


class _ContentMask(Mask):
    """Shared by :class:`TopK` and :class:`TopKBlocks`: scores, ``among`` and shape checks."""

    def __init__(self, scores: torch.Tensor, k: int, among: Mask | None, name: str):
        self.scores = _check_scores(name, scores)
        self.k = _positive_int("k", k)
        self.among = among
        self._documents, self._padding = _candidates(among)
        # Checked once here, not on every attention call; not inside torch.compile, where reading the
        # ids would break the graph (the documents flexmask.hf builds from padding are contiguous).
        if self._documents is not None and not torch.compiler.is_compiling():
            ids = self._documents.ids
            # contiguous documents: as many id changes along each row as in the row sorted
            changes = (ids[:, 1:] != ids[:, :-1]).sum(-1)
            ordered = ids.sort(-1).values
            if bool((changes != (ordered[:, 1:] != ordered[:, :-1]).sum(-1)).any()):
                raise ValueError("top-k among documents needs each document's positions to be contiguous (packed)")
        self._cache: dict = {}

    def _children(self):
        return () if self.among is None else (self.among,)

    def _dims(self):
        batch = self.scores.shape[0]
        if self.among is not None:
            other = self.among._dims()[0]
            if other not in (None, 1, batch) and batch != 1:
                raise ValueError(f"among has batch {other} but scores have batch {batch}")
            batch = max(batch, other or 1)
        return batch, self.scores.shape[1]

    def _check_shapes(self, layout: Layout, length: int, what: str) -> None:
        b, hs, n = self.scores.shape
        if b not in (1, layout.batch):
            raise ValueError(f"scores have batch {b}, but the inputs have batch {layout.batch}")
        if layout.heads % hs:
            raise ValueError(
                f"scores have {hs} heads (shape {tuple(self.scores.shape)}); it must divide the "
                f"{layout.heads} query heads (use the query heads or the KV heads)"
            )
        if n != length:
            raise ValueError(f"scores have length {n}, expected {what}")
        if self.among is not None:
            self.among._check(layout)

    def _candidate_scores(self, layout: Layout, per_key: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Detached float32 scores ``[B, Hs, N]`` with non-candidates at -inf, and segments or None."""
        s = self.scores.detach().to(device=layout.device, dtype=torch.float32)
        s = torch.nan_to_num(s, nan=float("-inf"))  # NaN ranks lowest (no device sync to check)
        s = s.expand(layout.batch, *s.shape[1:])
        if self._padding is not None and per_key:
            lengths = self._padding.lengths.to(layout.device).view(-1, 1, 1)
            s = s.masked_fill(torch.arange(s.shape[-1], device=layout.device) >= lengths, float("-inf"))
        segments = None
        if self._documents is not None:
            ids = self._documents.ids.to(layout.device)
            ids = ids.expand(layout.batch, ids.shape[-1])
            segments = F.pad(torch.cumsum(ids[:, 1:] != ids[:, :-1], -1), (1, 0))[:, None].expand_as(s)
        return s, segments

    def _cache_key(self, layout: Layout) -> tuple:
        # scores updated in place must not reuse a stale selection
        return (layout.batch, layout.device, self.scores.data_ptr(), self.scores._version)

    def cached(self, name, layout: Layout, compute):
        """``compute()`` once per (name, layout, score contents) — for backends' derived state.

        Inside ``torch.compile`` nothing is cached: the computation is traced into the graph (the
        cache key reads the scores' storage address, which a traced graph cannot).
        """
        if torch.compiler.is_compiling():
            return compute()
        key = (name, *self._cache_key(layout))
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def _selection(self, layout: Layout, compute):
        """The selection (``compute()``) for the current score contents; new contents drop
        everything derived from the old ones. Traced, not cached, inside ``torch.compile``."""
        if torch.compiler.is_compiling():
            return compute()
        key = self._cache_key(layout)
        if key not in self._cache:
            self._cache = {key: compute()}
        return self._cache[key]

    def _with_among(self, layout, fn):
        if self.among is None:
            return fn
        among = self.among._mask_mod(layout)

        def content_among(b, h, q_idx, kv_idx):
            return fn(b, h, q_idx, kv_idx) & among(b, h, q_idx, kv_idx)

        return content_among

    def _classify_among(self, layout, qr, kr, any_, all_):
        if self.among is None:
            return any_, all_
        a_any, a_all = self.among._classify(layout, qr, kr)
        return any_ & a_any, all_ & a_all


def _interval_extents(ends: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key block: the smallest interval end, and the largest end among keys ever kept."""
    n = ends.shape[-1]
    positions = torch.arange(n, device=ends.device)
    alive = torch.where(ends > positions, ends, torch.full_like(ends, -1))
    return per_block_min_max(ends, block_size)[0], per_block_min_max(alive, block_size)[1]


class TopK(_ContentMask):
    def __init__(self, scores: torch.Tensor, k: int, among: Mask | None = None):
        super().__init__(scores, k, among, "topk")

    def interval_ends(self, layout: Layout) -> torch.Tensor:
        """``e`` [B, Hs, KV] int32: query ``i`` keeps key ``j`` iff ``j <= i < e[j]``."""

        def compute():
            s, segments = self._candidate_scores(layout)
            b, hs, n = s.shape
            flat = None if segments is None else segments.reshape(b * hs, n)
            if layout.q_len == 1:  # decoding: the one query (the last position) keeps the k best ranks
                rank = _rank_keys(s.reshape(b * hs, n), flat)
                pos = torch.arange(n, device=s.device)
                e = torch.where(rank < self.k, n, pos).reshape(b, hs, n)
            else:
                e = _interval_ends_fused(s.reshape(b * hs, n), self.k, flat).reshape(b, hs, n)
            return e.to(torch.int32)

        return self._selection(layout, compute)

    def _check(self, layout):
        self._check_shapes(layout, layout.kv_len, f"kv_len={layout.kv_len} (one score per key)")

    def _mask_mod(self, layout):
        ends = self.interval_ends(layout)
        group = layout.heads // ends.shape[1]

        def topk(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < ends[b, h // group, kv_idx])

        return self._with_among(layout, topk)

    def _classify(self, layout, qr, kr):
        ends = self.interval_ends(layout)
        e_min, e_max = _interval_extents(ends, kr.size)  # eager: compiled, it recompiled per cache length
        # one score head stays one BlockMask head (broadcast): flex's decoding kernel needs that with GQA
        group = layout.heads // ends.shape[1] if ends.shape[1] > 1 else 1
        e_max = e_max.repeat_interleave(group, 1)[:, :, None, :]
        e_min = e_min.repeat_interleave(group, 1)[:, :, None, :]
        any_ = (kr.lo <= qr.hi) & (e_max > qr.lo)
        all_ = (kr.hi <= qr.lo) & (e_min > qr.hi)
        return self._classify_among(layout, qr, kr, any_, all_)

    def __repr__(self):
        among = "" if self.among is None else f", among={self.among!r}"
        return f"topk(<scores {tuple(self.scores.shape)}>, {self.k}{among})"


class TopKBlocks(_ContentMask):
    def __init__(self, scores: torch.Tensor, k: int, block_size: int = 128, among: Mask | None = None):
        super().__init__(scores, k, among, "topk_blocks")
        self.block_size = _positive_int("block_size", block_size)

    def _num_blocks(self, layout):
        return -(-layout.kv_len // self.block_size)

    def _check(self, layout):
        n = self.scores.shape[-1]
        nb = self._num_blocks(layout)
        if n not in (layout.kv_len, nb):
            raise ValueError(
                f"topk_blocks scores have length {n}; expected kv_len={layout.kv_len} (one score per key) "
                f"or {nb} (one per block of {self.block_size})"
            )
        self._check_shapes(layout, n, f"kv_len={layout.kv_len} or {nb}")

    def block_selection(self, layout: Layout) -> torch.Tensor:
        """``[2, B, Hs, nb]``: the rank of each key block (0 = best) and each query block's threshold.

        Query block ``t`` keeps past block ``u < t`` iff ``rank[u] <= threshold[t]``.
        """

        def compute():
            bs, nb = self.block_size, self._num_blocks(layout)
            per_key = self.scores.shape[-1] != nb
            s, _ = self._candidate_scores(layout, per_key=per_key)
            if per_key:  # a block's score is its best key's
                pad = nb * bs - layout.kv_len
                s = F.pad(s, (0, pad), value=float("-inf")).view(*s.shape[:-1], nb, bs).amax(-1)
            elif self._padding is not None:  # blocks starting past the length don't compete
                lengths = self._padding.lengths.to(layout.device).view(-1, 1, 1)
                s = s.masked_fill(torch.arange(nb, device=layout.device) * bs >= lengths, float("-inf"))
            b, hs, _ = s.shape
            return _block_ranks(s.reshape(b * hs, nb), self.k).reshape(2, b, hs, nb)

        return self._selection(layout, compute)

    def _replayed_block_mask(self, layout: Layout, block_size: int):
        # the common training case (CUDA, eager, self-attention, no `among`, the selection's own
        # block size) replays the whole build, selection included, from one CUDA graph
        nb = self._num_blocks(layout)
        if not (
            GRAPHED_BUILD
            and layout.device.type == "cuda"
            and not torch.compiler.is_compiling()
            and self.among is None
            and block_size == self.block_size
            and layout.offset == 0
            and layout.batch * layout.heads * nb * nb <= _GRAPHED_BLOCKS
        ):
            return None
        k, bs = self.k, self.block_size
        sel, *tensors = _graphed_build(self.scores.detach().to(layout.device), key=(k, bs, layout))
        self._selection(layout, lambda: sel)  # the mask_mod reads the replayed selection
        return block_mask_from_tensors(tensors, self._mask_mod(layout), layout.q_len, layout.kv_len, bs)

    def _mask_mod(self, layout):
        sel = self.block_selection(layout)
        rank, threshold = sel[0], sel[1]
        group = layout.heads // rank.shape[1]
        bs = self.block_size

        def topk_blocks(b, h, q_idx, kv_idx):
            qb, kb = q_idx // bs, kv_idx // bs
            past = (kb < qb) & (rank[b, h // group, kb] <= threshold[b, h // group, qb])
            return past | ((kb == qb) & (kv_idx <= q_idx))

        return self._with_among(layout, topk_blocks)

    def _classify(self, layout, qr, kr):
        if qr.size != self.block_size or layout.offset % self.block_size:
            # selection grid and BlockMask grid differ: classify by evaluating the mask blockwise
            from .masks import _classify_densely

            return _classify_densely(self._mask_mod(layout), layout, qr, kr)
        sel = self.block_selection(layout)
        group = layout.heads // sel.shape[2] if sel.shape[2] > 1 else 1  # one score head: broadcast
        rank = sel[0].repeat_interleave(group, 1)  # [B, Hq or 1, nb]
        threshold = sel[1].repeat_interleave(group, 1)
        bs = self.block_size
        t_lo, t_hi = (qr.lo // bs)[:, 0], (qr.hi // bs)[:, 0]  # absolute query blocks of each call block
        u = torch.arange(rank.shape[-1], device=rank.device)

        def selected(t):  # [B, Hq, nQ, nK]: past block u selected for query block t
            return (u[None, :] < t[:, None]) & (rank[:, :, None, :] <= threshold[:, :, t][..., None])

        s_lo, s_hi = selected(t_lo), selected(t_hi)
        diagonal = ((u[None, :] >= t_lo[:, None]) & (u[None, :] <= t_hi[:, None])) & (kr.lo <= qr.hi)
        return self._classify_among(layout, qr, kr, s_lo | s_hi | diagonal, s_lo & s_hi)

    def __repr__(self):
        among = "" if self.among is None else f", among={self.among!r}"
        return f"topk_blocks(<scores {tuple(self.scores.shape)}>, {self.k}, block_size={self.block_size}{among})"


# Set to False to build topk_blocks BlockMasks eagerly (about a hundred launches) on CUDA too.
GRAPHED_BUILD = True
_GRAPHED_BLOCKS = 1 << 22  # batch × heads × blocks²: 16 heads at 64k (a graph's pool: ~0.3 GB)


def _build_from_scores(scores: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
    """The selection ``[2, B, Hs, nb]`` and the eight BlockMask index tensors of
    ``topk_blocks(scores, k, block_size)`` for ``layout``, all int32 (what :class:`CudaGraphed` replays)."""
    k, block_size, layout = key
    mask = TopKBlocks(scores, k, block_size)
    sel = mask.block_selection(layout).to(torch.int32)
    any_, all_ = classify(mask, layout, block_size)
    return (sel, *_block_tensors(any_, all_))


_graphed_build = CudaGraphed(_build_from_scores)


def topk(scores: torch.Tensor, k: int, *, among: Mask | None = None) -> Mask:
    """Content top-k: query ``i`` keeps the ``k`` highest-scoring keys ``j <= i``.

    Ties go to the later key, so constant scores select exactly ``sliding_window(k)``. The top-k is
    a discrete choice on detached scores (use :func:`flexmask.key_bias` to send gradients to them).

    Args:
        scores: ``[B, Hs, KV]``, one score per key; ``Hs`` is the query heads, the KV heads (shared
            by each query-head group) or 1.
        k: keys kept per query (all of them while fewer exist).
        among: restricts the candidates first: ``fm.padding(lengths)``, ``fm.document(ids)``
            (packed, contiguous documents) or both with ``&``. The result is ``among & top-k``.

    Example:
        >>> import torch, flexmask as fm
        >>> s = torch.tensor([[[5.0, 1.0, 0.0, 3.0, 2.0]]])
        >>> fm.topk(s, 2).to_dense(5, 5)[0, 0].int().tolist()
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 0]]
    """
    return TopK(scores, k, among)


def topk_blocks(scores: torch.Tensor, k: int, *, block_size: int = 128, among: Mask | None = None) -> Mask:
    """Hardware-aligned top-k: each query block keeps its ``k`` best past key blocks plus its own.

    A key block's score is the max of its keys' scores (or give one score per block). Query block
    ``t`` keeps the ``k`` blocks ``u < t`` with the highest block score (ties to the later block)
    and its diagonal block, causal inside. Every kept past block is a full block: no mask is
    evaluated there.

    Args:
        scores: ``[B, Hs, KV]`` per key or ``[B, Hs, ceil(KV / block_size)]`` per block.
        k: past key blocks kept per query block.
        block_size: block length (the BlockMask's, 128 by default).
        among: ``fm.padding(lengths)`` (blocks past the length don't compete); documents restrict
            the result but not the ranking.
    """
    return TopKBlocks(scores, k, block_size, among)


# ---------------------------------------------------------------------------------------------
# the module


def dynamic_bias(
    value_states: torch.Tensor,
    dt_proj: nn.Linear,
    A: torch.Tensor,
    form: Literal["exp", "linear"] = "exp",
) -> torch.Tensor:
    """DMA's per-key content score from the value states.

    ``dt = dt_proj(v as [B, N, Hkv·D])``; ``exp(A · softplus(dt))`` ("exp", the paper's and Doge's)
    or ``A · softplus(dt)`` ("linear").

    Args:
        value_states: ``[B, Hkv, N, D]``.
        dt_proj: ``Linear(Hkv·D, Hb)``.
        A: ``[Hb]``, one gate per bias head.

    Returns:
        ``[B, Hb, N]`` float32 (float64 for float64 inputs).
    """
    dt = dt_proj(rearrange(value_states, "b h n d -> b n (h d)"))
    compute = torch.float64 if dt.dtype == torch.float64 else torch.float32
    gated = A.to(compute) * F.softplus(dt.to(compute))
    if form == "exp":
        gated = torch.exp(gated)
    elif form != "linear":
        raise ValueError(f"form must be 'exp' or 'linear', got {form!r}")
    return rearrange(gated, "b n h -> b h n")


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding (half-split convention) of ``x`` [B, H, N, D] at ``positions`` [B, N]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions[:, None, :, None].float() * inv_freq
    cos, sin = torch.cos(angles).repeat(1, 1, 1, 2), torch.sin(angles).repeat(1, 1, 1, 2)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def check_options(bias_form: str, bias_heads: str, selection: str) -> None:
    """Validate DMA's string options (shared by :class:`DynamicMaskAttention` and ``hf.to_dma``)."""
    if bias_form not in ("exp", "linear"):
        raise ValueError(f"bias_form must be 'exp' or 'linear', got {bias_form!r}")
    if bias_heads not in ("kv", "q"):
        raise ValueError(f"bias_heads must be 'kv' or 'q', got {bias_heads!r}")
    if selection not in ("token", "block"):
        raise ValueError(f"selection must be 'token' or 'block', got {selection!r}")


class DynamicMaskAttention(nn.Module):
    """A self-attention layer with Dynamic Mask Attention.

    ``forward(x)`` with ``x`` [B, N, hidden] returns [B, N, hidden]. Per-key scores come from the
    value states (:func:`dynamic_bias`); each query keeps its ``keep_window`` best keys
    (``selection="token"``) or best key blocks (``"block"``) and adds the scores to the logits.
    ``A`` starts at zero, where the layer is sliding-window attention of ``keep_window`` keys.

    Args:
        hidden_size: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA), default ``num_heads``.
        head_dim: default ``hidden_size // num_heads``.
        keep_window: keys kept per query (``w``).
        bias_form: ``"exp"`` (paper, Doge) or ``"linear"``.
        bias_heads: ``"kv"`` (one score per KV head) or ``"q"`` (per query head).
        selection: ``"token"`` (exact per-key top-k) or ``"block"`` (top ``keep_window // block_size``
            key blocks).
        block_size: block length for ``"block"`` selection.
        rope_theta: rotary base, or ``None`` for no rotary embedding.
        bias: whether the q/k/v/o projections have biases.

    Example:
        >>> import torch, flexmask as fm
        >>> layer = fm.DynamicMaskAttention(64, num_heads=4, num_kv_heads=2, keep_window=8)
        >>> layer(torch.randn(2, 20, 64)).shape
        torch.Size([2, 20, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        keep_window: int = 2048,
        *,
        bias_form: Literal["exp", "linear"] = "exp",
        bias_heads: Literal["kv", "q"] = "kv",
        selection: Literal["token", "block"] = "token",
        block_size: int = 128,
        rope_theta: float | None = 10000.0,
        bias: bool = False,
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_options(bias_form, bias_heads, selection)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.keep_window = _positive_int("keep_window", keep_window)
        self.block_size = _positive_int("block_size", block_size)
        self.bias_form, self.selection, self.rope_theta = bias_form, selection, rope_theta
        bias_count = num_kv_heads if bias_heads == "kv" else num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.dt_proj = nn.Linear(num_kv_heads * head_dim, bias_count)
        self.A = nn.Parameter(torch.zeros(bias_count))

    def content_mask(self, scores: torch.Tensor, among: Mask | None = None) -> Mask:
        """The selection mask for per-key ``scores`` [B, Hb, N] (detached inside)."""
        if self.selection == "token":
            return topk(scores, self.keep_window, among=among)
        blocks = max(1, self.keep_window // self.block_size)
        return topk_blocks(scores, blocks, block_size=self.block_size, among=among)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            x: ``[B, N, hidden]``.
            attention_mask: optional ``[B, N]``, 1 for real tokens and 0 for right padding.
            position_ids: optional ``[B, N]`` rotary positions (default ``0..N-1``).

        Returns:
            ``[B, N, hidden]``.
        """
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, seq_len, hidden], got shape {tuple(x.shape)}")
        bsz, n, _ = x.shape
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        if self.rope_theta is not None:
            if position_ids is None:
                position_ids = torch.arange(n, device=x.device).expand(bsz, n)
            q = apply_rotary(q, position_ids, self.rope_theta)
            k = apply_rotary(k, position_ids, self.rope_theta)
        scores = dynamic_bias(v, self.dt_proj, self.A, self.bias_form)
        among = None
        if attention_mask is not None:
            among = Padding(_right_padding_lengths(attention_mask, bsz, n))
        mask = self.content_mask(scores, among)
        out = attention(q, k, v, mask=mask, bias=key_bias(scores.to(q.dtype)))
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))


def _right_padding_lengths(attention_mask: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    if attention_mask.shape != (batch, n):
        raise ValueError(f"attention_mask must be [batch, seq_len] = {[batch, n]}, got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    if not bool((keep == (torch.arange(n, device=keep.device) < lengths[:, None])).all()):
        raise ValueError("attention_mask must be right padding (1s then 0s in every row)")
    return lengths


__all__ = ["DynamicMaskAttention", "dynamic_bias", "topk", "topk_blocks", "interval_ends", "prefix_kth_smallest"]
