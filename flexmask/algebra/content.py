"""Content masks: top-k selection over per-key scores (Dynamic Mask Attention's masks).

:func:`topk` keeps, for each query, the ``k`` best-scored keys at or before it;
:func:`topk_blocks` keeps each query block's ``k`` best past key blocks. Both are ordinary masks
of the algebra (combine them with ``&``, ``|``, ``~``). They are immutable: the selection is
computed when a call lowers them (:mod:`flexmask.lowering.selection`), once per lowering, and
kept by the one cache for the same scores (identity and version), shapes and options.

Examples:
    >>> import torch, flexmask as fm
    >>> s = torch.tensor([[[5.0, 1.0, 0.0, 3.0, 2.0]]])
    >>> fm.topk(s, 2).to_dense(5, 5)[0, 0].int().tolist()
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 0]]
"""

from __future__ import annotations

import operator

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..lowering import decode, selection
from ..lowering.blocks import block_mask_from_tensors
from ..lowering.decode import Gathered
from ..lowering.dense import classify_densely
from ..lowering.layout import BLOCK, Layout, Lowering, Offers, cdiv, hopper, local_mask_mod
from ..lowering.token_layout import TokenLayout, token_layout
from ._checks import positive_int, real_tensor
from .masks import And, Causal, Document, KeyMask, Mask, Padding


def _candidates(among: Mask | None) -> tuple[Document | None, Padding | None, KeyMask | None]:
    """Split ``among`` into the document, padding and key-mask parts top-k selection understands."""
    found: dict[type, list[Mask]] = {Document: [], Padding: [], KeyMask: []}
    if among is not None:
        if not isinstance(among, Mask):
            raise TypeError(f"among must be a flexmask mask, got {type(among).__name__}")
        _collect(among, found)
    if any(len(parts) > 1 for parts in found.values()):
        raise ValueError(f"among may hold at most one document, one padding and one key mask, got {among!r}")
    documents, padding, keys = (parts[0] if parts else None for parts in found.values())
    return documents, padding, keys


def _collect(m: Mask, found: dict[type, list[Mask]]) -> None:
    # a module-level function: a recursive closure would be a reference cycle holding the masks
    if isinstance(m, And):
        for part in m.parts:
            _collect(part, found)
    elif type(m) in found:
        found[type(m)].append(m)
    elif not isinstance(m, Causal):
        raise ValueError(
            "among must be built from fm.padding(...), fm.document(...), fm.key_mask(...) and fm.causal() "
            f"combined with `&`, got {m!r}"
        )


def _check_scores(name: str, scores: object) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} scores must be a tensor [batch, heads, kv_len], got {type(scores).__name__}")
    if scores.dim() != 3 or not scores.dtype.is_floating_point:
        raise ValueError(
            f"{name} scores must be a floating tensor [batch, heads, kv_len], "
            f"got dtype {scores.dtype} and shape {tuple(scores.shape)}"
        )
    if 0 in scores.shape:
        raise ValueError(f"{name} scores must not be empty, got shape {tuple(scores.shape)}")
    return real_tensor(f"{name} scores", scores)


