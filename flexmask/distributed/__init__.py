"""Scaling out on ``torch.distributed``: context parallelism for flexmask masks and DMA.

A sequence of ``N`` positions is split over the ``world`` ranks of a process group; each rank holds
a shard of ``N / world`` positions of every sequence-indexed tensor, in one of two layouts
(:mod:`.layouts`): ``"contiguous"`` or ``"balanced"`` (head-tail, even causal work).

* :func:`attention`: :func:`flexmask.attention` over the whole sequence, from and to this rank's
  shards (module :mod:`.context_parallel`);
* :func:`shard` / :func:`unshard`: split a whole tensor into this rank's shard, and gather the
  shards back (differentiable) (module :mod:`.sharding`).

Hugging Face models split their sequences with ``fm.hf.apply(model, sequence_sharding=
SequenceSharding(layout))`` (or ``to_dma(..., sequence_sharding=...)``). Models shard their weights
with FSDP2 (``torch.distributed.fsdp.fully_shard``) as any PyTorch model: see the "Scaling out"
page of the docs and ``examples/train_fsdp.py``.

Examples:
    >>> import flexmask.distributed as fmd
    >>> sorted(fmd.__all__)
    ['SequenceSharding', 'ShardLayout', 'attention', 'shard', 'unshard']
"""

from __future__ import annotations

from .context_parallel import attention
from .layouts import SequenceSharding, ShardLayout
from .sharding import shard, unshard

__all__ = ["SequenceSharding", "ShardLayout", "attention", "shard", "unshard"]
