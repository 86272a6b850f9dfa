"""The one differentiable collective context parallelism needs: gather the shards of a sequence.

:func:`gather` all-gathers every rank's shard along one dimension and puts the pieces in sequence
order (for the ``"balanced"`` layout, chunk ``g`` of the whole comes from the rank that holds it).
Its backward is the transpose: the gradient of the whole is put back in rank order and
reduce-scattered (summed over the ranks), so each rank gets the gradient of its own shard with every
rank's use of it counted. Both collectives are plain ``torch.distributed`` calls, which NCCL and
gloo support.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._compat import all_gather_into_tensor, reduce_scatter_tensor
from .layouts import ShardLayout, chunk_owners, chunks_per_rank


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """All-gather the contiguous ``inp`` of every rank into ``out`` (rank-major, ``world · inp.numel()``)."""
    all_gather_into_tensor()(out.view(-1), inp.view(-1), group=group)


def reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Sum the contiguous ``inp`` (rank-major, ``world · out.numel()``) over the ranks into this rank's ``out``."""
    reduce_scatter_tensor()(out.view(-1), inp.view(-1), group=group)


def _all_gather(x: torch.Tensor, dim: int, layout: ShardLayout, group, world: int) -> torch.Tensor:
    pre, n, post = x.shape[:dim], x.shape[dim], x.shape[dim + 1 :]
    p = chunks_per_rank(layout)
    c = n // p
    send = x.contiguous()
    if send.dtype == torch.bool:  # not every backend reduces or moves bool: send its bytes
        send = send.view(torch.uint8)
    buf = torch.empty((world, *send.shape), dtype=send.dtype, device=x.device)
    all_gather_flat(buf, send, group)
    if x.dtype == torch.bool:
        buf = buf.view(torch.bool)
    # chunk g of the whole is chunk `slot` of rank `rank`'s shard: one copy of each into place.
    # (Slices, not index tensors: an index list made on the host and copied to a GPU would wait for
    # the stream, every call.)
    whole = torch.empty((*pre, world * n, *post), dtype=buf.dtype, device=x.device)
    for g, (rank, slot) in enumerate(chunk_owners(world, layout)):
        whole.narrow(dim, g * c, c).copy_(buf[rank].narrow(dim, slot * c, c))
    return whole


def _reduce_scatter(grad: torch.Tensor, dim: int, layout: ShardLayout, group, world: int) -> torch.Tensor:
    pre, length, post = grad.shape[:dim], grad.shape[dim], grad.shape[dim + 1 :]
    p = chunks_per_rank(layout)
    n = length // world
    c = n // p
    # rank-major: each rank's shard of the gradient, its chunks in slot order (the inverse of _all_gather)
    send = torch.empty((world, *pre, n, *post), dtype=grad.dtype, device=grad.device)
    for g, (rank, slot) in enumerate(chunk_owners(world, layout)):
        send[rank].narrow(dim, slot * c, c).copy_(grad.narrow(dim, g * c, c))
    out = torch.empty((*pre, n, *post), dtype=grad.dtype, device=grad.device)
    reduce_scatter_flat(out, send, group)
    return out


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, layout: ShardLayout, group, world: int) -> torch.Tensor:
        ctx.dim, ctx.layout, ctx.group, ctx.world = dim, layout, group, world
        return _all_gather(x, dim, layout, group, world)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.dim, ctx.layout, ctx.group, ctx.world), None, None, None, None


def gather(x: torch.Tensor, dim: int, layout: ShardLayout, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """The whole sequence from every rank's shard ``x`` along ``dim`` (checked by the caller).

    Differentiable: the gradient each rank's shard receives is the sum, over the ranks, of the
    gradient of the whole at the shard's positions (a reduce-scatter).
    """
    dim = dim % x.dim()
    if world == 1:
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _Gather.apply(x, dim, layout, group, world)
    return _all_gather(x, dim, layout, group, world)
