"""FlexAttention backend: one ``torch.compile``d ``flex_attention`` reused across calls.

Mask and score functions are closures with stable code that capture tensors, so new tensor
contents (document ids, learned tables, top-k thresholds) reuse the compiled kernel.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_compiled: dict[str, Callable] = {}


def compiled_flex(backend: str = "inductor") -> Callable:
    """The process-wide compiled ``flex_attention`` for a ``torch.compile`` backend."""
    if backend not in _compiled:
        _compiled[backend] = torch.compile(flex_attention, backend=backend, fullgraph=True)
    return _compiled[backend]


def flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Callable | None,
    block_mask: BlockMask | None,
    scale: float | None,
    *,
    compile_backend: str = "inductor",
) -> torch.Tensor:
    """Run flex attention; inside an outer ``torch.compile`` the raw op is traced instead."""
    fn = flex_attention if torch.compiler.is_compiling() else compiled_flex(compile_backend)
    return fn(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
