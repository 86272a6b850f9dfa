"""Block-level DMA (``fm.topk_blocks``) with its backward balanced over the key blocks.

A block's score is fixed for every query block, so the best key blocks are chosen by almost every
query block after them: with top-16 of 256 blocks (N = 32k), the hottest block serves ~250 query
blocks while the average serves 17. FlexAttention's backward gives each key block one program
(``dK``, ``dV`` and, for the key-bias gradient, the transposed pass loop over the query blocks
that read it), so those few programs run ~15× longer than the rest and set the time. Here every
key block serves at most :data:`SERVE` query blocks: the query blocks past that read a *copy* of
the block, appended after the keys. The copies are small (at most ``nq · k / SERVE`` blocks), and
their gradients flow back through the gather that made them.

Layout of the keys (``M = (nb + E) · block``): the ``N`` keys in order (padded to whole blocks),
then ``E`` copy slots, ``E = nq · k // SERVE`` (fixed by the shapes, so nothing recompiles; unused
slots are read by nobody). Copies only serve past blocks, which are *full*: the ``mask_mod`` runs
on the diagonal blocks only, where it is causal.
"""

from __future__ import annotations

import torch

from ..blocks import CudaGraphed, _block_tensors, block_mask_from_tensors

# Query blocks one key block (or one copy) serves at most.
SERVE = 16
# Set to False to run fm.topk_blocks through its plain BlockMask (the hot blocks' programs then set
# the backward's time).
ENABLED = True
# Set to False to build the layout kernel by kernel on CUDA too.
GRAPHED_BUILD = True


def applies(mask, bias, softcap, layout, k: torch.Tensor) -> bool:
    """Whether ``fm.attention`` runs this call here: a lone ``fm.topk_blocks`` (no ``among``) over
    blocks of 128, self-attention, scores per KV head (or one head), and no bias other than one
    ``fm.key_bias`` per KV head (or one head)."""
    from ..bias import KeyBias
    from ..dma import TopKBlocks

    if not ENABLED or type(mask) is not TopKBlocks or mask.among is not None or softcap is not None:
        return False
    if mask.block_size != 128 or layout.q_len != layout.kv_len or mask.scores.shape[1] not in (1, k.shape[1]):
        return False
    return bias is None or (isinstance(bias, KeyBias) and bias.t.shape[1] in (1, k.shape[1]))


