"""How a sequence is split over the ranks of a group: the two shard layouts.

A sequence of ``N`` positions is split over ``world`` ranks, each holding ``n = N / world``:

* ``"contiguous"``: rank ``r`` holds positions ``r·n .. (r+1)·n − 1``.
* ``"balanced"`` (head-tail, or zig-zag): the sequence is cut into ``2·world`` chunks of
  ``c = N / (2·world)``; rank ``r`` holds chunk ``r`` then chunk ``2·world − 1 − r``, concatenated in
  that order. Under a causal mask a rank's early chunk has few keys and its late chunk many, so
  every rank does the same work (with ``"contiguous"`` the last rank does ``2·world − 1`` times the
  first's).

Examples:
    >>> from flexmask.distributed.layouts import pieces
    >>> pieces(6, world=2, rank=0, layout="balanced")     # N = 12: chunks of 3; rank 0 holds 0-2 and 9-11
    (Piece(start=0, local=0, length=3), Piece(start=9, local=3, length=3))
    >>> pieces(6, world=2, rank=1, layout="contiguous")
    (Piece(start=6, local=0, length=6),)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

ShardLayout = Literal["contiguous", "balanced"]
"""The name of a shard layout: ``"contiguous"`` or ``"balanced"`` (head-tail)."""

LAYOUTS: tuple[str, ...] = ("contiguous", "balanced")


@dataclass(frozen=True)
class SequenceSharding:
    """How a model's sequences are split over ranks: ``layout`` over the ranks of ``group``
    (``None``: the default process group). Given to ``fm.hf.apply``/``fm.hf.to_dma`` so that every
    attention layer runs :func:`flexmask.distributed.attention`.

    Examples:
        >>> from flexmask.distributed import SequenceSharding
        >>> SequenceSharding("balanced").layout
        'balanced'
    """

    layout: ShardLayout = "contiguous"
    group: Any = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


class Piece(NamedTuple):
    """One run of consecutive positions of the whole sequence that a rank's shard holds."""

    start: int
    """Absolute position of its first element in the whole sequence."""
    local: int
    """Where it starts in the rank's shard."""
    length: int
    """How many positions it holds."""


def check_layout(layout: object) -> ShardLayout:
    """``layout`` if it names a shard layout, else a ``ValueError`` that lists them."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be 'contiguous' or 'balanced' (head-tail), got {layout!r}")
    return layout  # type: ignore[return-value]


def chunks_per_rank(layout: ShardLayout) -> int:
    """How many runs of the sequence one rank's shard holds: 1 (contiguous) or 2 (balanced)."""
    return 1 if layout == "contiguous" else 2


def check_whole_length(length: int, world: int, layout: ShardLayout, what: str) -> None:
    """Raise a ``ValueError`` unless a whole sequence of ``length`` splits evenly in ``layout``."""
    parts = world * chunks_per_rank(layout)
    if length % parts:
        raise ValueError(
            f"{what} has length {length}, which does not split into {parts} equal "
            + ("shards" if layout == "contiguous" else f"chunks (layout='balanced' cuts it into 2·world = {parts})")
            + f" for a group of {world}; pad the sequence to a multiple of {parts}"
        )


def check_shard_length(length: int, layout: ShardLayout, what: str) -> None:
    """Raise a ``ValueError`` unless a shard of ``length`` positions fits ``layout`` (balanced: even)."""
    if layout == "balanced" and length % 2:
        raise ValueError(
            f"{what} has {length} positions per rank, but a 'balanced' shard is two chunks of equal length, "
            "so it must be even (a whole length divisible by 2·world)"
        )


def pieces(shard_length: int, world: int, rank: int, layout: ShardLayout) -> tuple[Piece, ...]:
    """The runs of the whole sequence that rank ``rank``'s shard of ``shard_length`` holds, in shard order."""
    if layout == "contiguous":
        return (Piece(rank * shard_length, 0, shard_length),)
    c = shard_length // 2
    return (Piece(rank * c, 0, c), Piece((2 * world - 1 - rank) * c, c, c))


def chunk_owners(world: int, layout: ShardLayout) -> list[tuple[int, int]]:
    """For each chunk of the whole sequence, in order: ``(rank, index of the chunk in that rank's shard)``.

    Examples:
        >>> chunk_owners(2, "balanced")
        [(0, 0), (1, 0), (1, 1), (0, 1)]
    """
    if layout == "contiguous":
        return [(r, 0) for r in range(world)]
    return [(g, 0) if g < world else (2 * world - 1 - g, 1) for g in range(2 * world)]
