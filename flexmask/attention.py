"""``flexmask.attention``: the one entry point.

Data flow: check the inputs → lower the mask to a ``BlockMask`` (cached) and the bias and softcap
to a ``score_mod`` → run a backend (compiled FlexAttention on CUDA, the exact chunked reference
on CPU, which also trains).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask

from .backends import dma_layout, key_bias
from .backends.flex import flex, with_lse
from .backends.reference import reference
from .bias import Bias, bias_tensors
from .blocks import Layout, build_block_mask, shift_queries
from .masks import Mask, _tensors

Backend = Literal["auto", "flex", "reference"]

# Callables ``(mask, layout)`` told about every call (used by flexmask.plot to record the masks a
# model used). Empty in normal use.
observers: list[Callable[[Mask | None, Layout], None]] = []

_CACHE_SIZE = 32
_structural_cache: OrderedDict = OrderedDict()
_object_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Mask | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Masked, biased attention through FlexAttention.

    Args:
        q: ``[B, Hq, Q, D]`` queries; they are the last ``Q`` of the ``KV`` positions.
        k: ``[B, Hkv, KV, D]`` keys; ``Hq`` must be a multiple of ``Hkv`` (GQA).
        v: ``[B, Hkv, KV, Dv]`` values.
        mask: a flexmask mask (``fm.causal() & ...``); ``None`` attends everywhere.
        bias: a flexmask bias (``fm.alibi(H) + ...``), added to the scaled scores.
        scale: score scale, default ``1 / sqrt(D)``.
        softcap: if given, scores become ``softcap · tanh(score / softcap)`` before the bias.
        backend: ``"flex"`` (compiled FlexAttention), ``"reference"`` (exact chunked PyTorch,
            trains on CPU), or ``"auto"``: flex on CUDA, reference elsewhere.

    Returns:
        ``[B, Hq, Q, Dv]`` in ``q``'s dtype. Rows whose keys are all masked are zeros.

    Example:
        >>> import torch, flexmask as fm
        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> out = fm.attention(q, k, v, mask=fm.causal() & fm.sliding_window(4), bias=fm.alibi(2))
        >>> out.shape
        torch.Size([1, 2, 8, 16])
    """
    layout = _check_inputs(q, k, v)
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(
            f"mask must be a flexmask mask (e.g. fm.causal()), got {type(mask).__name__}; "
            "wrap a function with fm.mask(fn)"
        )
    if bias is not None and not isinstance(bias, Bias):
        raise TypeError(f"bias must be a flexmask bias (e.g. fm.alibi(heads)), got {type(bias).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if softcap is not None and (
        isinstance(softcap, bool)
        or not isinstance(softcap, (int, float))
        or not softcap > 0
        or not math.isfinite(softcap)
    ):
        raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
    if backend == "auto":
        backend = "flex" if q.is_cuda else "reference"
    if backend not in ("flex", "reference"):
        raise ValueError(f"backend must be 'auto', 'flex' or 'reference', got {backend!r}")
    if mask is not None:
        mask._check(layout)
    if bias is not None:
        bias._check(layout)
    for observe in observers:
        observe(mask, layout)

    score_mod = lower_score(bias, softcap, layout)
    if backend == "reference":
        mask_mod = None if mask is None else shift_queries(mask._mask_mod(layout), layout.offset, layout.device)
        return reference(q, k, v, score_mod, mask_mod, float(scale))
    if not q.is_cuda and torch.is_grad_enabled() and _needs_grad(q, k, v, bias):
        raise ValueError(
            f"backend='flex' on {q.device.type} runs forward only (FlexAttention has no backward "
            "there), but an input requires grad; use backend='reference' (or 'auto') to train on CPU"
        )
    if dma_layout.applies(mask, bias, softcap, layout, k):
        return dma_layout.layout_attention(q, k, v, mask, bias, float(scale), layout)
    block_mask = None if mask is None else cached_block_mask(mask, layout)
    if key_bias.applies(bias, softcap, q, k):  # its gradient without flex's atomics
        from .dma import TopKBlocks  # (dma imports this module)

        # block top-k's partial blocks are its causal diagonal blocks: the query-side kernel applies
        causal_partial = type(mask) is TopKBlocks and mask.among is None and mask.block_size == 128
        return key_bias.attention(q, k, v, bias.t, block_mask, float(scale), with_lse, causal_partial)
    return flex(q, k, v, score_mod, block_mask, float(scale), key=lambda: (repr(mask), repr(bias), softcap))


def lower_score(bias: Bias | None, softcap: float | None, layout: Layout) -> Callable | None:
    """The ``score_mod`` (call-local positions) for a bias and an optional softcap."""
    if bias is None and softcap is None:
        return None
    term = None if bias is None else shift_queries(bias._term(layout), layout.offset, layout.device)
    # a 1-element tensor, not a Python float: dynamo turns a captured float into a 0-d CPU tensor
    # input, which dynamic-shape flex kernels fail to lower ("unbacked_bindings", torch 2.11, H100)
    cap = None if softcap is None else _constant(float(softcap), layout.device)

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap[0] * torch.tanh(score / cap[0])
        if term is not None:
            score = score + term(b, h, q_idx, kv_idx)
        return score

    return score_mod


@functools.lru_cache(maxsize=64)
def _constant(value: float, device: torch.device) -> torch.Tensor:
    """A one-element float32 tensor on ``device`` (made once: no host-to-device copy per call)."""
    return torch.full((1,), value, device=device)


def cached_block_mask(mask: Mask, layout: Layout, block_size: int = 128) -> BlockMask:
    """The mask's ``BlockMask`` for ``layout``, built once per (expression, shapes, device).

    Tensor-free expressions are cached by structure; masks holding tensors by identity, for as
    long as the mask object lives. Inside an outer ``torch.compile`` (a compiled model) the build is
    traced into the graph instead: a module-level cache cannot be replayed by dynamo.
    """
    if torch.compiler.is_compiling():
        return build_block_mask(mask, layout, block_size)
    key = (layout, block_size)
    structural = mask._key()
    if structural is not None:
        full_key = (structural, key)
        if full_key in _structural_cache:
            _structural_cache.move_to_end(full_key)
            return _structural_cache[full_key]
        bm = build_block_mask(mask, layout, block_size)
        _structural_cache[full_key] = bm
        if len(_structural_cache) > _CACHE_SIZE:
            _structural_cache.popitem(last=False)
        return bm
    # The mask's tensors may be updated in place (a persistent ids buffer refilled every step):
    # their storage and version counters are part of the key, so the cache never serves a stale map.
    stamp = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in _tensors(mask))
    per_mask = _object_cache.setdefault(mask, {})
    hit = per_mask.get(key)
    if hit is None or hit[0] != stamp:
        if hit is None and len(per_mask) >= _CACHE_SIZE:
            per_mask.pop(next(iter(per_mask)))
        per_mask[key] = (stamp, build_block_mask(mask, layout, block_size))
    return per_mask[key][1]


def _needs_grad(q, k, v, bias: Bias | None) -> bool:
    tensors = [q, k, v] + ([] if bias is None else list(bias_tensors(bias)))
    return any(t.requires_grad for t in tensors)


def _check_inputs(q, k, v) -> Layout:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(t.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must have no empty dimension, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"q, k, v must share the batch size, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(
            f"k and v must have the same heads and length, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"the query heads ({q.shape[1]}) must be a multiple of the key/value heads ({k.shape[1]})"
        )
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q has {q.shape[2]} positions but k only {k.shape[2]}; queries are the last positions "
            "of the keys' sequence, so q_len must be <= kv_len"
        )
    return Layout(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device)
