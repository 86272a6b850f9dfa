"""The process group a sequence is split over: checks at the boundary, and that its ranks agree.

flexmask has no communication layer of its own: every collective goes through ``torch.distributed``
on the group the caller names (``None``: the default group), with whatever backend it was made with
(NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .collectives import all_gather_flat

# (group identity, rank, world, what was agreed): calls whose shapes the ranks already agreed on. Each
# new combination costs one small all-gather (and, on GPU, a wait for it), so it is checked once.
_AGREED: set[tuple] = set()
_AGREED_MAX = 4096


def resolve_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """``(group, rank, world size)`` of ``group`` (``None``: the default group), or a clear error.

    Raises:
        ValueError: torch.distributed is not initialised, or this process is not in ``group``.
        TypeError: ``group`` is not a process group.
    """
    if not dist.is_available():
        raise ValueError("flexmask.distributed needs torch.distributed, which this PyTorch build does not include")
    if not dist.is_initialized():
        raise ValueError(
            "flexmask.distributed needs an initialised process group: call "
            "torch.distributed.init_process_group(...) first (under torchrun: init_process_group('nccl') on GPUs, "
            "'gloo' on CPUs)"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group (dist.get_rank(group) is -1)")
    return group, rank, dist.get_world_size(group)


def check_device(t: torch.Tensor, group: dist.ProcessGroup | None, what: str) -> None:
    """Raise a ``ValueError`` if ``t``'s device cannot take part in ``group``'s collectives."""
    backend = str(dist.get_backend(group))
    if backend == "nccl" and t.device.type != "cuda":
        raise ValueError(
            f"{what} is on {t.device}, but the group's backend is NCCL, which needs CUDA tensors; "
            "move the tensors to this rank's GPU or use a gloo group for CPU tensors"
        )


def signature(*parts: object) -> int:
    """A 31-bit digest of ``parts`` (their ``repr``): cheap to all-gather and compare between ranks."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def agree(
    values: Sequence[int],
    names: Sequence[str],
    group: dist.ProcessGroup | None,
    device: torch.device,
    context: Callable[[], str],
    *,
    digests: int = 0,
) -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks of ``group`` pass equal ``values``.

    ``values`` are small ints named by ``names``, the last ``digests`` of them :func:`signature`
    digests (reported as differing, not printed); ``context()`` adds what this rank passed to the
    message. Every rank must pass as many values. Each combination is checked once per process
    (one all-gather of a few ints); inside ``torch.compile`` nothing is checked.
    """
    key = (id(group), dist.get_rank(group), dist.get_world_size(group), tuple(values))
    if torch.compiler.is_compiling() or key in _AGREED:
        return
    mine = torch.tensor(list(values), dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    table = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
    all_gather_flat(table, mine, group)
    rows = table.view(world, -1).tolist()
    differ = [i for i in range(len(values)) if len({row[i] for row in rows}) > 1]
    if differ:
        shown = [i for i in differ if i < len(values) - digests]
        per_rank = "; ".join(
            f"rank {r}: " + ", ".join(f"{names[i]}={row[i]}" for i in shown) for r, row in enumerate(rows)
        )
        raise ValueError(
            f"the ranks of the group disagree on {', '.join(names[i] for i in differ)}"
            + (f" ({per_rank})" if shown else "")
            + f"; every rank must make the same call on its own shard. {context()}"
        )
    if len(_AGREED) >= _AGREED_MAX:
        _AGREED.clear()
    _AGREED.add(key)
