"""Rotary position embeddings (the half-split convention of Llama-style models)."""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[B, H, N, D]`` (``D`` even) at ``positions`` ``[B, N]``.

    Computed in float32, returned in ``x``'s dtype.

    Examples:
        >>> import torch
        >>> from flexmask.rotary import apply_rotary
        >>> x = torch.randn(1, 2, 5, 8)
        >>> torch.allclose(apply_rotary(x, torch.zeros(1, 5), 10000.0), x)   # position 0: identity
        True
    """
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions[:, None, :, None].float() * inv_freq
    cos, sin = torch.cos(angles).repeat(1, 1, 1, 2), torch.sin(angles).repeat(1, 1, 1, 2)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)
