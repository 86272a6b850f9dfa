"""The mask algebra: typed masks combined with ``&``, ``|`` and ``~``.

A mask says which keys each query may attend to. Positions are absolute: query ``i`` and key ``j``
index the same sequence, and when there are fewer queries than keys the queries are the last ones
(as with a KV cache).

Each mask lowers two ways:

* to a FlexAttention ``mask_mod`` ``(b, h, q_idx, kv_idx) -> bool`` (``Mask.mask_mod``), and
* to a ``BlockMask`` built from its structure (``Mask.block_mask``), with no ``N × N`` tensor.

Example:
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

from collections.abc import Callable, Hashable

import torch
from torch.nn.attention.flex_attention import BlockMask

from .blocks import (
    BlockRanges,
    Layout,
    ModFn,
    build_block_mask,
    per_block_min_max,
    shift_queries,
    states_from_block_mask,
)

BlockStates = tuple[torch.Tensor, torch.Tensor]

# Evaluating a mask densely (custom masks, `to_dense`) works on slices of at most this many
# booleans, so memory stays bounded whatever the sequence length.
DENSE_CHUNK_ELEMENTS = 1 << 26


class Mask:
    """Base class of every flexmask mask. Combine masks with ``&``, ``|`` and ``~``."""

    _precedence = 4

    # -- what subclasses provide ---------------------------------------------------------------
    def _mask_mod(self, layout: Layout) -> ModFn:
        """A ``(b, h, q_idx, kv_idx) -> bool`` function of absolute positions for ``layout``."""
        raise NotImplementedError

    def _classify(self, layout: Layout, qr: BlockRanges, kr: BlockRanges) -> BlockStates:
        """``(any, all)`` boolean maps broadcastable to ``[B, H, num_q_blocks, num_kv_blocks]``."""
        raise NotImplementedError

    def _check(self, layout: Layout) -> None:
        """Raise ``ValueError`` if the mask's own tensors don't fit ``layout``."""

    def _dims(self) -> tuple[int | None, int | None]:
        """(batch, heads) fixed by the mask's own tensors, ``None`` where it broadcasts."""
        return None, None

    def _key(self) -> Hashable | None:
        """A hashable description of the mask when it holds no tensor (for caching), else None."""
        return None

    def _replayed_block_mask(self, layout: Layout, block_size: int):
        """A ``BlockMask`` from a captured CUDA graph, for masks that have one (else None)."""
        return None

    def _children(self) -> tuple[Mask, ...]:
        return ()

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
        """The FlexAttention ``mask_mod`` ``(b, h, q_idx, kv_idx) -> bool`` (absolute positions)."""
        batch, heads = self._dims()
        return self._mask_mod(Layout(batch or 1, heads or 1, 1, 1, _device_of(self, None)))

    def _layout(self, q_len, kv_len, batch, heads, device) -> Layout:
        q_len = _positive_int("q_len", q_len)
        kv_len = _positive_int("kv_len", kv_len)
        if q_len > kv_len:
            raise ValueError(
                f"q_len={q_len} is larger than kv_len={kv_len}; queries are the last q_len "
                "of the kv_len positions, so q_len must be <= kv_len"
            )
        own_batch, own_heads = self._dims()
        batch = (own_batch or 1) if batch is None else _positive_int("batch", batch)
        heads = (own_heads or 1) if heads is None else _positive_int("heads", heads)
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

        Example:
            >>> import flexmask as fm
            >>> fm.sliding_window(2).to_dense(3, 3).shape
            torch.Size([1, 1, 3, 3])
        """
        layout = self._layout(q_len, kv_len, batch, heads, device)
        return evaluate(self._mask_mod(layout), layout)

    def block_mask(
        self,
        q_len: int,
        kv_len: int,
        *,
        batch: int | None = None,
        heads: int | None = None,
        device: torch.device | str | None = None,
        block_size: int = 128,
    ) -> BlockMask:
        """A FlexAttention ``BlockMask`` built from the mask's structure (no ``N²`` tensor).

        Its batch and head dimensions are 1 where the mask does not depend on them.

        Example:
            >>> import flexmask as fm
            >>> bm = fm.causal().block_mask(256, 256, block_size=128)
            >>> bm.kv_num_blocks.shape, bm.full_kv_num_blocks.flatten().tolist()
            (torch.Size([1, 1, 2]), [0, 1])
        """
        block_size = _positive_int("block_size", block_size)
        layout = self._layout(q_len, kv_len, batch, heads, device)
        return build_block_mask(self, layout, block_size)

    def __repr__(self) -> str:  # pragma: no cover - every subclass has its own
        return type(self).__name__ + "()"


def evaluate(mod: ModFn, layout: Layout, rows: slice | None = None) -> torch.Tensor:
    """Evaluate a mask function of absolute positions on a dense grid ``[B, H, Q, KV]``.

    Index tensors broadcast (``b`` is ``[B,1,1,1]``, ``kv`` is ``[1,1,1,KV]``, ...), so any
    ``mask_mod`` written with elementwise tensor operations and indexing works unchanged.
    """
    dev = layout.device
    start, stop = (0, layout.q_len) if rows is None else (rows.start, rows.stop)
    b = torch.arange(layout.batch, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(layout.heads, device=dev).view(1, -1, 1, 1)
    q = torch.arange(start, stop, device=dev).view(1, 1, -1, 1) + layout.offset
    kv = torch.arange(layout.kv_len, device=dev).view(1, 1, 1, -1)
    out = torch.as_tensor(mod(b, h, q, kv), device=dev)
    if out.dtype != torch.bool:
        raise TypeError(f"a mask function must return a bool tensor, got dtype {out.dtype}")
    return out.expand(layout.batch, layout.heads, stop - start, layout.kv_len).clone()


# ---------------------------------------------------------------------------------------------
# primitives


class Full(Mask):
    def _mask_mod(self, layout):
        def full(b, h, q_idx, kv_idx):
            return kv_idx >= 0

        return full

    def _classify(self, layout, qr, kr):
        t = torch.ones((), dtype=torch.bool, device=layout.device)
        return t, t

    def _key(self):
        return ("full",)

    def __repr__(self):
        return "full()"


class Causal(Mask):
    def _mask_mod(self, layout):
        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        return causal

    def _classify(self, layout, qr, kr):
        return kr.lo <= qr.hi, kr.hi <= qr.lo

    def _key(self):
        return ("causal",)

    def __repr__(self):
        return "causal()"


class SlidingWindow(Mask):
    def __init__(self, size: int):
        self.size = _positive_int("size", size)

    def _mask_mod(self, layout):
        size = self.size

        def sliding_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx > q_idx - size)

        return sliding_window

    def _classify(self, layout, qr, kr):
        any_ = (kr.lo <= qr.hi) & (kr.hi > qr.lo - self.size)
        all_ = (kr.hi <= qr.lo) & (kr.lo > qr.hi - self.size)
        return any_, all_

    def _key(self):
        return ("sliding_window", self.size)

    def __repr__(self):
        return f"sliding_window({self.size})"


class Chunked(Mask):
    def __init__(self, size: int):
        self.size = _positive_int("size", size)

    def _mask_mod(self, layout):
        size = self.size

        def chunked(b, h, q_idx, kv_idx):
            return q_idx // size == kv_idx // size

        return chunked

    def _classify(self, layout, qr, kr):
        s = self.size
        any_ = (qr.lo // s <= kr.hi // s) & (kr.lo // s <= qr.hi // s)
        all_ = (qr.lo // s == qr.hi // s) & (kr.lo // s == kr.hi // s) & (qr.lo // s == kr.lo // s)
        return any_, all_

    def _key(self):
        return ("chunked", self.size)

    def __repr__(self):
        return f"chunked({self.size})"


class PrefixLM(Mask):
    def __init__(self, length: int | torch.Tensor):
        if isinstance(length, torch.Tensor):
            self.length = _lengths_tensor("length", length)
        else:
            self.length = _nonnegative_int("length", length)

    def _mask_mod(self, layout):
        length = self.length
        if isinstance(length, torch.Tensor):
            length = _batch_expand(length.to(layout.device), layout.batch)

            def prefix_lm_per_row(b, h, q_idx, kv_idx):
                return (kv_idx < length[b]) | (kv_idx <= q_idx)

            return prefix_lm_per_row

        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx < length) | (kv_idx <= q_idx)

        return prefix_lm

    def _classify(self, layout, qr, kr):
        length = self.length
        if isinstance(length, torch.Tensor):
            length = length.to(layout.device).view(-1, 1, 1, 1)
        any_ = (kr.lo < length) | (kr.lo <= qr.hi)
        all_ = (kr.hi < length) | (kr.hi <= qr.lo)
        return any_, all_

    def _check(self, layout):
        if isinstance(self.length, torch.Tensor):
            _check_batch("prefix_lm lengths", self.length.shape[0], layout.batch)

    def _dims(self):
        return (self.length.shape[0], None) if isinstance(self.length, torch.Tensor) else (None, None)

    def _key(self):
        return None if isinstance(self.length, torch.Tensor) else ("prefix_lm", self.length)

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
        self.ids = ids

    def _mask_mod(self, layout):
        ids = _batch_expand(self.ids.to(layout.device), layout.batch)

        def document(b, h, q_idx, kv_idx):
            return ids[b, q_idx] == ids[b, kv_idx]

        return document

    def _classify(self, layout, qr, kr):
        ids = self.ids.to(layout.device)
        qmin, qmax = per_block_min_max(ids, qr.size, qr.start, qr.length)
        kmin, kmax = per_block_min_max(ids, kr.size, kr.start, kr.length)
        qmin, qmax = qmin[:, None, :, None], qmax[:, None, :, None]
        kmin, kmax = kmin[:, None, None, :], kmax[:, None, None, :]
        any_ = (qmin <= kmax) & (kmin <= qmax)
        all_ = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return any_, all_

    def _check(self, layout):
        _check_batch("document ids", self.ids.shape[0], layout.batch)
        if self.ids.shape[1] != layout.kv_len:
            raise ValueError(
                f"document ids have length {self.ids.shape[1]} but the keys have length "
                f"kv_len={layout.kv_len}; ids must give one id per key position ([batch, kv_len])"
            )

    def _dims(self):
        return self.ids.shape[0], None

    def __repr__(self):
        return f"document(<ids {tuple(self.ids.shape)}>)"


class Padding(Mask):
    def __init__(self, lengths: torch.Tensor):
        self.lengths = _lengths_tensor("lengths", lengths)

    def _mask_mod(self, layout):
        lengths = _batch_expand(self.lengths.to(layout.device), layout.batch)

        def padding(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

        return padding

    def _classify(self, layout, qr, kr):
        lengths = self.lengths.to(layout.device).view(-1, 1, 1, 1)
        return kr.lo < lengths, kr.hi < lengths

    def _check(self, layout):
        _check_batch("padding lengths", self.lengths.shape[0], layout.batch)

    def _dims(self):
        return self.lengths.shape[0], None

    def __repr__(self):
        return f"padding(<lengths {tuple(self.lengths.shape)}>)"


class Custom(Mask):
    def __init__(self, fn: Callable[..., torch.Tensor], name: str | None = None):
        if not callable(fn):
            raise TypeError(f"fm.mask expects a function (b, h, q_idx, kv_idx) -> bool, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")

    def _mask_mod(self, layout):
        return self.fn

    def _classify(self, layout, qr, kr):
        if layout.device.type == "cuda":
            # torch's compiled builder evaluates the function blockwise in one fused kernel.
            from torch.nn.attention.flex_attention import create_block_mask

            mod = shift_queries(self.fn, layout.offset, layout.device)
            bm = create_block_mask(
                mod, layout.batch, layout.heads, layout.q_len, layout.kv_len,
                device=layout.device, BLOCK_SIZE=qr.size, _compile=True,
            )
            return states_from_block_mask(bm)
        return _classify_densely(self.fn, layout, qr, kr)

    def __repr__(self):
        return f"mask({self.name})"


def _classify_densely(mod: ModFn, layout: Layout, qr: BlockRanges, kr: BlockRanges) -> BlockStates:
    """Block states by evaluating ``mod`` one slab of query blocks at a time (bounded memory)."""
    bs, nq, nk = qr.size, qr.count, kr.count
    per_row = layout.batch * layout.heads * layout.kv_len
    blocks_per_step = max(1, DENSE_CHUNK_ELEMENTS // (per_row * bs))
    pad = nk * bs - layout.kv_len
    any_parts, all_parts = [], []
    for first in range(0, nq, blocks_per_step):
        last = min(nq, first + blocks_per_step)
        rows = slice(first * bs, min(last * bs, layout.q_len))
        d = evaluate(mod, layout, rows)  # [B, H, rows, KV]
        d_any = torch.nn.functional.pad(d, (0, pad), value=False)
        d_all = torch.nn.functional.pad(d, (0, pad), value=True)
        n_rows = rows.stop - rows.start
        row_pad = (last - first) * bs - n_rows
        d_any = torch.nn.functional.pad(d_any, (0, 0, 0, row_pad), value=False)
        d_all = torch.nn.functional.pad(d_all, (0, 0, 0, row_pad), value=True)
        shape = (layout.batch, layout.heads, last - first, bs, nk, bs)
        any_parts.append(d_any.view(shape).any(-1).any(-2))
        all_parts.append(d_all.view(shape).all(-1).all(-2))
    return torch.cat(any_parts, dim=2), torch.cat(all_parts, dim=2)


# ---------------------------------------------------------------------------------------------
# combinators


class _Combined(Mask):
    """A mask made of other masks; shapes, checks and cache keys come from its parts."""

    def __init__(self, *parts: Mask):
        self.parts = parts

    def _children(self):
        return self.parts

    def _check(self, layout):
        for part in self.parts:
            part._check(layout)

    def _dims(self):
        dims = [part._dims() for part in self.parts]
        return _merge_dim([d[0] for d in dims], "batch"), _merge_dim([d[1] for d in dims], "heads")

    def _key(self):
        keys = [part._key() for part in self.parts]
        return None if any(k is None for k in keys) else (type(self).__name__, *keys)


class And(_Combined):
    _precedence = 2

    def _mask_mod(self, layout):
        fa, fb = (part._mask_mod(layout) for part in self.parts)

        def and_mask(b, h, q_idx, kv_idx):
            return fa(b, h, q_idx, kv_idx) & fb(b, h, q_idx, kv_idx)

        return and_mask

    def _classify(self, layout, qr, kr):
        (any_a, all_a), (any_b, all_b) = (part._classify(layout, qr, kr) for part in self.parts)
        return any_a & any_b, all_a & all_b

    def __repr__(self):
        a, b = self.parts
        return f"{_wrap(a, 2)} & {_wrap(b, 2)}"


class Or(_Combined):
    _precedence = 1

    def _mask_mod(self, layout):
        fa, fb = (part._mask_mod(layout) for part in self.parts)

        def or_mask(b, h, q_idx, kv_idx):
            return fa(b, h, q_idx, kv_idx) | fb(b, h, q_idx, kv_idx)

        return or_mask

    def _classify(self, layout, qr, kr):
        (any_a, all_a), (any_b, all_b) = (part._classify(layout, qr, kr) for part in self.parts)
        return any_a | any_b, all_a | all_b

    def __repr__(self):
        a, b = self.parts
        return f"{_wrap(a, 1)} | {_wrap(b, 1)}"


class Not(_Combined):
    _precedence = 3

    def _mask_mod(self, layout):
        fa = self.parts[0]._mask_mod(layout)

        def not_mask(b, h, q_idx, kv_idx):
            return ~fa(b, h, q_idx, kv_idx)

        return not_mask

    def _classify(self, layout, qr, kr):
        any_a, all_a = self.parts[0]._classify(layout, qr, kr)
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

    Example:
        >>> import flexmask as fm
        >>> fm.causal().to_dense(3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return Causal()


def sliding_window(size: int) -> Mask:
    """The last ``size`` keys up to and including the query: ``i - size < j <= i``.

    Example:
        >>> import flexmask as fm
        >>> fm.sliding_window(2).to_dense(3, 3)[0, 0].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    return SlidingWindow(size)


