"""Context parallelism: attention over a sequence split across the ranks of a process group.

Each rank holds a shard of the queries, keys and values (``[B, H, N / world, D]``). :func:`attention`
all-gathers the keys and values and every key-indexed tensor of the mask and bias (document ids,
top-k scores, key biases), then runs :func:`flexmask.attention` for this rank's query rows at their
absolute positions (``q_offset``), one call per run of consecutive positions the shard holds. The
rank's ``BlockMask`` is built from the mask's structure for those rows only; the gathers' backward
reduce-scatters the gradients of the whole keys, values and key tensors to the shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..algebra.bias import Bias, TensorBias
from ..algebra.content import TopKBlocks
from ..algebra.masks import Mask
from ..functional import attention as single_device_attention
from ..functional import check_expressions
from ..settings import Options
from . import collectives
from .layouts import ShardLayout, check_layout, check_shard_length, chunks_per_rank, pieces
from .process_group import agree, check_device, resolve_group, signature


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Mask | None = None,
    bias: Bias | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: ShardLayout = "contiguous",
    options: Options | None = None,
) -> torch.Tensor:
    """Context-parallel :func:`flexmask.attention`: this rank's shard of the output of a sequence
    split over the ranks of ``group``.

    Masks and biases are the expressions of one device, in absolute positions of the whole
    sequence of ``N = world · n`` positions. Their sequence-indexed tensors are given as this rank's
    shards, in the same layout as ``q``, ``k``, ``v``: document ids ``[B, n]``, ``fm.topk`` /
    ``fm.topk_blocks`` scores and ``fm.key_bias`` tensors ``[B, Hs, n]``, key-only ``fm.tensor_bias``
    ``[..., 1, n]``. Lengths (``fm.padding``, ``fm.prefix_lm``) are global already. Every rank makes
    the same call on its own shard.

    Args:
        q: ``[B, Hq, n, D]``, this rank's queries.
        k: ``[B, Hkv, n, D]``, this rank's keys (``Hq`` a multiple of ``Hkv``: GQA).
        v: ``[B, Hkv, n, Dv]``, this rank's values.
        mask: a flexmask mask over the whole sequence, or ``None``.
        bias: a flexmask bias over the whole sequence, or ``None``.
        scale: score scale, default ``1 / sqrt(D)``.
        softcap: as in :func:`flexmask.attention`.
        group: the process group the sequence is split over (``None``: the default group).
        layout: ``"contiguous"`` (rank ``r`` holds positions ``r·n .. (r+1)·n − 1``) or
            ``"balanced"`` (the sequence cut into ``2·world`` chunks; rank ``r`` holds chunks ``r``
            and ``2·world − 1 − r``, in that order: even causal work; ``n`` must be even).
        options: per-call options of :func:`flexmask.attention` (:class:`flexmask.Options`).

    Returns:
        ``[B, Hq, n, Dv]``: this rank's rows of the output, in ``q``'s dtype. Gradients reach ``q``,
        ``k``, ``v``, the key-indexed tensors (each shard gets the sum over the ranks' rows) and
        learnable tables (each rank gets its rows' share: reduce them over the group, as FSDP/DDP
        over these ranks does).

    Raises:
        ValueError: no initialised process group, an unknown layout, shards of different lengths,
            an odd ``balanced`` shard, a tensor that is not this rank's shard, a ``tensor_bias``
            with a query dimension, or calls that differ between the ranks (checked once per shape).
        TypeError: ``mask``/``bias`` not flexmask expressions, or ``group`` not a process group.

    Examples:
        >>> # every rank (torchrun --nproc-per-node 2), sequence N = 2048 split in two:
        >>> import torch, flexmask as fm, flexmask.distributed as fmd
        >>> q = k = v = torch.randn(1, 4, 1024, 64)                    # this rank's shard
        >>> ids = torch.zeros(1, 1024, dtype=torch.long)              # this rank's document ids
        >>> out = fmd.attention(q, k, v, mask=fm.causal() & fm.document(ids))  # doctest: +SKIP
        >>> out.shape                                                  # doctest: +SKIP
        torch.Size([1, 4, 1024, 64])
    """
    layout = check_layout(layout)
    n = _check_shards(q, k, v)
    check_expressions(mask, bias)
    group, rank, world = resolve_group(group)
    check_device(q, group, "q")
    check_shard_length(n, layout, "this rank's shard of q, k, v")
    _check_dense_biases(bias)

    def context() -> str:
        return (
            f"This rank's q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} ({q.dtype}), mask `{mask!r}`, "
            f"bias `{bias!r}` (in flexmask.distributed.attention, layout={layout!r})."
        )

    if not torch.compiler.is_compiling():  # (checked once per shape; a digest dynamo does not trace)
        agree(
            [*q.shape, k.shape[1], v.shape[3], signature(str(q.dtype), mask, bias, scale, softcap, options)],
            [
                "batch",
                "query heads",
                "shard length",
                "head_dim",
                "key/value heads",
                "value head_dim",
                "dtype or expressions",
            ],
            group,
            q.device,
            context,
            digests=1,
        )
    whole = _key_gatherer(mask, n, world, layout, group)
    whole_mask = None if mask is None else mask._map_keys(whole)
    whole_bias = None if bias is None else bias._map_keys(whole)
    k_all = collectives.gather(k, 2, layout, group, world)
    v_all = collectives.gather(v, 2, layout, group, world)
    outs = []
    for piece in pieces(n, world, rank, layout):
        rows = q.narrow(2, piece.local, piece.length)
        try:
            out = single_device_attention(
                rows,
                k_all,
                v_all,
                mask=whole_mask,
                bias=whole_bias,
                scale=scale,
                softcap=softcap,
                options=options,
                q_offset=piece.start,
            )
        except (ValueError, TypeError) as e:
            raise type(e)(f"{e}\n  {context()} The whole sequence has {world * n} positions.") from e
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _check_shards(q: object, k: object, v: object) -> int:
    """The shard length of ``q``, ``k``, ``v`` (4-D tensors of one length), or a clear error."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, shard_len, head_dim], got shape {tuple(t.shape)}")
    if not q.shape[2] == k.shape[2] == v.shape[2]:  # type: ignore[union-attr]
        raise ValueError(
            "q, k and v must be this rank's shards of one sequence, of one length, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"  # type: ignore[union-attr]
        )
    return q.shape[2]  # type: ignore[union-attr]


