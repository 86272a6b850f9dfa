"""Dynamic Mask Attention (DMA): trainable content-aware sparse attention (arXiv 2508.02124).

Each key ``j`` carries one score per head (the *dynamic bias*, computed from the value states by
:func:`dynamic_bias`). Query ``i`` keeps the ``w`` keys ``j <= i`` with the highest score (ties to
the later key; :func:`flexmask.topk`) or the best key blocks (:func:`flexmask.topk_blocks`) and adds
the score to the attention logits of the kept keys (:func:`flexmask.key_bias`).
:class:`DynamicMaskAttention` is a ready self-attention layer; :class:`DMAConfig` holds its settings
(shared with :func:`flexmask.hf.to_dma`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .algebra._checks import positive_int
from .algebra.bias import key_bias
from .algebra.content import topk, topk_blocks
from .algebra.masks import KeyMask, Mask
from .functional import attention
from .rotary import apply_rotary


@dataclass(frozen=True)
class DMAConfig:
    """The settings of Dynamic Mask Attention.

    Attributes:
        keep_window: keys kept per query (``w``).
        bias_form: ``"exp"`` (paper, Doge: ``exp(A · softplus(dt))``) or ``"linear"`` (``A · softplus(dt)``).
        bias_heads: ``"kv"`` (one score per KV head, as Doge) or ``"q"`` (one per query head).
        selection: ``"token"`` (the best keys, :func:`flexmask.topk`) or ``"block"`` (the best
            ``keep_window // block_size`` key blocks by their best key, plus the diagonal block:
            :func:`flexmask.topk_blocks`).
        block_size: key block length for ``"block"`` selection.

    Examples:
        >>> from flexmask.dma import DMAConfig
        >>> DMAConfig(keep_window=256, selection="block").blocks_kept
        2
    """

    keep_window: int = 2048
    bias_form: Literal["exp", "linear"] = "exp"
    bias_heads: Literal["kv", "q"] = "kv"
    selection: Literal["token", "block"] = "token"
    block_size: int = 128

    def __post_init__(self) -> None:
        positive_int("keep_window", self.keep_window)
        positive_int("block_size", self.block_size)
        if self.bias_form not in ("exp", "linear"):
            raise ValueError(f"bias_form must be 'exp' or 'linear', got {self.bias_form!r}")
        if self.bias_heads not in ("kv", "q"):
            raise ValueError(f"bias_heads must be 'kv' or 'q', got {self.bias_heads!r}")
        if self.selection not in ("token", "block"):
            raise ValueError(f"selection must be 'token' or 'block', got {self.selection!r}")
        if self.selection == "block" and self.keep_window < self.block_size:
            raise ValueError(
                f"selection='block' keeps keep_window // block_size blocks: keep_window={self.keep_window} "
                f"is smaller than block_size={self.block_size}"
            )

    @property
    def blocks_kept(self) -> int:
        """Past key blocks kept per query block with ``selection="block"``."""
        return max(1, self.keep_window // self.block_size)

    def as_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-serialisable: ``model.config.flexmask_dma``)."""
        return asdict(self)

    def content_mask(self, scores: torch.Tensor, among: Mask | None = None, kept: torch.Tensor | None = None) -> Mask:
        """The selection mask for per-key ``scores`` ``[B, Hb, N]`` (detached inside); ``kept``: a
        decoding query's kept keys (token selection, see ``fm.topk(...).keep``)."""
        if self.selection == "token":
            return topk(scores, self.keep_window, among=among, kept=kept)
        return topk_blocks(scores, self.blocks_kept, block_size=self.block_size, among=among)


def dynamic_bias(
    value_states: torch.Tensor,
    dt_proj: nn.Linear,
    A: torch.Tensor,
    form: Literal["exp", "linear"] = "exp",
) -> torch.Tensor:
    """DMA's per-key content score from the value states.

    ``dt = dt_proj(v as [B, N, Hkv·D])``; ``exp(A · softplus(dt))`` ("exp", the paper's and Doge's)
    or ``A · softplus(dt)`` ("linear").

    Args:
        value_states: ``[B, Hkv, N, D]``.
        dt_proj: ``Linear(Hkv·D, Hb)``.
        A: ``[Hb]``, one gate per bias head.
        form: ``"exp"`` or ``"linear"``.

    Returns:
        ``[B, Hb, N]`` float32 (float64 for float64 inputs).

    Examples:
        >>> import torch
        >>> from flexmask.dma import dynamic_bias
        >>> v = torch.randn(2, 4, 10, 8)
        >>> dynamic_bias(v, torch.nn.Linear(32, 4), torch.zeros(4)).detach().unique()   # A = 0: exp(0)
        tensor([1.])
    """
    dt = dt_proj(rearrange(value_states, "b h n d -> b n (h d)"))
    compute = torch.float64 if dt.dtype == torch.float64 else torch.float32
    gated = A.to(compute) * F.softplus(dt.to(compute))
    if form == "exp":
        gated = torch.exp(gated)
    elif form != "linear":
        raise ValueError(f"form must be 'exp' or 'linear', got {form!r}")
    return rearrange(gated, "b n h -> b h n")


