"""The baselines: FlexAttention as a user writes it without flexmask (hand-written ``mask_mod``
functions, torch's ``create_block_mask``, compiled ``flex_attention``), and the benchmarks' inputs.

Compilation: hand-written FlexAttention is compiled with ``dynamic=False`` (kernels specialised to
each shape, as flexmask's backend does). torch's ``create_block_mask`` is compiled once with
``dynamic=True`` (one graph per mask function for all lengths; torch's default compile is used if
that fails). On CPU nothing is compiled: eager ``flex_attention`` (forward only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from .harness import Env, short_error, timed_out
from .report import Report

_handwritten_window: dict[int, Callable] = {}
_handwritten_document: dict[int, tuple[torch.Tensor, Callable]] = {}
_compiled: dict[str, Any] = {}


def causal_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Hand-written causal ``mask_mod``."""
    return q_idx >= kv_idx


def window_mod(size: int) -> Callable:
    """Hand-written ``causal & sliding_window(size)`` ``mask_mod`` (one function object per size).

    Examples:
        >>> window_mod(4) is window_mod(4)
        True
    """
    if size not in _handwritten_window:

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < size)

        _handwritten_window[size] = sliding_window
    return _handwritten_window[size]


def document_mod(ids: torch.Tensor) -> Callable:
    """Hand-written ``causal & document(ids)`` ``mask_mod`` (ids: ``[B, N]``; one function per ids tensor)."""
    if id(ids) not in _handwritten_document or _handwritten_document[id(ids)][0] is not ids:

        def causal_document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

        _handwritten_document[id(ids)] = (ids, causal_document)
    return _handwritten_document[id(ids)][1]


def compiled_create_block_mask(*args: Any, **kwargs: Any) -> Any:
    """torch's compiled ``create_block_mask``, called with ``create_block_mask``'s arguments.

    ``torch.compile(create_block_mask, dynamic=True)``: one graph per mask function serves every
    length (``create_block_mask(..., _compile=True)`` is ``torch.compile(create_block_mask)``, whose
    automatic dynamic shapes reach the same graph from the second length on, after one more
    compilation). Should that compilation fail, torch's default compile is used from then on.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if "cbm" not in _compiled:
        _compiled["cbm"] = torch.compile(create_block_mask, dynamic=True)
        _compiled["cbm_mode"] = "torch.compile(create_block_mask, dynamic=True)"
    try:
        return _compiled["cbm"](*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        if timed_out(e) or _compiled["cbm_mode"] != "torch.compile(create_block_mask, dynamic=True)":
            raise
        print(
            f"bench: compiled create_block_mask with dynamic=True failed ({short_error(e)}); "
            "using torch.compile(create_block_mask) defaults",
            file=sys.stderr,
        )
        _compiled["cbm"] = torch.compile(create_block_mask)
        _compiled["cbm_mode"] = "torch.compile(create_block_mask) (dynamic=True failed)"
        return _compiled["cbm"](*args, **kwargs)


def note_compile_mode(report: Report) -> None:
    """Add to the report how torch's ``create_block_mask`` was compiled, if it was."""
    if "cbm_mode" in _compiled:
        report.meta["compile"] = report.meta.get("compile", "") + f"; create_block_mask: {_compiled['cbm_mode']}"


def handwritten_flex(device: torch.device) -> Callable:
    """``torch.compile(flex_attention, dynamic=False, fullgraph=True)`` on CUDA (as flexmask compiles it);
    eager ``flex_attention`` (forward only) elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled["flex"]


def handwritten_block_mask(mod: Callable, n: int, device: torch.device) -> Any:
    """The hand-written path's ``BlockMask`` (B = H = 1, broadcast): torch's compiled builder on CUDA.

    Called with the same arguments as the ``H=1`` rows of ``bench masks`` so both share one graph.
    """
    if device.type == "cuda":
        return compiled_create_block_mask(mod, 1, 1, n, n, device=device)
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mod, 1, 1, n, n, device=device)


def random_document_ids(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[1, n]`` ids of 8–32 packed documents of random lengths (each at least 1 token).

    Examples:
        >>> ids = random_document_ids(100, torch.Generator().manual_seed(0), torch.device("cpu"))
        >>> ids.shape, bool((ids.diff() >= 0).all())
        (torch.Size([1, 100]), True)
    """
    docs = int(torch.randint(8, 33, (1,), generator=gen))
    docs = max(1, min(docs, n))
    cuts = torch.randperm(n - 1, generator=gen)[: docs - 1] + 1
    starts = torch.zeros(n, dtype=torch.int64)
    starts[cuts] = 1
    return starts.cumsum(0)[None].to(device)


def make_scores(kind: str, hs: int, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[1, hs, n]`` float32 key scores requiring grad: ``random`` normal or ``clustered`` random walk.

    Examples:
        >>> make_scores("clustered", 2, 16, torch.Generator().manual_seed(0), torch.device("cpu")).shape
        torch.Size([1, 2, 16])
    """
    x = torch.randn(1, hs, n, generator=gen)
    if kind == "clustered":
        x = x.cumsum(-1)
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)
    elif kind != "random":
        raise ValueError(f"scores must be 'random' or 'clustered', got {kind!r}")
    return x.to(device).requires_grad_(True)


def grad(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The backward of a training step: gradients of ``inputs`` for the output gradient ``grad_out``."""
    return torch.autograd.grad(out, inputs, grad_out)


def qkv(
    env: Env, n: int, hq: int, hkv: int, d: int, requires_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [1, hq, n, d]``, ``k``, ``v [1, hkv, n, d]`` and an output gradient, in the env's dtype."""

    def make(h):
        return torch.randn(1, h, n, d, device=env.device, dtype=env.dtype).requires_grad_(requires_grad)

    q, k, v = make(hq), make(hkv), make(hkv)
    grad_out = torch.randn(1, hq, n, d, device=env.device, dtype=env.dtype)
    return q, k, v, grad_out


def flex_cpu_bytes(heads: int, n: int) -> float:
    """Peak bytes of eager ``flex_attention`` on CPU at ``heads × n²`` scores (with its H=1 ``BlockMask``),
    measured at about 16 bytes per score and 12 per ``create_block_mask`` entry."""
    return 16.0 * heads * n * n + 12.0 * n * n
