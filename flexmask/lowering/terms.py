"""Score terms the backends build from tensors (shared by the bias algebra and the backends)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def key_term(t: torch.Tensor, heads: int) -> Callable:
    """The term ``(b, h, q_idx, kv_idx) -> t[b, h // group, kv_idx]`` of a per-key bias ``t``
    ``[B|1, Hs, KV]`` for ``heads`` query heads (``group = heads // Hs``).

    A size-1 batch or head dimension is sliced away (read at 0 for every batch row / head), so the
    term also works as a standalone score_mod, whose layout does not know the sizes.
    """
    per_batch, per_head = t.shape[0] > 1, t.shape[1] > 1
    group = max(1, heads // t.shape[1])
    t = t[(slice(None) if per_batch else 0, slice(None) if per_head else 0)]

    def key_bias(b, h, q_idx, kv_idx):
        idx = ((b,) if per_batch else ()) + ((h // group,) if per_head else ())
        return t[idx + (kv_idx,)]

    return key_bias