class _ContentMask(Mask):
    """Shared by :class:`TopK` and :class:`TopKBlocks`: scores, ``k``, ``among`` and shape checks."""

    def __init__(self, scores: torch.Tensor, k: int, among: Mask | None, name: str):
        self.scores = _check_scores(name, scores)
        self.k = positive_int("k", k)
        self.among = among
        documents, padding, keys = _candidates(among)
        # Checked once here, not on every call; not inside torch.compile, where reading the ids would
        # break the graph (the documents flexmask.hf builds from padding are contiguous).
        if documents is not None and not torch.compiler.is_compiling():
            ids = documents.ids
            # contiguous documents: as many id changes along each row as in the row sorted
            changes = (ids[:, 1:] != ids[:, :-1]).sum(-1)
            ordered = ids.sort(-1).values
            if bool((changes != (ordered[:, 1:] != ordered[:, :-1]).sum(-1)).any()):
                raise ValueError("top-k among documents needs each document's positions to be contiguous (packed)")
        self._ids = None if documents is None else documents.ids
        self._lengths = None if padding is None else padding.lengths
        self._valid = None if keys is None else keys.valid

    def _competing(self, n: int, device: torch.device) -> torch.Tensor | None:
        """``[B|1, n]`` bool: the keys that compete, by ``among``'s padding (keys before its lengths)
        and key mask together; ``None`` when every key does."""
        valid = None if self._valid is None else self._valid.to(device)
        if self._lengths is not None:
            in_length = torch.arange(n, device=device) < self._lengths.to(device).view(-1, 1)
            valid = in_length if valid is None else valid & in_length
        return valid

    def _competing_in(self, low: Lowering) -> torch.Tensor | None:
        """:meth:`_competing` over the call's keys, once per lowering."""
        layout = low.layout
        return low.derive(self, "competing", lambda: self._competing(layout.kv_len, layout.device))

    def _cache_fields(self):
        return (self.scores, self.k, self.among, getattr(self, "block_size", None))

    def _token_scores_shape(self) -> torch.Size:
        """(Offers.TOKEN_LAYOUT, TOKEN_ENDS) the shape of its scores: a key bias must match it."""
        return self.scores.shape

    def _children(self):
        return () if self.among is None else (self.among,)

    def _gather_factor(self):
        return self

    def _implies(self, other):
        # a query keeps keys at or before it only, and only keys its ``among`` keeps
        return (
            isinstance(other, Causal)
            or (isinstance(other, Document) and other.ids is self._ids)
            or (isinstance(other, Padding) and other.lengths is self._lengths)
            or (isinstance(other, KeyMask) and other.valid is self._valid)
        )

    def _blocks_say_little(self):
        return True

    def _map_keys(self, fn):
        among = None if self.among is None else self.among._map_keys(fn)
        if isinstance(self, TopKBlocks):
            return TopKBlocks(fn(self.scores), self.k, self.block_size, among)
        return TopK(fn(self.scores), self.k, among)

    def _content_mod(self, low: Lowering, fn):
        """``fn`` (the selection's rule) with ``among``; in a gathering lowering of this mask, the
        gather applies the selection, so only ``among`` remains."""
        if low.gathered_by is self:
            if self.among is None:

                def gathered(b, h, q_idx, kv_idx):
                    return kv_idx >= 0

                return gathered
            return self.among._mask_mod(low)
        return self._with_among(low, fn)

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

    def _with_among(self, low: Lowering, fn):
        if self.among is None:
            return fn
        among = self.among._mask_mod(low)

        def content_among(b, h, q_idx, kv_idx):
            return fn(b, h, q_idx, kv_idx) & among(b, h, q_idx, kv_idx)

        return content_among

    def _classify_among(self, low, qr, kr, any_, all_):
        if self.among is None:
            return any_, all_
        a_any, a_all = self.among._classify(low, qr, kr)
        return any_ & a_any, all_ & a_all


