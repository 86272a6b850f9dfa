"""The mask algebra: typed masks combined with ``&``, ``|`` and ``~``.

A mask says which keys each query may attend to. Positions are absolute: query ``i`` and key ``j``
index the same sequence, and when there are fewer queries than keys the queries are the last ones
(as with a KV cache).

Each mask lowers two ways:

* to a FlexAttention ``mask_mod`` ``(b, h, q_idx, kv_idx) -> bool`` (``Mask.mask_mod``), and
* to a ``BlockMask`` built from its structure (``Mask.block_mask``), with no ``N × N`` tensor.

Masks are immutable values: they hold their constructor data and nothing derived from calls.

Examples:
    >>> import flexmask as fm
    >>> m = fm.causal() & (fm.sliding_window(4) | fm.prefix_lm(2))
    >>> m
    causal() & (sliding_window(4) | prefix_lm(2))
    >>> m.to_dense(6, 6)[0, 0].int()
    tensor([[1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import torch
from torch.nn.attention.flex_attention import BlockMask

from .._compat import compiled_create_block_mask
from ..lowering.blocks import build_block_mask, states_from_block_mask
from ..lowering.dense import classify_densely, evaluate
from ..lowering.layout import BLOCK, BlockRanges, Layout, Lowering, ModFn, Offers, per_block_min_max, shift_queries
from ..settings import options_in_effect
from ._checks import (
    MAX_SIZE,
    batch_expand,
    check_batch,
    lengths_tensor,
    merge_dim,
    nonnegative_int,
    positive_int,
    real_tensor,
)

BlockStates = tuple[torch.Tensor, torch.Tensor]


class Mask:
    """Base class of every flexmask mask. Combine masks with ``&``, ``|`` and ``~``.

    What a mask type provides to the lowering (see :mod:`flexmask.lowering`): ``_mask_mod`` (its
    rule at absolute positions), ``_classify`` (its block maps), ``_check`` (its tensors against a
    call's shapes), ``_dims``/``_length`` (what its tensors fix), ``_offers`` (extra lowerings) and
    ``_cache_fields`` (its constructor data, for cache keys).
    """

    _precedence = 4

    # -- what subclasses provide ---------------------------------------------------------------
    def _mask_mod(self, low: Lowering) -> ModFn:
        """A ``(b, h, q_idx, kv_idx) -> bool`` function of absolute positions for ``low.layout``."""
        raise NotImplementedError

    def _classify(self, low: Lowering, qr: BlockRanges, kr: BlockRanges) -> BlockStates:
        """``(any, all)`` boolean maps broadcastable to ``[B, H, num_q_blocks, num_kv_blocks]``."""
        raise NotImplementedError

    def _check(self, layout: Layout) -> None:
        """Raise ``ValueError`` if the mask's own tensors don't fit ``layout``."""

    def _dims(self) -> tuple[int | None, int | None]:
        """(batch, heads) fixed by the mask's own tensors, ``None`` where it broadcasts."""
        return None, None

    def _length(self) -> int | None:
        """The key length fixed by the mask's own tensors (one entry per key), else ``None``."""
        return None

    def _offers(self, low: Lowering) -> int:
        """What this mask's lowering offers beyond a ``mask_mod`` and block maps."""
        return Offers.NONE

    def _gather_factor(self) -> Mask | None:
        """A content mask this mask is the intersection of (itself, or a factor of a top-level ``&``)
        whose decoding selection can be gathered (:class:`~flexmask.lowering.layout.Offers`)."""
        return None

    def _needs_lengths(self) -> bool:
        """Whether its ``mask_mod`` depends on the call's lengths beyond what its tensors fix."""
        return any(child._needs_lengths() for child in self._children())

    def _implies(self, other: Mask) -> bool:
        """Whether every pair it keeps is kept by ``other`` too (so ``& other`` changes nothing);
        ``False`` when unknown."""
        return False

    def _essential(self) -> Mask:
        """An equal mask without redundant factors: ``fm.causal() & m`` is ``m`` when ``m`` implies
        causality (content selections do), so that lowerings of ``m`` alone apply."""
        return self

    def _blocks_say_little(self) -> bool:
        """Whether its block maps say little about which keys are kept (content selections, custom
        functions: most of their blocks are "partial"); pictures then show kept keys instead."""
        return any(child._blocks_say_little() for child in self._children())

    def _children(self) -> tuple[Mask, ...]:
        return ()

    def _cache_fields(self) -> tuple:
        """The constructor data that defines the mask (tensors, numbers, functions, child masks)."""
        return tuple(vars(self).values())

    def _map_keys(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Mask:
        """This mask with every tensor indexed by key position (along its last dimension) replaced
        by ``fn(tensor)``: e.g. each shard of a sequence split over devices gathered into the whole.
        Masks without such tensors return themselves; a custom function is kept as it is (it sees
        absolute positions, so it must read whole-sequence tensors)."""
        return self

    # -- the algebra -------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return And(self, _as_mask(other, "&"))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, _as_mask(other, "|"))

    def __invert__(self) -> Mask:
        return Not(self)

    def __rand__(self, other):
        return And(_as_mask(other, "&"), self)

    def __ror__(self, other):
        return Or(_as_mask(other, "|"), self)

    def __bool__(self):
        raise TypeError(
            f"a flexmask mask has no truth value (got `{self!r}` in a boolean context). "
            "Combine masks with `&` (and), `|` (or) and `~` (not); the Python keywords "
            "`and`, `or`, `not` would silently keep only one of the masks."
        )

    # -- lowering ----------------------------------------------------------------------------
    @property
    def mask_mod(self) -> ModFn:
        """The FlexAttention ``mask_mod`` ``(b, h, q_idx, kv_idx) -> bool`` at absolute positions.

        It is exact for any query and key position the mask's tensors cover. Head ``h`` reads the
        mask's own head ``h`` (for a content mask with ``Hs`` score heads under GQA, use
        ``mask.block_mask(q_len, kv_len, heads=Hq).mask_mod``, whose positions are call-local).

        Examples:
            >>> import torch, flexmask as fm
            >>> fm.sliding_window(2).mask_mod(0, 0, torch.tensor(5), torch.tensor(3))
            tensor(False)
        """
        if self._needs_lengths():
            raise ValueError(
                f"the mask_mod of {self!r} depends on the call's lengths; use "
                "mask.block_mask(q_len, kv_len, heads=H).mask_mod (call-local query positions)"
            )
        batch, heads = self._dims()
        n = self._length() or 1
        layout = Layout(batch or 1, heads or 1, n, n, _device_of(self, None))
        self._check(layout)
        return self._mask_mod(Lowering(layout, options_in_effect()))

    def _layout(self, q_len, kv_len, batch, heads, device) -> Layout:
        q_len = positive_int("q_len", q_len)
        kv_len = positive_int("kv_len", kv_len)
        if q_len > kv_len:
            raise ValueError(
                f"q_len={q_len} is larger than kv_len={kv_len}; queries are the last q_len "
                "of the kv_len positions, so q_len must be <= kv_len"
            )
        own_batch, own_heads = self._dims()
        batch = (own_batch or 1) if batch is None else positive_int("batch", batch)
        heads = (own_heads or 1) if heads is None else positive_int("heads", heads)
        layout = Layout(batch, heads, q_len, kv_len, _device_of(self, device))
        self._check(layout)
        return layout

    def to_dense(
        self,
        q_len: int,
        kv_len: int,
        *,
        batch: int | None = None,
        heads: int | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The mask as a dense boolean tensor ``[batch, heads, q_len, kv_len]``.

        This is the dense path (``O(q_len · kv_len)`` memory); use it for checks and pictures.
        ``batch``/``heads`` default to those of the mask's own tensors, else 1.

        Examples:
            >>> import flexmask as fm
            >>> fm.sliding_window(2).to_dense(3, 3).shape
            torch.Size([1, 1, 3, 3])
        """
        layout = self._layout(q_len, kv_len, batch, heads, device)
        return evaluate(self._mask_mod(Lowering(layout, options_in_effect())), layout)

    def block_mask(
        self,
        q_len: int,
        kv_len: int,
        *,
        batch: int | None = None,
        heads: int | None = None,
        device: torch.device | str | None = None,
        block_size: int = BLOCK,
    ) -> BlockMask:
        """A FlexAttention ``BlockMask`` built from the mask's structure (no ``N²`` tensor).

        Its batch and head dimensions are 1 where the mask does not depend on them; its
        ``mask_mod`` takes call-local query positions (``0 .. q_len - 1``), as FlexAttention calls it.

        Examples:
            >>> import flexmask as fm
            >>> bm = fm.causal().block_mask(256, 256, block_size=128)
            >>> bm.kv_num_blocks.shape, bm.full_kv_num_blocks.flatten().tolist()
            (torch.Size([1, 1, 2]), [0, 1])
        """
        block_size = positive_int("block_size", block_size)
        layout = self._layout(q_len, kv_len, batch, heads, device)
        return build_block_mask(self, Lowering(layout, options_in_effect()), block_size)

    def __repr__(self) -> str:  # pragma: no cover - every subclass has its own
        return type(self).__name__ + "()"


# ---------------------------------------------------------------------------------------------
# primitives


class Full(Mask):
    def _mask_mod(self, low):
        def full(b, h, q_idx, kv_idx):
            return kv_idx >= 0

        return full

    def _classify(self, low, qr, kr):
        t = torch.ones((), dtype=torch.bool, device=low.layout.device)
        return t, t

    def __repr__(self):
        return "full()"


class Causal(Mask):
    def _implies(self, other):
        return isinstance(other, Causal)

    def _mask_mod(self, low):
        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        return causal

    def _classify(self, low, qr, kr):
        return kr.lo <= qr.hi, kr.hi <= qr.lo

    def _offers(self, low):
        return Offers.CAUSAL_PARTIAL_BLOCKS if low.layout.starts_on_block else Offers.NONE

    def __repr__(self):
        return "causal()"


class SlidingWindow(Mask):
    def __init__(self, size: int):
        self.size = positive_int("size", size)

    def _mask_mod(self, low):
        size = self.size

        def sliding_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx > q_idx - size)

        return sliding_window

    def _classify(self, low, qr, kr):
        any_ = (kr.lo <= qr.hi) & (kr.hi > qr.lo - self.size)
        all_ = (kr.hi <= qr.lo) & (kr.lo > qr.hi - self.size)
        return any_, all_

    def __repr__(self):
        return f"sliding_window({self.size})"


class Chunked(Mask):
    def __init__(self, size: int):
        self.size = positive_int("size", size)

    def _mask_mod(self, low):
        size = self.size

        def chunked(b, h, q_idx, kv_idx):
            return q_idx // size == kv_idx // size

        return chunked

    def _classify(self, low, qr, kr):
        s = self.size
        any_ = (qr.lo // s <= kr.hi // s) & (kr.lo // s <= qr.hi // s)
        all_ = (qr.lo // s == qr.hi // s) & (kr.lo // s == kr.hi // s) & (qr.lo // s == kr.lo // s)
        return any_, all_

    def __repr__(self):
        return f"chunked({self.size})"


class PrefixLM(Mask):
    def __init__(self, length: int | torch.Tensor):
        if isinstance(length, torch.Tensor):
            self.length = lengths_tensor("length", length)
        else:
            self.length = nonnegative_int("length", length)

    def _mask_mod(self, low):
        length = self.length
        if isinstance(length, torch.Tensor):
            length = batch_expand(length.to(low.layout.device), low.layout.batch)

            def prefix_lm_per_row(b, h, q_idx, kv_idx):
                return (kv_idx < length[b]) | (kv_idx <= q_idx)

            return prefix_lm_per_row

        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx < length) | (kv_idx <= q_idx)

        return prefix_lm

    def _classify(self, low, qr, kr):
        length = self.length
        if isinstance(length, torch.Tensor):
            length = length.to(low.layout.device).view(-1, 1, 1, 1)
        any_ = (kr.lo < length) | (kr.lo <= qr.hi)
        all_ = (kr.hi < length) | (kr.hi <= qr.lo)
        return any_, all_

    def _check(self, layout):
        if isinstance(self.length, torch.Tensor):
            check_batch("prefix_lm lengths", self.length.shape[0], layout.batch)

    def _dims(self):
        return (self.length.shape[0], None) if isinstance(self.length, torch.Tensor) else (None, None)

    def __repr__(self):
        if isinstance(self.length, torch.Tensor):
            return f"prefix_lm(<lengths {tuple(self.length.shape)}>)"
        return f"prefix_lm({self.length})"


class Document(Mask):
    def __init__(self, ids: torch.Tensor):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"document ids must be an int tensor [batch, seq_len], got {type(ids).__name__}")
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(
                "document ids must be an integer tensor of shape [batch, seq_len], "
                f"got dtype {ids.dtype} and shape {tuple(ids.shape)}"
            )
        if ids.numel() == 0:
            raise ValueError(f"document ids must not be empty, got shape {tuple(ids.shape)}")
        if ids.shape[1] > MAX_SIZE:
            raise ValueError(f"document ids may cover at most {MAX_SIZE:,} positions, got {ids.shape[1]:,}")
        self.ids = real_tensor("document ids", ids)

    def _mask_mod(self, low):
        ids = batch_expand(self.ids.to(low.layout.device), low.layout.batch)

        def document(b, h, q_idx, kv_idx):
            return ids[b, q_idx] == ids[b, kv_idx]

        return document

    def _classify(self, low, qr, kr):
        ids = self.ids.to(low.layout.device)
        qmin, qmax = per_block_min_max(ids, qr.size, qr.start, qr.length)
        kmin, kmax = per_block_min_max(ids, kr.size, kr.start, kr.length)
        qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
        kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
        any_ = (qmin <= kmax) & (kmin <= qmax)
        all_ = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return any_, all_

    def _check(self, layout):
        check_batch("document ids", self.ids.shape[0], layout.batch)
        if self.ids.shape[1] != layout.kv_len:
            raise ValueError(
                f"document ids have length {self.ids.shape[1]} but the keys have length "
                f"kv_len={layout.kv_len}; ids must give one id per key position ([batch, kv_len])"
            )

    def _dims(self):
        return self.ids.shape[0], None

    def _length(self):
        return self.ids.shape[1]

    def _map_keys(self, fn):
        return Document(fn(self.ids))

    def __repr__(self):
        return f"document(<ids {tuple(self.ids.shape)}>)"


class Padding(Mask):
    def __init__(self, lengths: torch.Tensor):
        self.lengths = lengths_tensor("lengths", lengths)

    def _mask_mod(self, low):
        lengths = batch_expand(self.lengths.to(low.layout.device), low.layout.batch)

        def padding(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

        return padding

    def _classify(self, low, qr, kr):
        lengths = self.lengths.to(low.layout.device).view(-1, 1, 1, 1)
        return kr.lo < lengths, kr.hi < lengths

    def _check(self, layout):
        check_batch("padding lengths", self.lengths.shape[0], layout.batch)

    def _dims(self):
        return self.lengths.shape[0], None

    def __repr__(self):
        return f"padding(<lengths {tuple(self.lengths.shape)}>)"


class KeyMask(Mask):
    """Keys that exist: key ``j`` is kept iff ``valid[b, j]`` (any padding pattern, left padding included).

    ``valid`` is a bool tensor ``[B or 1, kv_len]``. Its block maps come from per-block min/max,
    so building its ``BlockMask`` costs ``O(kv_len)``.
    """

    def __init__(self, valid: torch.Tensor):
        if not isinstance(valid, torch.Tensor):
            raise TypeError(f"key mask valid must be a bool tensor [batch, kv_len], got {type(valid).__name__}")
        if valid.dim() != 2 or valid.dtype != torch.bool or 0 in valid.shape:
            raise ValueError(
                f"key mask valid must be a non-empty bool tensor [batch, kv_len], "
                f"got dtype {valid.dtype} and shape {tuple(valid.shape)}"
            )
        self.valid = real_tensor("key mask valid", valid)

    def _mask_mod(self, low):
        valid = batch_expand(self.valid.to(low.layout.device), low.layout.batch)

        def key_mask(b, h, q_idx, kv_idx):
            return valid[b, kv_idx]

        return key_mask

    def _classify(self, low, qr, kr):
        valid = self.valid.to(device=low.layout.device, dtype=torch.int8)
        lo, hi = per_block_min_max(valid, kr.size, kr.start, kr.length)
        return (hi > 0)[:, None, None, :], (lo > 0)[:, None, None, :]

    def _check(self, layout):
        batch, length = self.valid.shape
        if batch not in (1, layout.batch) or length != layout.kv_len:
            raise ValueError(
                f"key mask has shape {tuple(self.valid.shape)}, expected [{layout.batch} or 1, {layout.kv_len}]"
            )

    def _dims(self):
        return self.valid.shape[0], None

    def _length(self):
        return self.valid.shape[1]

    def _map_keys(self, fn):
        return KeyMask(fn(self.valid))

    def __repr__(self):
        return f"key_mask(<valid {tuple(self.valid.shape)}>)"


class Custom(Mask):
    def __init__(self, fn: Callable[..., torch.Tensor], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"fm.mask expects a function (b, h, q_idx, kv_idx) -> bool, got {type(fn).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"fm.mask name must be a str, got {type(name).__name__}")
        _check_four_arguments(fn)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")

    def _mask_mod(self, low):
        return self.fn

    def _blocks_say_little(self):
        return True

    def _classify(self, low, qr, kr):
        layout = low.layout
        if layout.device.type == "cuda":  # torch's compiled builder evaluates the function blockwise
            mod = shift_queries(self.fn, layout.offset, layout.device)
            bm = compiled_create_block_mask(
                mod, layout.batch, layout.heads, layout.q_len, layout.kv_len, layout.device, qr.size
            )
            return states_from_block_mask(bm)
        return classify_densely(self.fn, layout, qr, kr)

    def __repr__(self):
        return f"mask({self.name})"


# ---------------------------------------------------------------------------------------------
# combinators


class _Combined(Mask):
    """A mask made of other masks; shapes and checks come from its parts."""

    def __init__(self, *parts: Mask):
        self.parts = parts

    def _children(self):
        return self.parts

    def _map_keys(self, fn):
        return type(self)(*(part._map_keys(fn) for part in self.parts))

    def _check(self, layout):
        for part in self.parts:
            part._check(layout)

    def _dims(self):
        dims = [part._dims() for part in self.parts]
        return merge_dim([d[0] for d in dims], "batch"), merge_dim([d[1] for d in dims], "heads")

    def _length(self):
        lengths = {n for n in (part._length() for part in self.parts) if n is not None}
        return max(lengths) if lengths else None


class And(_Combined):
    _precedence = 2

    def _implies(self, other):
        return any(part._implies(other) for part in self.parts)

    def _essential(self):
        kept: list[Mask] = []
        for f in _factors(self):
            if not any(o._implies(f) for o in kept):  # (of factors that imply each other, the first stays)
                kept = [o for o in kept if not f._implies(o)] + [f]
        return kept[0] if len(kept) == 1 else self  # (no new object: lowered masks are cached by identity)

    def _gather_factor(self):
        return next((f for f in (part._gather_factor() for part in self.parts) if f is not None), None)

    def _mask_mod(self, low):
        fa, fb = (part._mask_mod(low) for part in self.parts)

        def and_mask(b, h, q_idx, kv_idx):
            return fa(b, h, q_idx, kv_idx) & fb(b, h, q_idx, kv_idx)

        return and_mask

    def _classify(self, low, qr, kr):
        (any_a, all_a), (any_b, all_b) = (part._classify(low, qr, kr) for part in self.parts)
        return any_a & any_b, all_a & all_b

    def __repr__(self):
        a, b = self.parts
        return f"{_wrap(a, 2)} & {_wrap(b, 2)}"


class Or(_Combined):
    _precedence = 1

    def _mask_mod(self, low):
        fa, fb = (part._mask_mod(low) for part in self.parts)

        def or_mask(b, h, q_idx, kv_idx):
            return fa(b, h, q_idx, kv_idx) | fb(b, h, q_idx, kv_idx)

        return or_mask

    def _classify(self, low, qr, kr):
        (any_a, all_a), (any_b, all_b) = (part._classify(low, qr, kr) for part in self.parts)
        return any_a | any_b, all_a | all_b

    def __repr__(self):
        a, b = self.parts
        return f"{_wrap(a, 1)} | {_wrap(b, 1)}"


class Not(_Combined):
    _precedence = 3

    def _mask_mod(self, low):
        fa = self.parts[0]._mask_mod(low)

        def not_mask(b, h, q_idx, kv_idx):
            return ~fa(b, h, q_idx, kv_idx)

        return not_mask

    def _classify(self, low, qr, kr):
        any_a, all_a = self.parts[0]._classify(low, qr, kr)
        return ~all_a, ~any_a

    def __repr__(self):
        return f"~{_wrap(self.parts[0], 3)}"


# ---------------------------------------------------------------------------------------------
# public factories


def full() -> Mask:
    """Every query attends to every key."""
    return Full()


def causal() -> Mask:
    """Key ``j`` is kept for query ``i`` iff ``j <= i``.

    Examples:
        >>> import flexmask as fm
        >>> fm.causal().to_dense(3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return Causal()


def sliding_window(size: int) -> Mask:
    """The last ``size`` keys up to and including the query: ``i - size < j <= i``.

    Examples:
        >>> import flexmask as fm
        >>> fm.sliding_window(2).to_dense(3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    return SlidingWindow(size)


def chunked(size: int) -> Mask:
    """Queries and keys in the same chunk of ``size`` positions: ``i // size == j // size``.

    Combine with ``causal()`` for chunked-causal attention.

    Examples:
        >>> import flexmask as fm
        >>> (fm.chunked(2) & fm.causal()).to_dense(4, 4)[0, 0].int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    return Chunked(size)


def prefix_lm(length: int | torch.Tensor) -> Mask:
    """Bidirectional over a prefix, causal after it: ``j < length or j <= i``.

    ``length`` is an int, or an int tensor ``[B]`` with one prefix length per batch row.

    Examples:
        >>> import flexmask as fm
        >>> fm.prefix_lm(2).to_dense(3, 3)[0, 0].int().tolist()
        [[1, 1, 0], [1, 1, 0], [1, 1, 1]]
    """
    return PrefixLM(length)


def document(ids: torch.Tensor) -> Mask:
    """Packed sequences: query and key attend iff they carry the same id.

    Args:
        ids: integer tensor ``[B, kv_len]``, one document id per position.

    Examples:
        >>> import torch, flexmask as fm
        >>> m = fm.causal() & fm.document(torch.tensor([[0, 0, 1, 1]]))
        >>> m.to_dense(4, 4)[0, 0].int().tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    return Document(ids)


def padding(lengths: torch.Tensor) -> Mask:
    """Keys past each row's length are masked: ``j < lengths[b]``.

    Args:
        lengths: integer tensor ``[B]``, the number of valid keys in each batch row.

    Examples:
        >>> import torch, flexmask as fm
        >>> fm.padding(torch.tensor([2])).to_dense(1, 3)[0, 0].int().tolist()
        [[1, 1, 0]]
    """
    return Padding(lengths)


def key_mask(valid: torch.Tensor) -> Mask:
    """Keys that exist: key ``j`` of row ``b`` is kept iff ``valid[b, j]``, for any padding pattern
    (left padding, a tokenizer's ``attention_mask``); ``fm.padding(lengths)`` is the right-padded case.

    Args:
        valid: bool tensor ``[B or 1, kv_len]``.

    Examples:
        >>> import torch, flexmask as fm
        >>> fm.key_mask(torch.tensor([[False, True, True]])).to_dense(1, 3)[0, 0].int().tolist()
        [[0, 1, 1]]
    """
    return KeyMask(valid)


def mask(fn: Callable[..., torch.Tensor], name: str | None = None) -> Mask:
    """A custom mask from a FlexAttention-style function ``(b, h, q_idx, kv_idx) -> bool``.

    ``q_idx`` and ``kv_idx`` are absolute positions. Its ``BlockMask`` is built by evaluating the
    function blockwise (torch's compiled ``create_block_mask`` on CUDA). Lowered masks are cached
    by the function's identity and the tensors it closes over (see :func:`flexmask.clear_cache`).

    Examples:
        >>> import flexmask as fm
        >>> even = fm.mask(lambda b, h, q, kv: kv % 2 == 0, name="even_keys")
        >>> fm.causal() & even
        causal() & mask(even_keys)
    """
    return Custom(fn, name)


# ---------------------------------------------------------------------------------------------
# helpers


def _check_four_arguments(fn: Callable) -> None:
    """A ``TypeError`` now, not at the first call, for a mask function that cannot take
    ``(b, h, q_idx, kv_idx)``; functions whose signature Python cannot read pass, as does
    everything while tracing (a compiled model builds its masks inside the graph)."""
    if torch.compiler.is_compiling():
        return
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables
        return
    try:
        signature.bind(0, 0, 0, 0)
    except TypeError:
        raise TypeError(
            f"fm.mask expects a function (b, h, q_idx, kv_idx) -> bool, got one with signature {signature}"
        ) from None


def _wrap(m: Mask, precedence: int) -> str:
    return f"({m!r})" if m._precedence < precedence else repr(m)


def _as_mask(other, op: str) -> Mask:
    if not isinstance(other, Mask):
        raise TypeError(
            f"`{op}` combines flexmask masks; got {type(other).__name__}. Wrap a function with fm.mask(fn)."
        )
    return other


def _device_of(m: Mask, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in tensors_of(m):
        return t.device
    return torch.device("cpu")


def tensors_of(m: Mask) -> Iterator[torch.Tensor]:
    """Every tensor a mask holds, its parts' included."""
    for value in vars(m).values():
        if isinstance(value, torch.Tensor):
            yield value
    for child in m._children():
        yield from tensors_of(child)


def _factors(m: Mask) -> list[Mask]:
    """The factors of a tree of ``&`` (each simplified), in order."""
    if isinstance(m, And):
        return [f for part in m.parts for f in _factors(part)]
    return [m._essential()]
