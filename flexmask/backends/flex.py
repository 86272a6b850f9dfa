"""FlexAttention backend: one ``torch.compile``\\ d ``flex_attention`` reused across calls.

Mask and score functions are closures with stable code that capture tensors, so new tensor
contents (document ids, learned tables, top-k thresholds) reuse the compiled kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

from .._compat import raise_recompile_limit
from ..lowering.cache import compiled, flag, set_flag
from ..lowering.plan import Plan

# Each mask/bias *structure* (and each shape, with static shapes) is one compiled entry of
# flex_attention; torch's default limit of 8 entries is soon reached by a model or a benchmark that
# uses several masks, after which it would fail (fullgraph) or fall back to the dense eager path.
# New tensor contents never add entries. flexmask raises dynamo's (process-wide) limit to this on
# its first call, and never lowers it.
RECOMPILE_LIMIT = 64

# Some score_mods (e.g. a relative-position table, a dense tensor bias) make inductor's default
# kernel configuration ask for more shared memory than a GPU has ("out of resource", seen on an
# H100 with torch 2.11). Such calls are retried once with smaller tiles, and the call's structure
# and shapes are remembered (in the one cache) so later calls start with them.
SMALL_TILES = {
    "BLOCK_M": 64,
    "BLOCK_N": 64,
    "BLOCK_M1": 32,
    "BLOCK_N1": 64,
    "BLOCK_M2": 64,
    "BLOCK_N2": 32,
    "num_stages": 1,
}


def run(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run a ``"flex"`` plan: ``[B, Hq, Q, Dv]``."""
    return flex(q, k, v, plan.score_mod, plan.block_mask, plan.scale, key=plan.describe)


def compiled_flex(backend: str = "inductor", dynamic: bool = False) -> Callable:
    """The process-wide compiled ``flex_attention`` for a ``torch.compile`` backend.

    ``dynamic=False`` (training, prefill): kernels specialised to each shape; automatic dynamic
    shapes would trade them for generic ones (several times slower backward, measured on an H100).
    ``dynamic=True`` (decoding, ``q_len < kv_len``): torch's *automatic* dynamic shapes, so only
    the sizes that change between calls (the cache length) become symbolic after a second compile.
    A static ``q_len`` matters: with ``q_len`` symbolic, flex cannot pick its split-KV decoding
    kernel, and one query against 64k keys ran ~100× slower than SDPA (H100).
    """
    return compiled(flex_attention, backend=backend, fullgraph=True, dynamic=None if dynamic else False)


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None,
    block_mask: BlockMask | None,
    scale: float | None,
    *,
    compile_backend: str = "inductor",
    dynamic: bool | None = None,
    key: Hashable | Callable[[], Hashable] = None,
    return_lse: bool = False,
):
    """Run flex attention; inside an outer ``torch.compile`` the raw op is traced instead.

    ``dynamic=None`` picks a dynamic-shape kernel for CUDA decoding (``q_len < kv_len``) only.
    ``return_lse=True`` returns ``(out, lse)`` with the natural-log ``lse`` ``[B, Hq, Q]`` (float32).
    ``key`` (or a function returning it, called only when needed) names the mask/bias structure,
    for remembering calls that need smaller tiles.
    """
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if return_lse:
        kwargs["return_aux"] = AuxRequest(lse=True)
    if torch.compiler.is_compiling():
        return _unpack(flex_attention(q, k, v, **kwargs))
    if not flag("recompile_limit"):
        raise_recompile_limit(RECOMPILE_LIMIT)
        set_flag("recompile_limit")
    # Dynamic shapes only on CUDA: torch 2.13's CPU inductor flex kernel fails to build with them
    # (C++ codegen error `cur_kvSplitSize7`, or "unbacked_bindings" with captured tensors) for q_len < kv_len.
    if dynamic is None:
        dynamic = q.is_cuda and q.shape[2] != k.shape[2]
    fn = compiled_flex(compile_backend, dynamic=dynamic)

    def memo():
        name = key() if callable(key) else key
        return (name, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, torch.is_grad_enabled())

    if flag("small_tiles") and flag("small_tiles", memo()):
        kwargs["kernel_options"] = dict(SMALL_TILES)
    try:
        return _unpack(fn(q, k, v, **kwargs))
    except Exception as error:
        if "out of resource" not in str(error) or "kernel_options" in kwargs:
            raise
    set_flag("small_tiles", memo())
    kwargs["kernel_options"] = dict(SMALL_TILES)
    return _unpack(fn(q, k, v, **kwargs))


def _unpack(result):
    if isinstance(result, tuple):
        out, aux = result
        return out, aux.lse
    return result


def with_lse(q, k, v, score_mod, block_mask, scale, *, compile_backend: str = "inductor"):
    """``(out, lse)`` of a training-shaped flex call (static shapes); see :func:`flex`."""
    return flex(q, k, v, score_mod, block_mask, scale, compile_backend=compile_backend, dynamic=False, return_lse=True)