class TopK(_ContentMask):
    """What :func:`topk` returns: a mask of the algebra, and for decoding its :meth:`keep`."""

    def __init__(self, scores: torch.Tensor, k: int, among: Mask | None = None, kept: torch.Tensor | None = None):
        super().__init__(scores, k, among, "topk")
        self.kept = None if kept is None else self._check_kept("topk kept", kept)

    def _check_kept(self, name: str, kept: object) -> torch.Tensor:
        if not isinstance(kept, torch.Tensor):
            raise TypeError(f"{name} must be an int64 tensor from keep(), got {type(kept).__name__}")
        _, hs, n = self.scores.shape
        width = min(self.k, n)
        if kept.dtype != torch.int64 or kept.dim() != 3 or kept.shape[1:] != (hs, width):
            raise ValueError(
                f"{name} must be int64 [batch, {hs}, {width}] (what keep() returns for scores "
                f"{tuple(self.scores.shape)} and k={self.k}), got dtype {kept.dtype} and shape {tuple(kept.shape)}"
            )
        return kept

    def keep(self, query: int | torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The keys this selection keeps for one query: ``[B, Hs, min(k, KV)]`` int64 key positions,
        ``-1`` where it keeps fewer. Decoding passes them back with ``fm.topk(..., kept=)``.

        Without ``previous``: one top-k over all ``KV`` scores. With ``previous``, what this method
        returned for the query at ``query - 1`` over the same scores (a KV cache's scores, with the
        new key's written since): ``O(k)`` work, those keys and key ``query`` less the one ranked
        last. That is exact because a key's rank among the keys before a query does not depend on
        the query; it is the caller's part to pass the previous query's keys (a step replayed at
        the same position, or one at position 0, is exact too).

        Args:
            query: the query's position among the ``KV`` keys (an int, or a one-element tensor: no
                host synchronisation, fixed shapes, so a decoding step can be a CUDA graph).
            previous: ``[B, Hs, S]`` int64, the keys kept for the query before, or ``None``.

        Examples:
            >>> import torch, flexmask as fm
            >>> s = torch.tensor([[[5.0, 1.0, 0.0, 3.0, 2.0]]])
            >>> kept = fm.topk(s, 2).keep(3)
            >>> kept.sort(-1).values.tolist(), fm.topk(s, 2).keep(4, previous=kept).sort(-1).values.tolist()
            ([[[0, 3]]], [[[0, 3]]])
        """
        if isinstance(query, torch.Tensor):
            if query.numel() != 1 or query.dtype.is_floating_point or query.dtype == torch.bool:
                raise ValueError(
                    f"keep's query must be one integer position, got a {query.dtype} tensor of shape "
                    f"{tuple(query.shape)}"
                )
            # read only where that costs no device synchronisation (and not while tracing)
            readable = query.device.type == "cpu" and not torch.compiler.is_compiling()
            position = int(query) if readable else None
        elif isinstance(query, bool) or not hasattr(query, "__index__"):
            raise TypeError(f"keep's query must be an int or a one-element tensor, got {type(query).__name__}")
        else:
            query = position = operator.index(query)  # (a NumPy integer, say)
        n = self.scores.shape[-1]
        if position is not None and not 0 <= position < n:
            raise ValueError(f"keep's query must be a position in 0 .. {n - 1} (the scores' keys), got {position}")
        batch = self._dims()[0]
        valid = self._competing(n, self.scores.device)
        if previous is None:
            return decode.kept_keys(self.scores, self.k, query, batch, self._ids, valid)
        self._check_kept("keep's previous", previous)
        if previous.shape[0] not in (1, batch):
            raise ValueError(f"keep's previous has batch {previous.shape[0]}, expected {batch}")
        return decode.kept_step(self.scores, previous, query, batch, self._ids, valid)

    def interval_ends(self, low: Lowering) -> torch.Tensor:
        """``e`` ``[B, Hs, KV]`` int32: query ``i`` keeps key ``j`` iff ``j <= i < e[j]`` (among aside)."""

        def compute():
            layout = low.layout
            s, segments = selection.key_candidates(self.scores, layout, self._ids, self._competing_in(low))
            last_only = layout.q_len == 1 and layout.last_query_is_last_key
            return selection.topk_ends(s, segments, self.k, last_only)

        return low.derive(self, "ends", compute)

    def _length(self):
        return self.scores.shape[-1]

    def _offers(self, low):
        return Offers.GATHER_DECODE | Offers.TOKEN_ENDS | (Offers.TOKEN_LAYOUT if self.among is None else Offers.NONE)

    def _token_layout(self, low: Lowering, graphed: bool) -> TokenLayout:
        """(Offers.TOKEN_LAYOUT) its key layout for ``low.layout`` (self-attention, KV heads known)."""
        return token_layout(self.scores, self.k, low.layout, graphed)

    def _token_keep(self) -> int:
        """(Offers.TOKEN_ENDS) the most keys one query keeps."""
        return self.k

    def _token_ends(self, low: Lowering) -> torch.Tensor:
        """(Offers.TOKEN_ENDS) ends ``e`` ``[B, Hs, KV]`` int32 with which the whole mask is
        ``j <= i < e[j]``: :meth:`interval_ends` with ``among`` folded in (a key's run of queries
        stops at its document's end; a padded key keeps none). Without ``among``, on CUDA with
        option ``graphed_build``, built by a CUDA-graph replay."""
        if self.among is not None:
            return selection.fold_among(self.interval_ends(low), self._ids, self._competing_in(low))
        if low.options.graphed_build and low.layout.device.type == "cuda":
            scores = self.scores.detach().to(low.layout.device)
            return selection.graphed_ends(scores, self.k, low.layout.batch)
        return self.interval_ends(low)

    def _decode_gather(self, low: Lowering) -> Gathered:
        """(Offers.GATHER_DECODE) the ``min(k, L)`` keys the last query keeps (see :mod:`flexmask.lowering.decode`),
        or the ``kept`` ones given."""
        if self.kept is not None:
            return decode.given_candidates(self.kept, low.layout)
        return decode.topk_candidates(self.scores, self.k, low.layout, self._ids, self._competing_in(low))

    def _mask_mod(self, low):
        if low.gathered_by is self:
            return self._content_mod(low, None)
        ends = self.interval_ends(low)
        group = low.layout.heads // ends.shape[1]

        def topk(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx < ends[b, h // group, kv_idx])

        return self._content_mod(low, topk)

    def _classify(self, low, qr, kr):
        any_, all_ = selection.topk_states(self.interval_ends(low), low.layout.heads, qr, kr)
        return self._classify_among(low, qr, kr, any_, all_)

    def _cache_fields(self):
        return (*super()._cache_fields(), self.kept)

    def _check(self, layout):
        self._check_shapes(layout, layout.kv_len, f"kv_len={layout.kv_len} (one score per key)")
        if self.kept is not None and self.kept.shape[0] not in (1, layout.batch):
            raise ValueError(f"topk kept has batch {self.kept.shape[0]}, but the inputs have batch {layout.batch}")

    def __repr__(self):
        among = "" if self.among is None else f", among={self.among!r}"
        kept = "" if self.kept is None else f", kept=<{tuple(self.kept.shape)}>"
        return f"topk(<scores {tuple(self.scores.shape)}>, {self.k}{among}{kept})"


class TopKBlocks(_ContentMask):
    def __init__(self, scores: torch.Tensor, k: int, block_size: int = BLOCK, among: Mask | None = None):
        super().__init__(scores, k, among, "topk_blocks")
        self.block_size = positive_int("block_size", block_size)

    def _check(self, layout):
        n = self.scores.shape[-1]
        nb = cdiv(layout.kv_len, self.block_size)
        if n not in (layout.kv_len, nb):
            raise ValueError(
                f"topk_blocks scores have length {n}; expected kv_len={layout.kv_len} (one score per key) "
                f"or {nb} (one per block of {self.block_size})"
            )
        self._check_shapes(layout, n, f"kv_len={layout.kv_len} or {nb}")

    def _offers(self, low):
        # its interval ends are offered where the in-place token kernels are Gluon kernels (Hopper): as
        # fast as its BlockMask path eagerly (flex, the fused backward), faster compiled (flex's backward)
        ends = Offers.TOKEN_ENDS if hopper(low.layout.device) else Offers.NONE
        if self.among is not None or self.block_size != BLOCK or not low.layout.starts_on_block:
            return Offers.GATHER_DECODE | ends
        return Offers.CAUSAL_PARTIAL_BLOCKS | Offers.GRAPHED_BUILD | Offers.GATHER_DECODE | ends

    def _token_keep(self) -> int:
        """(Offers.TOKEN_ENDS) the most keys one query keeps: ``k`` past blocks and its own."""
        return (self.k + 1) * self.block_size

    def _token_ends(self, low: Lowering) -> torch.Tensor:
        """(Offers.TOKEN_ENDS, self-attention) ends ``e`` ``[B, Hs, KV]`` int32 with which the whole
        mask is ``j <= i < e[j]`` (:func:`flexmask.lowering.selection.topk_blocks_ends`), ``among``
        folded in (a key's run stops at its document's end; a padded or masked key keeps none).
        Without ``among``, on CUDA with option ``graphed_build``, built by a CUDA-graph replay
        (within the graphs' memory budget, as its BlockMask's)."""
        layout = low.layout
        cuda = layout.device.type == "cuda"
        if self.among is None and low.options.graphed_build and cuda and self._graphed_build_fits(layout):
            scores = self.scores.detach().to(layout.device)
            return selection.graphed_topk_blocks_ends(scores, key=(self.k, self.block_size, layout))[0]
        ends = selection.topk_blocks_ends(self.block_selection(low), self.block_size, layout.kv_len)
        return ends if self.among is None else selection.fold_among(ends, self._ids, self._competing_in(low))

    def _graphed_build_fits(self, layout: Layout) -> bool:
        """(Offers.GRAPHED_BUILD) whether a graph for ``layout`` stays within its memory budget."""
        blocks = cdiv(layout.q_len, self.block_size) * cdiv(layout.kv_len, self.block_size)
        return layout.batch * layout.heads * blocks <= selection.GRAPHED_BLOCKS_LIMIT

    def _graphed_block_mask(self, low: Lowering) -> BlockMask:
        """(Offers.GRAPHED_BUILD) its BlockMask with the whole build, selection included, replayed
        from a CUDA graph; the selection also serves its ``mask_mod``."""
        layout = low.layout
        key = (self.k, self.block_size, layout)
        sel, *tensors = selection.graphed_topk_blocks(self.scores.detach().to(layout.device), key=key)
        low.derive(self, "blocks", lambda: sel)
        return block_mask_from_tensors(tensors, local_mask_mod(self, low), layout.q_len, layout.kv_len, self.block_size)

    def block_selection(self, low: Lowering) -> torch.Tensor:
        """``[2, B, Hs, nb]``: the rank of each key block (0 = best) and each query block's threshold.

        Query block ``t`` keeps past block ``u < t`` iff ``rank[u] <= threshold[t]``.
        """
        return low.derive(
            self,
            "blocks",
            lambda: selection.block_selection(
                self.scores, self.k, self.block_size, low.layout, self._competing_in(low)
            ),
        )

    def _needs_lengths(self):
        return True  # its scores may be per key or per block: the key length decides

    def _decode_gather(self, low: Lowering) -> Gathered:
        """(Offers.GATHER_DECODE) the positions of the blocks the last query keeps, ``valid`` where kept."""
        return decode.topk_blocks_candidates(self.scores, self.k, self.block_size, low.layout, self._competing_in(low))

    def _mask_mod(self, low):
        if low.gathered_by is self:
            return self._content_mod(low, None)
        sel = self.block_selection(low)
        rank, threshold = sel[0], sel[1]
        group = low.layout.heads // rank.shape[1]
        bs = self.block_size

        def topk_blocks(b, h, q_idx, kv_idx):
            qb, kb = q_idx // bs, kv_idx // bs
            past = (kb < qb) & (rank[b, h // group, kb] <= threshold[b, h // group, qb])
            return past | ((kb == qb) & (kv_idx <= q_idx))

        return self._content_mod(low, topk_blocks)

    def _classify(self, low, qr, kr):
        if qr.size != self.block_size or low.layout.offset % self.block_size:
            # selection grid and BlockMask grid differ: classify by evaluating the mask blockwise
            return classify_densely(self._mask_mod(low), low.layout, qr, kr)
        sel = self.block_selection(low)
        any_, all_ = selection.topk_blocks_states(sel, low.layout.heads, self.block_size, qr, kr)
        return self._classify_among(low, qr, kr, any_, all_)

    def __repr__(self):
        among = "" if self.among is None else f", among={self.among!r}"
        return f"topk_blocks(<scores {tuple(self.scores.shape)}>, {self.k}, block_size={self.block_size}{among})"


def topk(scores: torch.Tensor, k: int, *, among: Mask | None = None, kept: torch.Tensor | None = None) -> Mask:
    """Content top-k: query ``i`` keeps the ``k`` highest-scoring keys ``j <= i``.

    Ties go to the later key, so constant scores select exactly ``sliding_window(k)``. The top-k is
    a discrete choice on detached scores (use :func:`flexmask.key_bias` to send gradients to them).
    float64 scores are ranked in float64, others in float32; NaN ranks lowest.

    Args:
        scores: ``[B, Hs, KV]``, one score per key; ``Hs`` is the query heads, the KV heads (shared
            by each query-head group) or 1.
        k: keys kept per query (all of them while fewer exist).
        among: restricts the candidates first: ``fm.padding(lengths)``, ``fm.key_mask(valid)``
            (keys where ``valid`` is false never compete: left padding, for one), ``fm.document(ids)``
            (packed, contiguous documents), or several of them with ``&``. The result is
            ``among & top-k``.
        kept: for decoding, the keys the one query keeps, as ``fm.topk(...).keep`` returns them
            (``[B, Hs, min(k, KV)]`` int64): a one-query call then attends to those (and ``among``'s)
            instead of selecting over all ``KV`` keys again. flexmask does not check that they are
            the top-k: pass what ``keep`` returned for this query and these scores. Other calls
            (several queries, or the reference backend) select as usual.

    Examples:
        >>> import torch, flexmask as fm
        >>> s = torch.tensor([[[5.0, 1.0, 0.0, 3.0, 2.0]]])
        >>> fm.topk(s, 2).to_dense(5, 5)[0, 0].int().tolist()
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 0]]
    """
    return TopK(scores, k, among, kept)


def topk_blocks(scores: torch.Tensor, k: int, *, block_size: int = BLOCK, among: Mask | None = None) -> Mask:
    """Hardware-aligned top-k: each query block keeps its ``k`` best past key blocks plus its own.

    A key block's score is the max of its keys' scores (or give one score per block). Query block
    ``t`` keeps the ``k`` blocks ``u < t`` with the highest block score (ties to the later block)
    and its diagonal block, causal inside. Every kept past block is a full block: no mask is
    evaluated there.

    Args:
        scores: ``[B, Hs, KV]`` per key or ``[B, Hs, ceil(KV / block_size)]`` per block.
        k: past key blocks kept per query block.
        block_size: block length (the BlockMask's, 128 by default).
        among: ``fm.padding(lengths)`` (blocks past the length don't compete), ``fm.key_mask(valid)``
            (blocks with no valid key don't compete; a block's score is its best valid key's);
            documents restrict the result but not the ranking.

    Examples:
        >>> import torch, flexmask as fm
        >>> s = torch.tensor([[[0.0, 9.0, 1.0, 0.0]]])       # one score per block of 2
        >>> fm.topk_blocks(s, 1, block_size=2).to_dense(8, 8)[0, 0, 6].int().tolist()
        [0, 0, 1, 1, 0, 0, 1, 0]
    """
    return TopKBlocks(scores, k, block_size, among)
