"""The vocabulary of lowering: a call's shapes, block ranges, and the per-call lowering context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..settings import Resolved

ModFn = Callable[..., torch.Tensor]
"""A FlexAttention ``mask_mod`` ``(b, h, q_idx, kv_idx) -> bool`` or bias term ``-> score``."""

BLOCK = 128
"""The BlockMask block size flexmask lowers to (FlexAttention's default tile)."""


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


@dataclass(frozen=True)
class Layout:
    """The shapes a mask or bias is lowered for.

    The queries are positions ``offset .. offset + q_len - 1`` of the keys' sequence: by default the
    last ``q_len`` of the ``kv_len`` positions (``offset = kv_len - q_len``, as with a KV cache), or
    from ``q_start`` when a call says so (a shard of a sequence split over devices). Masks and biases
    always see absolute positions. ``heads`` are the query heads; ``kv_heads`` the key/value heads
    (``None`` when lowering a mask on its own).
    """

    batch: int
    heads: int
    q_len: int
    kv_len: int
    device: torch.device
    kv_heads: int | None = None
    q_start: int | torch.Tensor | None = None

    @property
    def offset(self) -> int | torch.Tensor:
        """Absolute position of the first query: an int, or a one-element int64 tensor when a call
        gives its one decoding query's position as a tensor (a static KV cache's decoding step)."""
        return self.kv_len - self.q_len if self.q_start is None else self.q_start

    @property
    def offset_is_tensor(self) -> bool:
        return isinstance(self.q_start, torch.Tensor)

    @property
    def starts_on_block(self) -> bool:
        """Whether the first query starts a block of ``BLOCK`` (false for a tensor position, which is
        never read on the host: a graph break under ``torch.compile``)."""
        return not self.offset_is_tensor and self.offset % BLOCK == 0

    @property
    def last_query_is_last_key(self) -> bool:
        """Whether the last query is the last key's position (always, unless ``q_start`` says otherwise)."""
        return not self.offset_is_tensor and self.offset + self.q_len == self.kv_len


def hopper(device: torch.device) -> bool:
    """Whether ``device`` is an sm_90 GPU (H100, H200), where the Gluon token kernels run."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


class Offers:
    """What a mask's lowering offers the planner, beyond a ``mask_mod`` and block maps: bit flags,
    combined with ``|`` and tested with ``&``.

    Plain ints rather than an ``enum.Flag``: dynamo in torch 2.11 (Python 3.12) breaks the graph on
    ``flag in flags``, and the planner runs inside compiled models.
    """

    NONE = 0
    #: Every partial block of its BlockMask is a diagonal block of a causal mask (``j <= i`` inside),
    #: so kernels that apply the causal rule in partial blocks are exact (``fm.topk_blocks``).
    CAUSAL_PARTIAL_BLOCKS = 1
    #: A key layout in which the keys each query block needs are contiguous runs (a lone ``fm.topk``).
    TOKEN_LAYOUT = 2
    #: Its whole BlockMask build (selection included) can be replayed from a CUDA graph.
    GRAPHED_BUILD = 4
    #: For one decoding query, a content factor can name the few positions it may keep
    #: (``_gather_factor``/``_decode_gather``): the call attends to those only.
    GATHER_DECODE = 8
    #: The whole mask (its ``among`` included) is the interval rule ``j <= i < e_j`` of one end per
    #: key (``_token_ends``): what the in-place token kernels read (``fm.topk``, also among
    #: documents and padding; ``fm.topk_blocks`` on Hopper, where those kernels are Gluon kernels).
    TOKEN_ENDS = 16


@dataclass
class Lowering:
    """What lowering one call needs: its layout and options, and a memo of what expressions derive
    from their tensors (a content mask's selection is computed once per lowering, whether its
    ``mask_mod`` or its block maps ask first). Made per lowering and dropped after it."""

    layout: Layout
    options: Resolved
    gathered_by: Any = None
    """The content mask whose selection a gathering plan applies by gathering (its ``mask_mod`` then
    only adds its ``among`` part), or ``None``."""
    _memo: list = field(default_factory=list)

    def derive(self, expr: Any, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per (expression object, name) in this lowering."""
        for owner, key, value in self._memo:  # a list, not a dict: dynamo traces `is` on any object
            if owner is expr and key == name:
                return value
        value = compute()
        self._memo.append((expr, name, value))
        return value


@dataclass(frozen=True)
class BlockRanges:
    """First and last absolute position of every block along one axis.

    ``lo``/``hi`` are int64 tensors shaped to broadcast along that axis of a
    ``[B, H, num_q_blocks, num_kv_blocks]`` map (``[n, 1]`` for queries, ``[n]`` for keys).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    size: int
    length: int
    start: int

    @property
    def count(self) -> int:
        return self.lo.numel()


def block_ranges(length: int, block_size: int, start: int, device: torch.device, axis: str) -> BlockRanges:
    """The :class:`BlockRanges` of ``length`` positions from ``start``, along ``axis`` (``"q"`` or ``"kv"``)."""
    n = cdiv(length, block_size)
    lo = torch.arange(n, device=device, dtype=torch.int64) * block_size
    hi = torch.clamp(lo + block_size, max=length) - 1
    lo, hi = lo + start, hi + start
    if axis == "q":
        lo, hi = lo[:, None], hi[:, None]
    return BlockRanges(lo, hi, block_size, length, start)


def per_block_min_max(x: torch.Tensor, block_size: int, start: int = 0, length: int | None = None):
    """Min and max of ``x[..., start:start+length]`` over each block of ``block_size``: two ``[..., n]`` tensors."""
    length = x.shape[-1] - start if length is None else length
    x = x[..., start : start + length]
    n = cdiv(length, block_size)
    pad = n * block_size - length
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    x = x.reshape(*x.shape[:-1], n, block_size)
    return x.amin(-1), x.amax(-1)


def local_mask_mod(mask: Any, low: Lowering) -> ModFn | None:
    """``mask``'s ``mask_mod`` in call-local query positions (``0 .. q_len - 1``), as kernels call it;
    ``None`` for no mask."""
    if mask is None:
        return None
    return shift_queries(mask._mask_mod(low), low.layout.offset, low.layout.device)


def shift_queries(mod: ModFn, offset: int | torch.Tensor, device: torch.device) -> ModFn:
    """Turn a mask/score function of absolute query positions into one of call-local positions.

    The offset is captured as a one-element tensor (read with ``[0]``, a load in the kernel) so that
    a growing KV cache does not recompile; a 0-d tensor would become a host scalar, which
    dynamic-shape flex kernels fail to lower inside a score_mod (seen with torch 2.11 on an H100).
    """
    if isinstance(offset, torch.Tensor):
        shift = offset.reshape(1).to(device=device, dtype=torch.int64)
    elif offset == 0:
        return mod
    else:
        # torch.full launches a fill kernel; torch.tensor([offset], device=...) would copy from
        # pageable host memory, which synchronises the stream on every decoding step
        shift = torch.full((1,), offset, device=device)

    def shifted(b, h, q_idx, kv_idx):
        return mod(b, h, q_idx + shift[0], kv_idx)

    return shifted
