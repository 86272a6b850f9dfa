"""Independent truths for the tests, written apart from flexmask: dense float64 attention, relative
error, and brute-force top-k selections by plain loops.

Definitions (from the docs): positions are absolute, the queries are the last ``Q`` of the ``KV``
positions; GQA shares each key/value head with ``Hq / Hkv`` consecutive query heads; a softcap
applies before the bias; rows with no kept key give zeros (and no gradient).
"""

from __future__ import annotations

import math

import torch


def ref_attention(q, k, v, *, keep=None, bias=None, scale=None, softcap=None, with_lse=False):
    """Dense float64 attention; ``keep`` bool and ``bias`` float broadcastable to ``[B, Hq, Q, KV]``.
    With ``with_lse``, also the scores' natural-log logsumexp ``[B, Hq, Q]`` (``-inf`` where no key is kept)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if keep is None:
        keep = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    keep = keep.expand(s.shape)
    alive = keep.any(-1, keepdim=True)
    s = torch.where(keep, s, torch.full_like(s, float("-inf")))
    p = torch.softmax(torch.where(alive, s, torch.zeros_like(s)), dim=-1)
    p = torch.where(alive, p, torch.zeros_like(p))
    return (p @ v, torch.logsumexp(s, -1)) if with_lse else p @ v


def dense_attention(q, k, v, keep, bias_keys=None, scale=None):
    """float64 attention with a dense keep map ``[B, Hq|1, Q, KV]`` and a per-key bias ``[B, Hq, KV]``."""
    bias = None if bias_keys is None else bias_keys.double()[:, :, None, :]
    return ref_attention(q, k, v, keep=keep, bias=bias, scale=scale)


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-300) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def heads_to(t: torch.Tensor, hq: int) -> torch.Tensor:
    """Repeat a per-head tensor ``[B, Hs, ...]`` over query-head groups to ``hq`` heads."""
    return t.repeat_interleave(hq // t.shape[1], 1)


def brute_topk(scores: torch.Tensor, k: int, lengths=None, ids=None, valid=None) -> torch.Tensor:
    """Dense ``[B, Hs, N, N]`` keep map of prefix top-k, by sorting the candidates of every query."""
    B, Hs, N = scores.shape
    keep = torch.zeros(B, Hs, N, N, dtype=torch.bool)
    for b in range(B):
        for h in range(Hs):
            s = scores[b, h].tolist()
            for i in range(N):
                cand = [
                    j
                    for j in range(i + 1)
                    if (lengths is None or j < lengths[b])
                    and (ids is None or ids[b][j] == ids[b][i])
                    and (valid is None or bool(valid[b][j]))
                ]
                cand.sort(key=lambda j: (s[j], j), reverse=True)
                for j in cand[:k]:
                    keep[b, h, i, j] = True
    return keep


def brute_topk_blocks(scores: torch.Tensor, k: int, bs: int) -> torch.Tensor:
    """Dense keep map of block top-k: each query block keeps its k best past blocks and its own, causal."""
    B, Hs, N = scores.shape
    nb = -(-N // bs)
    keep = torch.zeros(B, Hs, N, N, dtype=torch.bool)
    for b in range(B):
        for h in range(Hs):
            block_score = [max(scores[b, h, u * bs : (u + 1) * bs].tolist()) for u in range(nb)]
            for t in range(nb):
                past = sorted(range(t), key=lambda u: (block_score[u], u), reverse=True)[:k]
                for i in range(t * bs, min(N, (t + 1) * bs)):
                    for u in past:
                        keep[b, h, i, u * bs : min(N, (u + 1) * bs)] = True
                    keep[b, h, i, t * bs : i + 1] = True
    return keep
