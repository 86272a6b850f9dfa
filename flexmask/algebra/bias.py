"""The bias algebra: additive score terms combined with ``+``, lowered to a ``score_mod``.

A bias adds ``term(b, h, i, j)`` to the scaled score of query ``i`` and key ``j`` (absolute
positions, as in :mod:`flexmask.masks`). Learnable tables and tensors may require grad: the
gradient reaches them through FlexAttention on GPU and through the reference path on CPU.

Examples:
    >>> import torch, flexmask as fm
    >>> b = fm.alibi(4) + fm.head_bias(torch.zeros(4))
    >>> b
    alibi(4) + head_bias(<table (4,)>)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..lowering.layout import Layout
from ..lowering.terms import key_term
from ._checks import positive_int, real_tensor

TermFn = Callable[..., torch.Tensor]


class Bias:
    """Base class of every flexmask bias. Combine biases with ``+``."""

    def _term(self, layout: Layout) -> TermFn:
        """``(b, h, q_idx, kv_idx) -> additive score`` for ``layout`` (absolute positions)."""
        raise NotImplementedError

    def _check(self, layout: Layout) -> None:
        """Raise ``ValueError`` if the bias's tensors don't fit ``layout``."""

    def _parts(self) -> tuple[Bias, ...]:
        return (self,)

    def _key_bias(self) -> torch.Tensor | None:
        """The tensor ``t`` if this bias is exactly one per-key bias (``fm.key_bias(t)``), else ``None``:
        backends compute its gradient in closed form."""
        return None

    def _cache_fields(self) -> tuple:
        """The constructor data that defines the bias."""
        return tuple(vars(self).values())

    def _map_keys(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Bias:
        """This bias with every tensor indexed by key position (along its last dimension) replaced by
        ``fn(tensor)`` (see :meth:`flexmask.Mask._map_keys`); biases without such tensors return themselves."""
        return self

    def __radd__(self, other):
        if isinstance(other, int) and other == 0:  # so that sum([b1, b2, ...]) works
            return self
        return NotImplemented

    def __add__(self, other: Bias) -> Bias:
        if not isinstance(other, Bias):
            raise TypeError(f"`+` combines flexmask biases; got {type(other).__name__}")
        return BiasSum(*self._parts(), *other._parts())

    def __bool__(self):
        raise TypeError(f"a flexmask bias has no truth value (got `{self!r}`); combine biases with `+`")

    @property
    def score_mod(self) -> Callable[..., torch.Tensor]:
        """The FlexAttention ``score_mod`` ``(score, b, h, q_idx, kv_idx) -> score`` (absolute positions)."""
        batch, heads = _own_dims(self)
        term = self._term(Layout(batch, heads, 1, 1, _device_of(self)))

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + term(b, h, q_idx, kv_idx)

        return score_mod


class Alibi(Bias):
    def __init__(self, num_heads: int):
        self.num_heads = positive_int("alibi num_heads", num_heads)

    def slopes(self, device=None) -> torch.Tensor:
        """``2^(-8 (h+1) / num_heads)`` for each head ``h``: a float32 tensor ``[num_heads]``."""
        h = torch.arange(1, self.num_heads + 1, dtype=torch.float32, device=device)
        return torch.exp2(-8.0 * h / self.num_heads)

    def _term(self, layout):
        slopes = self.slopes(layout.device)

        def alibi(b, h, q_idx, kv_idx):
            return slopes[h] * (kv_idx - q_idx)

        return alibi

    def _check(self, layout):
        if layout.heads != self.num_heads:
            raise ValueError(f"alibi was made for {self.num_heads} heads, but q has {layout.heads} heads")

    def __repr__(self):
        return f"alibi({self.num_heads})"


class HeadBias(Bias):
    def __init__(self, table: torch.Tensor):
        _check_tensor("head_bias table", table, 1, "[num_heads]")
        self.table = table

    def _term(self, layout):
        table = self.table

        def head_bias(b, h, q_idx, kv_idx):
            return table[h]

        return head_bias

    def _check(self, layout):
        _check_device("head_bias table", self.table, layout)
        if self.table.shape[0] != layout.heads:
            raise ValueError(
                f"head_bias table has shape {tuple(self.table.shape)}, expected [{layout.heads}] "
                "(one value per query head)"
            )

    def __repr__(self):
        return f"head_bias(<table {tuple(self.table.shape)}>)"


def relative_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """T5's bucket of the relative position ``rel = j - i``: exact for small distances, log-spaced after."""
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0).to(torch.int64) * num_buckets
        dist = rel.abs()
    else:
        dist = torch.clamp(-rel, min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(torch.clamp(dist, min=1).to(torch.float32) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).to(torch.int64)
    large = torch.clamp(large, max=num_buckets - 1)
    return offset + torch.where(dist < exact, dist.to(torch.int64), large)


class RelativeBias(Bias):
    def __init__(self, table: torch.Tensor, max_distance: int, bidirectional: bool):
        _check_tensor("relative_bias table", table, 2, "[num_heads, num_buckets]")
        min_buckets = 4 if bidirectional else 2
        if table.shape[1] < min_buckets:
            raise ValueError(
                f"relative_bias table needs at least {min_buckets} buckets, got shape {tuple(table.shape)}"
            )
        exact = table.shape[1] // (4 if bidirectional else 2)
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or not exact < max_distance < 1 << 31:
            raise ValueError(f"relative_bias max_distance must be an int in ({exact}, 2**31), got {max_distance!r}")
        self.table, self.max_distance, self.bidirectional = table, max_distance, bidirectional

    def _term(self, layout):
        table, nb, md, bi = self.table, self.table.shape[1], self.max_distance, self.bidirectional

        def relative(b, h, q_idx, kv_idx):
            return table[h, relative_bucket(kv_idx - q_idx, nb, md, bi)]

        return relative

    def _check(self, layout):
        _check_device("relative_bias table", self.table, layout)
        if self.table.shape[0] != layout.heads:
            raise ValueError(
                f"relative_bias table has {self.table.shape[0]} heads (shape {tuple(self.table.shape)}), "
                f"but q has {layout.heads} heads"
            )

    def __repr__(self):
        return f"relative_bias(<table {tuple(self.table.shape)}>, max_distance={self.max_distance})"


class KeyBias(Bias):
    def __init__(self, t: torch.Tensor):
        _check_tensor("key_bias", t, 3, "[batch, heads, kv_len]")
        self.t = t

    def _key_bias(self):
        return self.t

    def _map_keys(self, fn):
        return KeyBias(fn(self.t))

    def _term(self, layout):
        return key_term(self.t, layout.heads)

    def _check(self, layout):
        _check_device("key_bias", self.t, layout)
        batch, heads, length = self.t.shape
        if batch not in (1, layout.batch) or length != layout.kv_len or layout.heads % heads:
            raise ValueError(
                f"key_bias has shape {tuple(self.t.shape)}, expected [{layout.batch} or 1, H, {layout.kv_len}] "
                f"with H dividing the {layout.heads} query heads (1, the KV heads or the query heads)"
            )

    def __repr__(self):
        return f"key_bias(<{tuple(self.t.shape)}>)"


class TensorBias(Bias):
    def __init__(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_bias expects a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point or not 1 <= t.dim() <= 4 or 0 in t.shape:
            raise ValueError(
                "tensor_bias expects a non-empty floating tensor broadcastable to [batch, heads, q_len, kv_len], "
                f"got dtype {t.dtype} and shape {tuple(t.shape)}"
            )
        self.t = real_tensor("tensor_bias", t)

    def _map_keys(self, fn):
        return TensorBias(fn(self.t)) if self.t.shape[-1] > 1 else self

    def _term(self, layout):
        t = self.t.reshape((1,) * (4 - self.t.dim()) + tuple(self.t.shape))
        # Broadcast (size-1) dimensions are sliced away (read at 0 whatever the position), so the
        # term also works as a standalone score_mod, whose layout does not know the call's sizes.
        dims = tuple(d for d in range(4) if t.shape[d] > 1)
        t = t[tuple(slice(None) if d in dims else 0 for d in range(4))]
        offset = layout.offset  # a one-element tensor, as lowering.layout.shift_queries captures it
        offset = (
            offset.reshape(1).to(device=layout.device, dtype=torch.int64)
            if isinstance(offset, torch.Tensor)
            else torch.full((1,), offset, device=layout.device)
        )

        def tensor_bias(b, h, q_idx, kv_idx):
            idx = (b, h, q_idx - offset[0], kv_idx)
            return t[tuple(idx[d] for d in dims)]

        return tensor_bias

    def _check(self, layout):
        _check_device("tensor_bias", self.t, layout)
        full = (layout.batch, layout.heads, layout.q_len, layout.kv_len)
        try:
            torch.broadcast_shapes(tuple(self.t.shape), full)
            ok = torch.broadcast_shapes(tuple(self.t.shape), full) == full
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"tensor_bias has shape {tuple(self.t.shape)}, which does not broadcast to "
                f"[batch, heads, q_len, kv_len] = {list(full)}"
            )

    def __repr__(self):
        return f"tensor_bias(<{tuple(self.t.shape)}>)"


class BiasSum(Bias):
    def __init__(self, *parts: Bias):
        self.parts = parts

    def _parts(self):
        return self.parts

    def _map_keys(self, fn):
        return BiasSum(*(p._map_keys(fn) for p in self.parts))

    def _term(self, layout):
        terms = [p._term(layout) for p in self.parts]

        def bias_sum(b, h, q_idx, kv_idx):
            total = terms[0](b, h, q_idx, kv_idx)
            for term in terms[1:]:
                total = total + term(b, h, q_idx, kv_idx)
            return total

        return bias_sum

    def _check(self, layout):
        for p in self.parts:
            p._check(layout)

    def __repr__(self):
        return " + ".join(repr(p) for p in self.parts)


# ---------------------------------------------------------------------------------------------
# public factories


def alibi(num_heads: int) -> Bias:
    """ALiBi: adds ``slope_h · (j − i)`` with ``slope_h = 2^(−8 (h+1) / num_heads)``.

    Examples:
        >>> import flexmask as fm
        >>> fm.alibi(8).slopes()[:2]
        tensor([0.5000, 0.2500])
    """
    return Alibi(num_heads)


def head_bias(table: torch.Tensor) -> Bias:
    """One value per query head, added to every score of that head.

    On its own a per-head constant shifts every score of a row equally and cancels in the softmax
    (output unchanged, gradient zero); it matters combined with other terms, e.g. in a shared
    learnable parameter.

    Args:
        table: ``[num_heads]``; may be an ``nn.Parameter`` (it receives gradients).
    """
    return HeadBias(table)


def relative_bias(table: torch.Tensor, *, max_distance: int = 128, bidirectional: bool = False) -> Bias:
    """T5-style learnable relative-position bias: ``table[h, bucket(j − i)]``.

    Args:
        table: ``[num_heads, num_buckets]``; may be an ``nn.Parameter``.
        max_distance: distances at or beyond it share the last bucket.
        bidirectional: separate buckets for keys after the query (encoders).
    """
    return RelativeBias(table, max_distance, bidirectional)


def key_bias(t: torch.Tensor) -> Bias:
    """A per-key content bias: adds ``t[b, h, j]`` to every query's score of key ``j``.

    Its gradient reaches ``t``. On CUDA, when it is the call's only bias and ``H`` is 1 or the KV
    heads, ``fm.attention`` computes that gradient without FlexAttention's atomic accumulation
    (option ``key_bias_grad``), except for a lone ``fm.topk`` mask, whose key layout keeps flex's
    own gradient (measured faster there).

    Args:
        t: ``[B or 1, H, kv_len]`` with ``H`` one of 1, the KV heads or the query heads (a KV head's
            value is shared by its query-head group). May require grad.

    Examples:
        >>> import torch, flexmask as fm
        >>> q = k = v = torch.randn(1, 2, 6, 8)
        >>> t = torch.zeros(1, 2, 6, requires_grad=True)
        >>> fm.attention(q, k, v, mask=fm.causal(), bias=fm.key_bias(t)).sum().backward()
        >>> t.grad.shape
        torch.Size([1, 2, 6])
    """
    return KeyBias(t)


def tensor_bias(t: torch.Tensor) -> Bias:
    """A dense bias broadcastable to ``[B, H, q_len, kv_len]`` (local query rows of this call).

    This is a dense path: it holds whatever ``t`` holds. Prefer the structured biases.
    """
    return TensorBias(t)


# ---------------------------------------------------------------------------------------------
# helpers


def _check_tensor(name: str, t, dim: int, shape: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {shape}, got {type(t).__name__}")
    if t.dim() != dim or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor {shape}, got dtype {t.dtype} and shape {tuple(t.shape)}")
    if 0 in t.shape:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    real_tensor(name, t)


def _check_device(name: str, t: torch.Tensor, layout: Layout) -> None:
    if t.device.type != layout.device.type:
        raise ValueError(f"{name} is on {t.device}, but q is on {layout.device}")


def bias_tensors(bias: Bias):
    """Every tensor a bias holds (tables, key scores, dense biases)."""
    for part in bias._parts():
        for value in vars(part).values():
            if isinstance(value, torch.Tensor):
                yield value


def _own_dims(bias: Bias) -> tuple[int, int]:
    """(batch, query heads) implied by a bias's own parameters, for its standalone ``score_mod``.

    The widest head count of the parts is taken as the query heads (so ``key_bias`` with fewer
    heads is shared across query-head groups when summed with ``alibi(Hq)`` or a ``[Hq]`` table).
    """
    batch, heads = 1, 1
    for part in bias._parts():
        if isinstance(part, Alibi):
            heads = max(heads, part.num_heads)
        elif isinstance(part, (HeadBias, RelativeBias)):
            heads = max(heads, part.table.shape[0])
        elif isinstance(part, KeyBias):
            batch, heads = max(batch, part.t.shape[0]), max(heads, part.t.shape[1])
        elif isinstance(part, TensorBias):
            shape = (1,) * (4 - part.t.dim()) + tuple(part.t.shape)
            batch, heads = max(batch, shape[0]), max(heads, shape[1])
    return batch, heads


def _device_of(bias: Bias) -> torch.device:
    return next((t.device for t in bias_tensors(bias)), torch.device("cpu"))
