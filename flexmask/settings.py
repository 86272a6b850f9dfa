"""Options: how :func:`flexmask.attention` lowers and runs a call.

Every choice flexmask makes between equivalent paths is an option here, given per call
(``fm.attention(..., options={"token_layout": False})``) or as defaults for a block of code
(``with fm.options(token_layout=False): ...``). Nothing else switches paths: there are no
module-level flags. Options never change a result beyond floating-point rounding; they choose how
it is computed.

Examples:
    >>> import torch, flexmask as fm
    >>> q = k = v = torch.randn(1, 2, 8, 16)
    >>> with fm.options(backend="reference"):
    ...     out = fm.attention(q, k, v, mask=fm.causal())
    >>> fm.options_in_effect().backend
    'auto'
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal, TypedDict, get_args

Backend = Literal["auto", "flex", "reference"]
KeyBiasGrad = Literal["auto", "fused", "query_side", "transposed", "flex"]
TokenKernel = Literal["auto", "flex", "gather"]


class Options(TypedDict, total=False):
    """Options of :func:`flexmask.attention` (every key optional; unknown keys raise).

    Attributes:
        backend: ``"flex"`` (compiled FlexAttention), ``"reference"`` (exact chunked PyTorch, trains on
            CPU) or ``"auto"`` (flex on CUDA, reference elsewhere). Default ``"auto"``.
        token_layout: run a lone ``fm.topk`` mask (with at most an ``fm.key_bias`` of its scores)
            through the key layout that lets FlexAttention skip unselected keys, or through the
            in-place kernels of ``token_kernel``; on Hopper GPUs, also a lone ``fm.topk_blocks``
            (self-attention; also among documents and padding) through those kernels, as the
            same interval rule.
            Default ``True``.
        token_kernel: with ``token_layout``, on CUDA: ``"gather"`` (Triton kernels that read each
            query block's kept keys in place; float16/bfloat16, ``q``/``k``/``v`` head dims equal and
            a power of two; on Hopper GPUs, for GQA groups whose head pairs share their selection and
            bias and head dims 64 or 128, warp-specialised Gluon kernels), ``"flex"`` (FlexAttention
            over the key layout; ``fm.topk_blocks`` over its BlockMask), or ``"auto"``
            (``"gather"`` where it applies and the head dim is at most 128, else ``"flex"``).
            Default ``"auto"``.
        gather_decode: for one decoding query (``q_len == 1``) under a content mask (``fm.topk``,
            ``fm.topk_blocks``, or an ``&`` with one), attend to the few keys its selection may keep,
            gathered from the cache, instead of running a BlockMask over the whole cache. Default ``True``.
        graphed_build: on CUDA, replay the mask builds of content masks (``fm.topk`` layouts,
            ``fm.topk_blocks`` BlockMasks) from captured CUDA graphs instead of launching their
            kernels one by one. Default ``True``.
        key_bias_grad: how the gradient of a lone ``fm.key_bias`` is computed on CUDA: ``"fused"``
            (one Triton backward for dq, dk, dv and the bias, where it applies: block top-k),
            ``"query_side"`` (flex's backward plus a Triton kernel for the bias term),
            ``"transposed"`` (flex's backward plus a flex pass over the transposed problem),
            ``"flex"`` (FlexAttention's own atomics), or ``"auto"`` (the first that applies, in
            that order). A named kernel that does not apply to a call falls back to the next.
        split_below: the fused backward splits the most-read key blocks over several programs when
            the grid has fewer than this many key-block programs per streaming multiprocessor.
            Default 4.
        split_chunk: list entries per program when split. Default 8.
        cache: keep lowered masks (BlockMasks, layouts) for reuse by later calls with the same
            expression, tensors (and their versions), shapes and options. Default ``True``.
    """

    backend: Backend
    token_layout: bool
    token_kernel: TokenKernel
    gather_decode: bool
    graphed_build: bool
    key_bias_grad: KeyBiasGrad
    split_below: int
    split_chunk: int
    cache: bool


@dataclass(frozen=True)
class Resolved:
    """Options with every value filled in (hashable: part of cache keys). See :class:`Options`."""

    backend: Backend = "auto"
    token_layout: bool = True
    token_kernel: TokenKernel = "auto"
    gather_decode: bool = True
    graphed_build: bool = True
    key_bias_grad: KeyBiasGrad = "auto"
    split_below: int = 4
    split_chunk: int = 8
    cache: bool = True

    def merged(self, overrides: Mapping[str, object]) -> Resolved:
        """These options with ``overrides`` applied, each checked."""
        if not isinstance(overrides, Mapping):
            raise TypeError(f"options must be a dict of option names to values, got {type(overrides).__name__}")
        for name, value in overrides.items():
            _check(name, value)
        return replace(self, **overrides) if overrides else self


_CHOICES = {"backend": get_args(Backend), "key_bias_grad": get_args(KeyBiasGrad), "token_kernel": get_args(TokenKernel)}
_NAMES = tuple(f.name for f in fields(Resolved))


def _check(name: str, value: object) -> None:
    if name not in _NAMES:
        raise ValueError(f"unknown option {name!r}; the options are {', '.join(_NAMES)}")
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"option {name} must be one of {_CHOICES[name]}, got {value!r}")
    elif name in ("split_below", "split_chunk"):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "split_below" else 1):
            raise ValueError(f"option {name} must be an int >= {0 if name == 'split_below' else 1}, got {value!r}")
    elif not isinstance(value, bool):
        raise TypeError(f"option {name} must be True or False, got {value!r}")


class _Defaults(threading.local):
    def __init__(self) -> None:
        self.stack = [Resolved()]


_defaults = _Defaults()


@contextlib.contextmanager
def options(**overrides: object) -> Iterator[Resolved]:
    """Defaults for every :func:`flexmask.attention` call inside the ``with`` block (this thread).

    Nested blocks apply on top of the outer ones; options given per call apply on top of these.

    Args:
        **overrides: option names and values (see :class:`Options`).

    Yields:
        The options now in effect.

    Examples:
        >>> import flexmask as fm
        >>> with fm.options(graphed_build=False) as o:
        ...     o.graphed_build
        False
    """
    new = options_in_effect().merged(overrides)
    _defaults.stack.append(new)
    try:
        yield new
    finally:
        _defaults.stack.pop()


def options_in_effect() -> Resolved:
    """The default options in effect here (those of the innermost :func:`options` block).

    Examples:
        >>> import flexmask as fm
        >>> fm.options_in_effect().token_layout
        True
    """
    return _defaults.stack[-1]


def resolve(per_call: Options | None, backend: str = "auto") -> Resolved:
    """The options of one call: the defaults in effect, then ``backend`` (unless ``"auto"``), then ``per_call``."""
    resolved = options_in_effect()
    if backend != "auto":
        resolved = resolved.merged({"backend": backend})
    return resolved if per_call is None else resolved.merged(per_call)
