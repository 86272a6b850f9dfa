"""Plain PyTorch models: route ``torch.nn.functional.scaled_dot_product_attention`` through flexmask.

Examples:
    >>> import torch, torch.nn.functional as F, flexmask as fm
    >>> q = k = v = torch.randn(1, 2, 16, 8)
    >>> with fm.route_sdpa(mask=fm.sliding_window(4)):
    ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> out.shape
    torch.Size([1, 2, 16, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..algebra.bias import Bias, tensor_bias
from ..algebra.masks import Mask, causal
from ..algebra.masks import mask as function_mask
from ..functional import attention
from ..settings import Backend


class route_sdpa(TorchFunctionMode):
    """Route ``torch.nn.functional.scaled_dot_product_attention`` calls through :func:`flexmask.attention`.

    A context manager (a ``TorchFunctionMode``, so it also works under ``torch.compile``): inside it,
    every SDPA call of any model attends with ``mask`` (and ``bias``), without editing the model.

    How SDPA's own arguments combine:

    * ``is_causal=True`` → ``fm.causal() & mask`` (needs ``L == S``: torch aligns a causal mask
      top-left when ``L < S``, flexmask bottom-right, so that case raises).
    * a bool ``attn_mask`` (broadcastable to ``[B, H, L, S]``) is intersected with ``mask``
      (dense: it is already a tensor); a float ``attn_mask`` is added as ``fm.tensor_bias``.
    * ``dropout_p > 0`` raises (flexmask has no attention dropout); ``scale`` is passed on;
      GQA (``Hq`` a multiple of ``Hkv``) works with or without ``enable_gqa``.

    Inputs are ``[B, H, L, E]`` (or ``[B, L, E]``, one head); queries are the last ``L`` of ``S`` positions.

    Args:
        mask: a flexmask mask applied to every routed call, or ``None``.
        bias: a flexmask bias added to every routed call, or ``None``.
        backend: :func:`flexmask.attention`'s backend.

    Examples:
        >>> import torch, torch.nn.functional as F, flexmask as fm
        >>> q = k = v = torch.randn(1, 2, 16, 8)
        >>> with fm.route_sdpa(mask=fm.sliding_window(4)):
        ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> torch.allclose(out, fm.attention(q, k, v, mask=fm.sliding_window(4)))
        True
    """

    def __init__(self, mask: Mask | None = None, bias: Bias | None = None, *, backend: Backend = "auto"):
        super().__init__()
        if mask is not None and not isinstance(mask, Mask):
            raise TypeError(f"mask must be a flexmask mask, got {type(mask).__name__}")
        if bias is not None and not isinstance(bias, Bias):
            raise TypeError(f"bias must be a flexmask bias, got {type(bias).__name__}")
        self.mask, self.bias, self.backend = mask, bias, backend

    def __torch_function__(self, func, arg_types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if dropout_p:
            raise ValueError(
                f"route_sdpa: flexmask has no attention dropout, got dropout_p={dropout_p} "
                "(call the model in eval mode or set its attention dropout to 0)"
            )
        one_head = query.dim() == 3
        if one_head:
            query, key, value = query[:, None], key[:, None], value[:, None]
        if query.dim() != 4:
            raise ValueError(f"route_sdpa handles [B, H, L, E] or [B, L, E] inputs, got query {tuple(query.shape)}")
        L, S = query.shape[-2], key.shape[-2]
        mask, bias = self.mask, self.bias
        if is_causal:
            if attn_mask is not None:
                raise ValueError("route_sdpa: pass either attn_mask or is_causal=True, not both (as SDPA)")
            if L != S:
                raise ValueError(
                    f"route_sdpa: is_causal=True with L={L} != S={S}: SDPA aligns that causal mask top-left, "
                    "flexmask treats queries as the last positions; pass mask=fm.causal() without is_causal"
                )
            mask = _and(causal(), mask)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                mask = _and(mask, _dense_mask(attn_mask, query, key))
            elif attn_mask.is_floating_point():
                dense = tensor_bias(attn_mask.to(query.dtype))
                bias = dense if bias is None else bias + dense
            else:
                raise TypeError(f"route_sdpa: attn_mask must be bool or floating, got dtype {attn_mask.dtype}")
        out = attention(query, key, value, mask=mask, bias=bias, scale=scale, backend=self.backend)
        return out[:, 0] if one_head else out


def _dense_mask(attn_mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> Mask:
    """SDPA's bool ``attn_mask`` (``True`` = attend), broadcast to ``[B, H, L, S]``, as a flexmask mask."""
    B, H, L = query.shape[:3]
    S = key.shape[-2]
    if attn_mask.dim() > 4:
        raise ValueError(f"route_sdpa: attn_mask must broadcast to [B, H, L, S], got {tuple(attn_mask.shape)}")
    try:
        dense = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(B, H, L, S)
    except RuntimeError as e:
        raise ValueError(
            f"route_sdpa: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {[B, H, L, S]}"
        ) from e
    offset = S - L

    def sdpa_attn_mask(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx - offset, kv_idx]

    return function_mask(sdpa_attn_mask, name="sdpa_attn_mask")


def _and(a: Mask | None, b: Mask | None) -> Mask | None:
    return b if a is None else a if b is None else a & b