def chunked(size: int) -> Mask:
    """Queries and keys in the same chunk of ``size`` positions: ``i // size == j // size``.

    Combine with ``causal()`` for chunked-causal attention.
    """
    return Chunked(size)


def prefix_lm(length: int | torch.Tensor) -> Mask:
    """Bidirectional over a prefix, causal after it: ``j < length or j <= i``.

    ``length`` is an int, or an int tensor ``[B]`` with one prefix length per batch row.
    """
    return PrefixLM(length)


def document(ids: torch.Tensor) -> Mask:
    """Packed sequences: query and key attend iff they carry the same id.

    Args:
        ids: integer tensor ``[B, kv_len]``, one document id per position.

    Example:
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
    """
    return Padding(lengths)


def mask(fn: Callable[..., torch.Tensor], name: str | None = None) -> Mask:
    """A custom mask from a FlexAttention-style function ``(b, h, q_idx, kv_idx) -> bool``.

    ``q_idx`` and ``kv_idx`` are absolute positions. Its ``BlockMask`` is built by evaluating the
    function blockwise (torch's compiled ``create_block_mask`` on CUDA).

    Example:
        >>> import flexmask as fm
        >>> even = fm.mask(lambda b, h, q, kv: kv % 2 == 0, name="even_keys")
        >>> fm.causal() & even
        causal() & mask(even_keys)
    """
    return Custom(fn, name)