class DynamicMaskAttention(nn.Module):
    """A self-attention layer with Dynamic Mask Attention.

    ``forward(x)`` with ``x`` [B, N, hidden] returns [B, N, hidden]. Per-key scores come from the
    value states (:func:`dynamic_bias`); each query keeps its ``keep_window`` best keys
    (``selection="token"``) or best key blocks (``"block"``) and adds the scores to the logits.
    ``A`` starts at zero, where the layer is sliding-window attention of ``keep_window`` keys.

    Args:
        hidden_size: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA), default ``num_heads``.
        head_dim: default ``hidden_size // num_heads``.
        keep_window: keys kept per query (``w``).
        bias_form: ``"exp"`` (paper, Doge) or ``"linear"``.
        bias_heads: ``"kv"`` (one score per KV head) or ``"q"`` (per query head).
        selection: ``"token"`` (exact per-key top-k) or ``"block"`` (top ``keep_window // block_size``
            key blocks).
        block_size: block length for ``"block"`` selection.
        rope_theta: rotary base, or ``None`` for no rotary embedding.
        bias: whether the q/k/v/o projections have biases.

    Examples:
        >>> import torch, flexmask as fm
        >>> layer = fm.DynamicMaskAttention(64, num_heads=4, num_kv_heads=2, keep_window=8)
        >>> layer(torch.randn(2, 20, 64)).shape
        torch.Size([2, 20, 64])
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        keep_window: int = 2048,
        *,
        bias_form: Literal["exp", "linear"] = "exp",
        bias_heads: Literal["kv", "q"] = "kv",
        selection: Literal["token", "block"] = "token",
        block_size: int = 128,
        rope_theta: float | None = 10000.0,
        bias: bool = False,
    ):
        super().__init__()
        positive_int("hidden_size", hidden_size, maximum=1 << 20)
        positive_int("num_heads", num_heads, maximum=1 << 16)
        num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) is not a multiple of num_heads ({num_heads}); give head_dim"
                )
            head_dim = hidden_size // num_heads
        positive_int("head_dim", head_dim, maximum=1 << 16)
        if rope_theta is not None:
            if head_dim % 2:
                raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim} (or pass rope_theta=None)")
            if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 0:
                raise ValueError(f"rope_theta must be a positive number or None, got {rope_theta!r}")
        self.config = DMAConfig(keep_window, bias_form, bias_heads, selection, block_size)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        bias_count = num_kv_heads if bias_heads == "kv" else num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.dt_proj = nn.Linear(num_kv_heads * head_dim, bias_count)
        self.A = nn.Parameter(torch.zeros(bias_count))

    @property
    def keep_window(self) -> int:
        return self.config.keep_window

    @property
    def selection(self) -> str:
        return self.config.selection

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def bias_form(self) -> str:
        return self.config.bias_form

    def content_mask(self, scores: torch.Tensor, among: Mask | None = None) -> Mask:
        """The selection mask for per-key ``scores`` [B, Hb, N] (detached inside)."""
        return self.config.content_mask(scores, among)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            x: ``[B, N, hidden]``.
            attention_mask: optional ``[B, N]``, 1 (or ``True``) for real tokens and 0 for padding, in
                any pattern (left, right). Padded keys never compete in the selection and are never
                attended to; a padded query's row attends to the real keys before it.
            position_ids: optional ``[B, N]`` rotary positions (default ``0..N-1``).

        Returns:
            ``[B, N, hidden]``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [batch, seq_len, hidden], got {shape}")
        if x.shape[-1] != self.q_proj.in_features:
            raise ValueError(
                f"x has width {x.shape[-1]}, but the layer was built for hidden_size={self.q_proj.in_features}"
            )
        bsz, n, _ = x.shape
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", d=self.head_dim)
        if self.rope_theta is not None:
            if position_ids is None:
                position_ids = torch.arange(n, device=x.device).expand(bsz, n)
            q = apply_rotary(q, position_ids, self.rope_theta)
            k = apply_rotary(k, position_ids, self.rope_theta)
        scores = dynamic_bias(v, self.dt_proj, self.A, self.config.bias_form)
        among = None
        if attention_mask is not None:
            among = KeyMask(_real_tokens(attention_mask, bsz, n))
        mask = self.content_mask(scores, among)
        out = attention(q, k, v, mask=mask, bias=key_bias(scores.to(q.dtype)))
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))


def _real_tokens(attention_mask: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """``attention_mask`` as the bool ``[B, N]`` of real tokens (no host synchronisation)."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch, seq_len], got {type(attention_mask).__name__}")
    if attention_mask.shape != (batch, n) or attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(
            f"attention_mask must be a bool or integer tensor [batch, seq_len] = {[batch, n]}, "
            f"got dtype {attention_mask.dtype} and shape {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


__all__ = ["DMAConfig", "DynamicMaskAttention", "dynamic_bias"]