def _check_dense_biases(bias: Bias | None) -> None:
    """A ``tensor_bias`` must be key-only: a query dimension would need the other ranks' rows."""
    for part in () if bias is None else bias._parts():
        t = part.t if isinstance(part, TensorBias) else None
        if t is not None and t.dim() >= 2 and t.shape[-2] > 1:
            raise ValueError(
                f"tensor_bias of shape {tuple(t.shape)} has a query dimension, which flexmask.distributed.attention "
                "does not split; give a key-only bias [..., 1, shard_len] (this rank's keys), or express the "
                "pattern with the bias algebra (fm.alibi, fm.relative_bias, fm.key_bias)"
            )


def _walk(mask: Mask | None):
    if mask is not None:
        yield mask
        for child in mask._children():
            yield from _walk(child)


def _key_gatherer(mask: Mask | None, n: int, world: int, layout: ShardLayout, group):
    """The function ``_map_keys`` applies: a key-indexed shard → the whole, gathered once per tensor."""
    chunk = n // chunks_per_rank(layout)
    per_block: list[tuple[torch.Tensor, int]] = []  # fm.topk_blocks scores given per block, and the block size
    for m in _walk(mask):
        if isinstance(m, TopKBlocks) and m.scores.shape[-1] != n:
            bs = m.block_size
            if chunk % bs:
                raise ValueError(
                    f"topk_blocks scores have shape {tuple(m.scores.shape)}, not one score per key of this rank's "
                    f"shard ({n}); scores per block need each run of positions a rank holds ({chunk}) to be a "
                    f"multiple of block_size={bs}: give one score per key"
                )
            if m.scores.shape[-1] != n // bs:
                raise ValueError(
                    f"topk_blocks scores have shape {tuple(m.scores.shape)}; as this rank's shard they give one score "
                    f"per key ({n}) or one per block of {bs} ({n // bs})"
                )
            per_block.append((m.scores, bs))
    gathered: list[tuple[torch.Tensor, torch.Tensor]] = []  # a list and `is`: dynamo traces both

    def whole(t: torch.Tensor) -> torch.Tensor:
        for shard, out in gathered:  # e.g. DMA's scores: in fm.topk and fm.key_bias, gathered once
            if shard is t:
                return out
        length = t.shape[-1] * next((bs for s, bs in per_block if s is t), 1)
        if length != n:
            raise ValueError(
                f"a sequence-indexed tensor of the mask or bias has shape {tuple(t.shape)}, but this rank's shard "
                f"of q, k, v has {n} positions: give document ids, scores and key biases as this rank's shards "
                "(flexmask.distributed.shard(t, -1, layout=...)), in the layout of q, k, v"
            )
        out = collectives.gather(t, -1, layout, group, world)
        gathered.append((t, out))
        return out

    return whole
