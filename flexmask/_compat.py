"""Every private or version-dependent touch point of torch and transformers, in one place.

When a release moves one of these, this is the file to change. Each function says what it
relies on.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch

# -- torch ---------------------------------------------------------------------------------------


def tensor_version(t: torch.Tensor) -> int | None:
    """The version counter of ``t`` (bumped by every in-place operation through autograd's view of
    it), or ``None`` for inference tensors, which have none (``Tensor._version``, private)."""
    if t.is_inference():
        return None
    return t._version


def raise_recompile_limit(limit: int) -> None:
    """Raise dynamo's per-function recompile limits to at least ``limit`` (``torch._dynamo.config``)."""
    config = torch._dynamo.config
    if config.recompile_limit < limit:
        config.recompile_limit = limit
    if config.accumulated_recompile_limit < config.recompile_limit:
        config.accumulated_recompile_limit = config.recompile_limit


def compiled_create_block_mask(
    mask_mod: Callable, batch: int, heads: int, q_len: int, kv_len: int, device, block_size: int
):
    """torch's ``create_block_mask`` through its compiled builder (the private ``_compile=True``):
    it evaluates a mask function blockwise in fused kernels instead of materialising ``N²`` booleans."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device, BLOCK_SIZE=block_size, _compile=True)


def cpu_flash_attention() -> tuple[Callable, Callable] | None:
    """``(forward, backward)`` of ATen's CPU flash-attention kernel behind SDPA
    (``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``, private ops taking
    ``attn_mask`` and returning the log-sum-exp), or ``None`` when this torch has none."""
    try:
        ops = torch.ops.aten
        return ops._scaled_dot_product_flash_attention_for_cpu, ops._scaled_dot_product_flash_attention_for_cpu_backward
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return None


@functools.cache
def cpu_flash_native_gqa() -> bool:
    """Whether this torch's CPU flash kernel reads KV head ``h // (Hq/Hkv)`` itself, forward and
    backward (probed once per process on a tiny float64 problem: a fact about the installed torch)."""
    kernels = cpu_flash_attention()
    if kernels is None:
        return False
    flash, flash_backward = kernels
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, h, 3, 4, generator=gen, dtype=torch.float64) for h in (4, 2, 2, 4))
    try:
        out, lse = flash(q, k, v, scale=0.5)
        dq, dk, dv = flash_backward(do, q, k, v, out, lse, 0.0, False, scale=0.5)
    except RuntimeError:
        return False
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref, lse_ref = flash(q, kk, vv, scale=0.5)
    dq_ref, dk_ref, dv_ref = flash_backward(do, q, kk, vv, ref, lse_ref, 0.0, False, scale=0.5)
    dk_ref, dv_ref = (g.view(1, 2, 2, 3, 4).sum(2) for g in (dk_ref, dv_ref))
    pairs = ((out, ref), (dq, dq_ref), (dk, dk_ref), (dv, dv_ref))
    return all(a.shape == b.shape and torch.allclose(a, b, atol=1e-12) for a, b in pairs)


def mark_static_address(t: torch.Tensor) -> None:
    """Tell dynamo that ``t`` keeps its address across calls (``torch._dynamo.mark_static_address``,
    as transformers marks its static KV cache), so that CUDA graphs of compiled steps that write
    into it in place are kept; a no-op while tracing."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)


# torch < 2.13: inductor's split scan (a long cumsum over few rows) fails to generate code when a
# broadcast operand is fused into it ("list indices must be integers or slices, not NoneType",
# pytorch/pytorch#180221, fixed by #180369).
_SPLIT_SCAN_FUSION_BROKEN = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


_SCAN_CHUNK = 1024


@torch.library.custom_op("flexmask::cumsum", mutates_args=())
def _unfused_cumsum(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point or x.is_floating_point() or x.shape[dim] <= 2 * _SCAN_CHUNK:
        return torch.cumsum(x.contiguous(), dim, dtype=dtype)  # contiguous, whatever the input's strides
    if x.is_cuda and dim in (-1, x.dim() - 1):
        from .backends.triton import scan  # (imported here: the backends import this module)

        if scan.triton is not None:
            return scan.row_cumsum(x, dtype)
    return _chunked_cumsum(x, dim, dtype)


def _chunked_cumsum(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An integer ``cumsum`` of long rows as scans of ``_SCAN_CHUNK`` elements plus each chunk's
    carry: a long scan over few rows runs one thread block per row on CUDA (about 50 µs for
    ``[8, 32768]`` on an H200), short ones over many rows use the whole GPU. Contiguous output."""
    y = x.movedim(dim, -1).to(dtype)
    n = y.shape[-1]
    y = torch.nn.functional.pad(y, (0, -n % _SCAN_CHUNK)).unflatten(-1, (-1, _SCAN_CHUNK)).cumsum(-1)
    totals = y[..., -1]
    y = y + (totals.cumsum(-1) - totals)[..., None]  # what the chunks before hold
    return y.flatten(-2)[..., :n].movedim(-1, dim).contiguous()


@_unfused_cumsum.register_fake
def _(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=dtype)


def cumsum(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.cumsum`` of integer counts. Under ``torch.compile`` on a GPU with torch < 2.13 it is
    an op inductor does not fuse into (its input is materialised first), which avoids the split-scan
    code generation failure of those releases (pytorch/pytorch#180221)."""
    if dtype is None:
        dtype = torch.int64 if not x.is_floating_point() else x.dtype
    if _SPLIT_SCAN_FUSION_BROKEN and x.device.type != "cpu" and torch.compiler.is_compiling():
        return _unfused_cumsum(x, dim, dtype)
    return torch.cumsum(x, dim, dtype=dtype)


def dynamo_counters() -> dict:
    """dynamo's event counters (``torch._dynamo.utils.counters``, private): ``["stats"]["unique_graphs"]`` etc."""
    from torch._dynamo.utils import counters

    return counters


def all_gather_into_tensor():
    """``torch.distributed``'s flat all-gather (``all_gather_single`` from torch 2.13,
    ``all_gather_into_tensor`` before)."""
    import torch.distributed as dist

    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_tensor():
    """``torch.distributed``'s flat reduce-scatter (``reduce_scatter_single`` from torch 2.13,
    ``reduce_scatter_tensor`` before)."""
    import torch.distributed as dist

    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# -- transformers --------------------------------------------------------------------------------

_MASKING_UTILS: types.ModuleType | None = None


def masking_utils() -> types.ModuleType:
    """``transformers.masking_utils``, imported once outside ``torch.compile``: dynamo cannot trace an
    import through transformers' lazy module (a graph break, "Bad import result")."""
    global _MASKING_UTILS
    if _MASKING_UTILS is None:
        import transformers.masking_utils

        _MASKING_UTILS = transformers.masking_utils
    return _MASKING_UTILS


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def closure(fn: Callable) -> dict[str, Any]:
    """The names and values a function closes over (``__closure__``/``__code__``): how flexmask reads
    the mask functions transformers composes (``and_masks``, ``sliding_window_overlay``, ...)."""
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells, strict=True)}


def attn_implementation(model_or_config: Any) -> str | None:
    """The attention implementation a transformers model or config runs (``config._attn_implementation``)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "_attn_implementation", None)
