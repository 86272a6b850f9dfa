"""Split a whole sequence into this rank's shard (:func:`shard`), and gather it back (:func:`unshard`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import collectives
from .layouts import ShardLayout, check_layout, check_shard_length, check_whole_length, pieces
from .process_group import agree, check_device, resolve_group, signature


def _check_tensor(name: str, x: object, dim: object) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard(
    x: torch.Tensor,
    dim: int,
    *,
    layout: ShardLayout = "contiguous",
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's shard of a whole sequence ``x`` split along ``dim`` over the ranks of ``group``.

    With ``world`` ranks and ``N = x.shape[dim]``: ``"contiguous"`` gives rank ``r`` positions
    ``r·N/world .. (r+1)·N/world − 1``; ``"balanced"`` cuts ``x`` into ``2·world`` chunks and gives rank
    ``r`` chunk ``r`` then chunk ``2·world − 1 − r``. No communication: every rank passes the same
    ``x`` (e.g. tokens from one seed) and keeps its part. Differentiable (the gradient of ``x`` is
    zero outside the shard).

    Args:
        x: the whole sequence, any shape; ``x.shape[dim]`` divisible by ``world`` (contiguous) or
            ``2·world`` (balanced).
        dim: the sequence dimension (``2`` for ``[B, H, N, D]``, ``-1`` for ``[B, N]`` ids or
            ``[B, H, N]`` scores).
        layout: ``"contiguous"`` or ``"balanced"``.
        group: the process group (``None``: the default group).

    Returns:
        A new tensor (not a view) shaped like ``x`` with ``N / world`` along ``dim``.

    Raises:
        ValueError: no initialised process group, an unknown layout, or a length that does not split.

    Examples:
        >>> # two ranks (torchrun --nproc-per-node 2); on rank 1:
        >>> import torch, flexmask.distributed as fmd
        >>> fmd.shard(torch.arange(8), 0, layout="balanced")        # doctest: +SKIP
        tensor([2, 3, 4, 5])
        >>> fmd.shard(torch.arange(8), 0)                           # doctest: +SKIP
        tensor([4, 5, 6, 7])
    """
    layout = check_layout(layout)
    dim = _check_tensor("x", x, dim)
    group, rank, world = resolve_group(group)
    check_whole_length(x.shape[dim], world, layout, "x along dim")
    n = x.shape[dim] // world
    parts = [x.narrow(dim, p.start, p.length) for p in pieces(n, world, rank, layout)]
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone(memory_format=torch.contiguous_format)


def unshard(
    x: torch.Tensor,
    dim: int,
    *,
    layout: ShardLayout = "contiguous",
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` along ``dim``: the inverse of :func:`shard`.

    One all-gather. Differentiable: in the backward each rank gets the gradient of its shard, summed
    over the ranks (a reduce-scatter). That is the gradient of the sum of every rank's loss, the
    convention of data and context parallelism; if every rank computes the same loss from the whole
    tensor, divide by ``world``.

    Args:
        x: this rank's shard; every rank passes the same shape and dtype.
        dim: the sequence dimension.
        layout: the layout the shards are in, ``"contiguous"`` or ``"balanced"``.
        group: the process group (``None``: the default group).

    Returns:
        ``x``'s shape with ``world`` times its length along ``dim``, in sequence order.

    Raises:
        ValueError: no initialised process group, an unknown layout, an odd balanced shard, or
            shapes that differ between the ranks.

    Examples:
        >>> # two ranks; each holds its balanced shard of torch.arange(8)
        >>> fmd.unshard(fmd.shard(torch.arange(8), 0, layout="balanced"), 0, layout="balanced")  # doctest: +SKIP
        tensor([0, 1, 2, 3, 4, 5, 6, 7])
    """
    layout = check_layout(layout)
    dim = _check_tensor("x", x, dim)
    group, rank, world = resolve_group(group)
    check_device(x, group, "x")
    check_shard_length(x.shape[dim], layout, "x along dim")
    if not torch.compiler.is_compiling():
        agree(
            [x.dim(), dim, signature(str(x.dtype)), signature(tuple(x.shape))],
            ["x.dim()", "dim", "the dtype", "the shape"],
            group,
            x.device,
            lambda: f"This rank's x has shape {tuple(x.shape)} and dtype {x.dtype} (in flexmask.distributed.unshard).",
            digests=2,
        )
    return collectives.gather(x, dim, layout, group, world)