def plan(rank: torch.Tensor, threshold: torch.Tensor, k: int, serve: int) -> dict[str, torch.Tensor]:
    """The layout for a block selection (``rank``, ``threshold`` ``[R, nb]``, see
    ``TopKBlocks.block_selection``).

    Returns ``source`` ``[R, E]`` (the key block each copy slot holds; ``nb - 1`` when unused) and
    the block maps ``any_``, ``all_`` ``[R, nb, nb + E]`` over the layout.
    """
    rows, nb = rank.shape
    dev = rank.device
    slots = nb * min(k, nb) // serve
    t = torch.arange(nb, device=dev)
    # chosen[r, t, u]: query block t reads past key block u
    chosen = (t[None, :] < t[:, None]) & (rank[:, None, :] <= threshold[:, :, None])
    # the how-many-th reader of block u query block t is, and so which copy of u it reads
    copy = (chosen.cumsum(1, dtype=torch.int32) - 1) // serve
    readers = chosen.sum(1, dtype=torch.int32)  # [R, nb]
    extra = torch.clamp((readers + serve - 1) // serve - 1, min=0)
    first = extra.cumsum(-1, dtype=torch.int32) - extra  # the first copy slot of each block
    slot = nb + first[:, None, :] + copy - 1  # layout block of copies 1, 2, ...
    where = torch.where(copy == 0, t.to(torch.int32), slot)  # (t broadcasts as the key block u)
    where = torch.where(chosen, where, nb + slots)  # not read: a dump column, cut below
    full = torch.zeros(rows, nb, nb + slots + 1, dtype=torch.bool, device=dev)
    full.scatter_(-1, where.long(), True)
    full = full[..., : nb + slots]
    diagonal = torch.zeros_like(full)
    diagonal[:, t, t] = True
    # copy slot s holds block u where first[u] <= s < first[u] + extra[u]
    ends = (first + extra).contiguous()
    slot_ids = torch.arange(slots, device=dev, dtype=torch.int32).expand(rows, slots).contiguous()
    source = torch.searchsorted(ends, slot_ids, right=True)
    return {"source": torch.clamp(source, max=nb - 1), "any_": full | diagonal, "all_": full}


def _layout_tensors(scores: torch.Tensor, key: tuple) -> tuple[torch.Tensor, ...]:
    """All int32: the key each layout entry beyond the ``nb`` blocks copies (``[B, Hs, E · 128]``),
    the full-block map ``[B, Hs, nb, nb + E]`` and the eight BlockMask index tensors over the layout."""
    from ..dma import TopKBlocks

    k, layout, serve = key
    n = layout.kv_len
    mask = TopKBlocks(scores, k)
    sel = mask.block_selection(layout)  # [2, B, Hs, nb]
    _, B, hs, nb = sel.shape
    p = plan(sel[0].reshape(B * hs, nb), sel[1].reshape(B * hs, nb), k, serve)
    slots = p["source"].shape[-1]
    within = torch.arange(128, device=scores.device)
    index = torch.clamp(p["source"][..., None] * 128 + within, max=n - 1).view(B, hs, slots * 128)
    any_ = p["any_"].view(B, hs, nb, nb + slots)
    all_ = p["all_"].view(B, hs, nb, nb + slots)
    block_tensors = _block_tensors(any_, all_)
    repeat = layout.heads // hs if hs > 1 else 1  # one score head stays one BlockMask head (broadcast)
    if repeat > 1:
        block_tensors = [t.repeat_interleave(repeat, 1) for t in block_tensors]
    return tuple(t.to(torch.int32) for t in (index, all_, *block_tensors))


_graphed_tensors = CudaGraphed(_layout_tensors)


def prepare(mask, layout) -> dict:
    """The layout of a lone ``fm.topk_blocks`` mask, built once per mask object (what a training
    step pays for new scores): ``index`` (the copied keys, ``[B, Hs, E · 128]`` int64) and the
    ``block_mask`` over the layout."""
    return mask.cached(("blocks", SERVE, layout.heads), layout, lambda: _prepare(mask, layout))


def _prepare(mask, layout) -> dict:
    key = (mask.k, layout, SERVE)
    if GRAPHED_BUILD and layout.device.type == "cuda" and not torch.compiler.is_compiling():
        index, full, *block_tensors = _graphed_tensors(mask.scores.detach(), key=key)
    else:
        index, full, *block_tensors = _layout_tensors(mask.scores.detach(), key=key)
    n = layout.kv_len
    m = -(-n // 128) * 128 + index.shape[-1]
    group = layout.heads // full.shape[1]

    def dma_blocks(b, h, q_idx, kv_idx):  # exact on its own; flex evaluates it on the diagonal blocks only
        qb, kb = q_idx // 128, kv_idx // 128
        return (full[b, h // group, qb, kb] > 0) | ((kb == qb) & (kv_idx <= q_idx))

    return {"index": index.long(), "block_mask": block_mask_from_tensors(block_tensors, dma_blocks, n, m, 128)}


def attention(q, k, v, mask, bias, scale: float, layout) -> torch.Tensor:
    """Exact block-selection DMA through the balanced layout (see :func:`applies`). ``[B, Hq, N, Dv]``."""
    from . import key_bias
    from .flex import flex, with_lse

    B, Hkv, n, _ = k.shape
    state = prepare(mask, layout)
    index = state["index"]  # [B|1, Hs, E·128]
    pad = -n % 128

    def lay(x, per_row):  # [B, H, N, ...] -> [B, H, M, ...]: keys, a padding to whole blocks, copies
        idx = index.expand(x.shape[0], x.shape[1], -1)
        if per_row:
            copies = x.gather(2, idx[..., None].expand(-1, -1, -1, x.shape[-1]))
        else:
            copies = x.gather(2, idx)
        parts = [x, x[:, :, -1:].expand(*x.shape[:2], pad, *x.shape[3:])] if pad else [x]
        return torch.cat([*parts, copies], dim=2)

    k_lay, v_lay = lay(k, True), lay(v, True)
    block_mask = state["block_mask"]
    if bias is None:
        return flex(q, k_lay, v_lay, None, block_mask, scale, dynamic=False)
    t = bias.t
    t_lay = lay(t.expand(max(t.shape[0], index.shape[0]), max(t.shape[1], index.shape[1]), n), False)
    if key_bias.applies(bias, None, q, k):  # the bias gradient in closed form, not by atomics
        return key_bias.attention(q, k_lay, v_lay, t_lay, block_mask, scale, with_lse)
    from ..bias import key_term

    term = key_term(t_lay, q.shape[1])

    def key_bias_blocks(score, b, h, q_idx, kv_idx):
        return score + term(b, h, q_idx, kv_idx)

    return flex(q, k_lay, v_lay, key_bias_blocks, block_mask, scale, dynamic=False)
