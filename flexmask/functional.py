"""``flexmask.attention``: the one entry point.

Data flow: check the inputs → ``plan = lower(mask, bias, ...)`` (:mod:`flexmask.lowering`) →
``backends.run(plan, q, k, v)`` (:mod:`flexmask.backends`). Nothing here names a mask type.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import backends
from .algebra.bias import Bias, bias_tensors
from .algebra.masks import Mask
from .lowering.layout import Layout
from .lowering.planner import lower
from .settings import Backend, Options, resolve

observers: list[Callable[[Mask | None, Layout], None]] = []
"""Functions ``(mask, layout)`` called on every :func:`attention` call, before it runs.
:func:`flexmask.record_masks` adds one for the length of its ``with`` block. Empty otherwise."""


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
    options: Options | None = None,
    q_offset: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked, biased attention through FlexAttention.

    Args:
        q: ``[B, Hq, Q, D]`` queries; they are the last ``Q`` of the ``KV`` positions (or start at
            ``q_offset``).
        k: ``[B, Hkv, KV, D]`` keys; ``Hq`` must be a multiple of ``Hkv`` (GQA).
        v: ``[B, Hkv, KV, Dv]`` values.
        mask: a flexmask mask (``fm.causal() & ...``); ``None`` attends everywhere.
        bias: a flexmask bias (``fm.alibi(H) + ...``), added to the scaled scores.
        scale: score scale, default ``1 / sqrt(D)``.
        softcap: if given, scores become ``softcap · tanh(score / softcap)`` before the bias.
        backend: ``"flex"`` (compiled FlexAttention), ``"reference"`` (exact chunked PyTorch,
            trains on CPU), or ``"auto"``: flex on CUDA, reference elsewhere. The same as
            ``options={"backend": ...}``.
        options: per-call options (:class:`flexmask.Options`), applied over the defaults of any
            enclosing ``with fm.options(...)`` block.
        q_offset: the absolute position of the first query, when the queries are not the last
            ``Q`` positions (a shard of a sequence split over devices; a static KV cache whose
            empty slots follow the queries); ``q_offset + Q <= KV``. For one decoding query under
            a content mask (``fm.topk``, ``fm.topk_blocks``, or an ``&`` with one) it may be a
            one-element integer tensor, which keeps a compiled decoding step free of host syncs
            (its range is not checked then).

    Returns:
        ``[B, Hq, Q, Dv]`` in ``q``'s dtype. Rows whose keys are all masked are zeros.

    Examples:
        >>> import torch, flexmask as fm
        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> out = fm.attention(q, k, v, mask=fm.causal() & fm.sliding_window(4), bias=fm.alibi(2))
        >>> out.shape
        torch.Size([1, 2, 8, 16])
    """
    layout = check_inputs(q, k, v, q_offset)
    check_expressions(mask, bias)
    scale = check_scale(scale, q.shape[-1])
    softcap = check_softcap(softcap)
    if backend not in ("auto", "flex", "reference"):
        raise ValueError(f"backend must be 'auto', 'flex' or 'reference', got {backend!r}")
    opts = backends.choose_kernels(resolve(options, backend), q, v)
    if mask is not None:
        _checked(mask, layout)
    if bias is not None:
        _checked(bias, layout)
    for observe in observers:
        observe(mask, layout)
    if (
        opts.backend == "flex"
        and not q.is_cuda
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # (its check iterates the bias's attributes: a graph break)
        and _needs_grad(q, k, v, bias)
    ):
        raise ValueError(
            f"backend='flex' on {q.device.type} runs forward only (FlexAttention has no backward "
            "there), but an input requires grad; use backend='reference' (or 'auto') to train on CPU"
        )
    plan = lower(mask, bias, layout=layout, options=opts, scale=scale, softcap=softcap)
    return backends.run(plan, q, k, v)


def check_expressions(mask: object, bias: object) -> None:
    """``mask`` and ``bias`` are flexmask expressions (or ``None``), else a clear ``TypeError``."""
    if mask is not None and not isinstance(mask, Mask):
        raise TypeError(
            f"mask must be a flexmask mask (e.g. fm.causal()), got {type(mask).__name__}; "
            "wrap a function with fm.mask(fn)"
        )
    if bias is not None and not isinstance(bias, Bias):
        raise TypeError(f"bias must be a flexmask bias (e.g. fm.alibi(heads)), got {type(bias).__name__}")


def check_scale(scale: float | None, head_dim: int) -> float:
    """The score scale: ``1 / sqrt(head_dim)`` by default; else a finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def check_softcap(softcap: float | None) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf:
        raise ValueError(f"softcap must be a positive finite number, got {softcap!r}")
    return float(softcap)


def _checked(expr: Mask | Bias, layout: Layout) -> None:
    """``expr._check(layout)``; a failure names the expression and the call's shapes (einops-style context)."""
    try:
        expr._check(layout)
    except (ValueError, TypeError) as e:
        what = "mask" if isinstance(expr, Mask) else "bias"
        raise type(e)(
            f"{e}\n  (in {what} `{expr!r}`, for batch={layout.batch}, query heads={layout.heads}, "
            f"q_len={layout.q_len}, kv_len={layout.kv_len})"
        ) from e


def _needs_grad(q, k, v, bias: Bias | None) -> bool:
    tensors = [q, k, v] + ([] if bias is None else list(bias_tensors(bias)))
    return any(t.requires_grad for t in tensors)


def check_inputs(q, k, v, q_offset: int | torch.Tensor | None = None) -> Layout:
    """The :class:`~flexmask.lowering.layout.Layout` of ``q``, ``k``, ``v`` (queries from ``q_offset``,
    default the last positions), or a clear error."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq_len, head_dim], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must have no empty dimension, got shape {tuple(t.shape)}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device, which holds no data")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"q, k, v must share the batch size, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"the query heads ({q.shape[1]}) must be a multiple of the key/value heads ({k.shape[1]})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(
            f"q has {q.shape[2]} positions but k only {k.shape[2]}; queries are the last positions "
            "of the keys' sequence, so q_len must be <= kv_len"
        )
    if k.shape[2] >= 1 << 31:
        raise ValueError(f"kv_len must be below 2**31 (kernels index positions in int32), got {k.shape[2]:,}")
    if isinstance(q_offset, torch.Tensor):
        if q_offset.numel() != 1 or q_offset.dtype.is_floating_point or q_offset.dtype == torch.bool:
            raise TypeError(
                f"a tensor q_offset must hold one integer, got dtype {q_offset.dtype}, shape {tuple(q_offset.shape)}"
            )
        if q.shape[2] != 1:
            raise ValueError(f"a tensor q_offset is for one decoding query; q has {q.shape[2]} (give an int)")
        return Layout(q.shape[0], q.shape[1], 1, k.shape[2], q.device, k.shape[1], q_offset.reshape(1).long())
    if q_offset is not None:
        if isinstance(q_offset, bool) or not isinstance(q_offset, int):
            raise TypeError(f"q_offset must be an int or None, got {type(q_offset).__name__} {q_offset!r}")
        if not 0 <= q_offset <= k.shape[2] - q.shape[2]:
            raise ValueError(
                f"q_offset must be in [0, kv_len - q_len] = [0, {k.shape[2] - q.shape[2]}] (the queries are "
                f"positions q_offset .. q_offset + q_len - 1 of the keys' sequence), got {q_offset}"
            )
        if q_offset == k.shape[2] - q.shape[2]:
            q_offset = None  # the default layout: one cache entry, one compiled kernel for both
    return Layout(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, k.shape[1], q_offset)
