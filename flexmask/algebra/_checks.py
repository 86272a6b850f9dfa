"""Argument checks shared by the expressions: clear errors at construction, naming the argument."""

from __future__ import annotations

import torch

MAX_SIZE = (1 << 31) - 1
"""Largest size, length or count an expression accepts: kernels index positions in int32."""


def positive_int(name: str, value: object, maximum: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum:,}, got {value:,}")
    return value


def nonnegative_int(name: str, value: object, maximum: int = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum:,}, got {value:,}")
    return value


def real_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` unless it lives on the meta device (no data to read)."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no data; give a tensor with values")
    return t


def lengths_tensor(name: str, lengths: object) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an int tensor [batch], got {type(lengths).__name__}")
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError(
            f"{name} must be an integer tensor of shape [batch], got dtype {lengths.dtype} "
            f"and shape {tuple(lengths.shape)}"
        )
    if lengths.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    real_tensor(name, lengths)
    if not torch.compiler.is_compiling() and bool((lengths < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {lengths.tolist()}")
    return lengths


def check_batch(what: str, got: int, batch: int) -> None:
    if got not in (1, batch):
        raise ValueError(f"{what} have batch size {got}, but the inputs have batch {batch}")


def batch_expand(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


def merge_dim(values, what: str) -> int | None:
    sizes = {v for v in values if v is not None and v != 1}
    if len(sizes) > 1:
        raise ValueError(f"masks combined with different {what} sizes: {sorted(sizes)}")
    if sizes:
        return sizes.pop()
    return 1 if any(v == 1 for v in values) else None