# ---------------------------------------------------------------------------------------------
# helpers


def _wrap(m: Mask, precedence: int) -> str:
    return f"({m!r})" if m._precedence < precedence else repr(m)


def _as_mask(other, op: str) -> Mask:
    if not isinstance(other, Mask):
        raise TypeError(
            f"`{op}` combines flexmask masks; got {type(other).__name__}. "
            "Wrap a function with fm.mask(fn)."
        )
    return other


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _lengths_tensor(name: str, lengths) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor [batch], got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor of shape [batch], got dtype {lengths.dtype} "
            f"and shape {tuple(lengths.shape)}"
        )
    if lengths.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if not torch.compiler.is_compiling() and bool((lengths < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {lengths.tolist()}")
    return lengths


def _check_batch(what: str, got: int, batch: int) -> None:
    if got not in (1, batch):
        raise ValueError(f"{what} have batch size {got}, but the inputs have batch {batch}")


def _batch_expand(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


def _merge_dim(values, what: str) -> int | None:
    sizes = {v for v in values if v is not None and v != 1}
    if len(sizes) > 1:
        raise ValueError(f"masks combined with different {what} sizes: {sorted(sizes)}")
    if sizes:
        return sizes.pop()
    return 1 if any(v == 1 for v in values) else None


def _device_of(m: Mask, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for t in _tensors(m):
        return t.device
    return torch.device("cpu")


def _tensors(m: Mask):
    for value in vars(m).values():
        if isinstance(value, torch.Tensor):
            yield value
    for child in m._children():
        yield from _tensors(child)
