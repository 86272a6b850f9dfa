"""Decoding under content masks: one query gathers the keys its selection may keep (the "gather"
plan). Each result against float64 attention over brute-force selections; ties, NaN, padding,
documents, GQA, and every head layout of the scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flexmask as fm
from flexmask.lowering.planner import lower

from ._lowering import Layout, lowering
from ._reference import brute_topk, brute_topk_blocks, heads_to, ref_attention

B, HQ, HKV, D = 2, 4, 2, 16


def cache(gen, L, dtype=torch.float64):
    q = torch.randn(B, HQ, 1, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def kind(mask, L, **options):
    low = lowering(Layout(B, HQ, 1, L, torch.device("cpu"), HKV), **options)
    return lower(mask, None, layout=low.layout, options=low.options, scale=1.0, softcap=None).kind


@pytest.mark.parametrize("hs", [1, HKV, HQ])
@pytest.mark.parametrize("L", [1, 7, 130, 301])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_decode_topk_matches_brute_force(hs, L, score_dtype, gen):
    q, k, v = cache(gen, L)
    s = torch.randint(-2, 3, (B, hs, L), generator=gen).to(score_dtype)  # many ties
    s[0, 0, : L // 2] *= -0.0  # signed zeros equal zeros: ties, later key first
    if L > 5:
        s[1, -1, 3] = float("nan")  # NaN ranks lowest
    for w in (1, 5, L, L + 3):
        mask = fm.topk(s, w)
        assert kind(mask, L) == "gather"
        keep = heads_to(brute_topk(torch.nan_to_num(s.double(), nan=float("-inf")), w), HQ)[:, :, -1:]
        for bias, dense in ((None, None), (fm.key_bias(s.double()), heads_to(s.double(), HQ)[:, :, None, :])):
            if dense is not None:
                dense = torch.nan_to_num(dense, nan=0.0)
                bias = fm.key_bias(torch.nan_to_num(s.double(), nan=0.0))
            out = fm.attention(q, k, v, mask=mask, bias=bias)
            torch.testing.assert_close(out, ref_attention(q, k, v, keep=keep, bias=dense), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("L", [20, 128, 333])
def test_decode_topk_blocks_matches_brute_force(per_block, L, gen):
    q, k, v = cache(gen, L)
    bs = 32
    nb = -(-L // bs)
    s = torch.randint(0, 4, (B, HKV, nb if per_block else L), generator=gen).float()
    per_key = s.repeat_interleave(bs, -1)[..., :L] if per_block else s
    for blocks in (1, 3, 20):
        mask = fm.topk_blocks(s, blocks, block_size=bs)
        keep = heads_to(brute_topk_blocks(per_key, blocks, bs), HQ)[:, :, -1:]
        out = fm.attention(q, k, v, mask=mask, bias=fm.alibi(HQ))
        alibi = fm.alibi(HQ).slopes().double().view(HQ, 1, 1) * (torch.arange(L) - (L - 1)).double()
        torch.testing.assert_close(out, ref_attention(q, k, v, keep=keep, bias=alibi[None]), rtol=1e-12, atol=1e-12)


def test_decode_among_padding_and_documents_and_other_factors(gen):
    L = 260
    q, k, v = cache(gen, L)
    s = torch.randn(B, HKV, L, generator=gen)
    lengths = torch.tensor([260, 201])
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([90, 100, 70]))[None].repeat(B, 1)
    i, j = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    same_doc = ids[:, None, :, None] == ids[:, None, None, :]
    valid = j < lengths.view(-1, 1, 1, 1)
    keys = torch.rand(B, L, generator=gen) < 0.6  # a key mask with holes
    keys[0, :50] = False  # and left padding
    cases = [
        (fm.topk(s, 40, among=fm.padding(lengths)), brute_topk(s, 40, lengths=lengths.tolist()) & valid),
        (fm.topk(s, 40, among=fm.document(ids)), brute_topk(s, 40, ids=ids.tolist()) & same_doc),
        (fm.topk(s, 40, among=fm.key_mask(keys)), brute_topk(s, 40, valid=keys) & keys[:, None, None, :]),
        (  # blocks of 32 among a key mask: a block's score is its best valid key's; only valid keys kept
            fm.topk_blocks(s, 3, block_size=32, among=fm.key_mask(keys)),
            brute_topk_blocks(s.masked_fill(~keys[:, None], float("-inf")), 3, 32) & keys[:, None, None, :],
        ),
        (fm.sliding_window(100) & fm.topk(s, 40), brute_topk(s, 40) & (j > i - 100)),
        (fm.topk(s, 40) & fm.prefix_lm(10) & ~fm.chunked(37), brute_topk(s, 40) & (i // 37 != j // 37)),
    ]
    for mask, keep in cases:
        assert kind(mask, L) == "gather"
        out = fm.attention(q, k, v, mask=mask, softcap=3.0)
        want = ref_attention(q, k, v, keep=heads_to(keep, HQ)[:, :, -1:], softcap=3.0)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # a content mask under `|` is not a factor: the query may keep keys outside its selection
    assert kind(fm.topk(s, 40) | fm.causal(), L) == "reference"
    assert kind(fm.topk(s, 40), L, gather_decode=False) == "reference"
    assert kind(fm.topk(s, 40), L, backend="reference") == "reference"


@pytest.mark.parametrize("content", ["token", "block", "token-carried"])
def test_decode_gather_traces_as_one_graph(content, gen):
    """Fixed shapes, no host synchronisation: the whole decode step traces into one graph (with the
    kept keys carried, their update too, at a query position given as a tensor)."""
    L = 200
    q, k, v = cache(gen, L, dtype=torch.float32)
    select = (lambda s: fm.topk(s, 16)) if content != "block" else (lambda s: fm.topk_blocks(s, 2, block_size=32))
    t = torch.tensor([L - 1])
    held = fm.topk(torch.randn(B, HKV, L, generator=gen), 16).keep(L - 2)

    def step(q, k, v, s):
        if content == "token-carried":
            kept = fm.topk(s, 16).keep(t, previous=held)
            return fm.attention(q, k, v, mask=fm.topk(s, 16, kept=kept), bias=fm.key_bias(s), q_offset=t)
        return fm.attention(q, k, v, mask=select(s), bias=fm.key_bias(s))

    s = torch.randn(B, HKV, L, generator=gen)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(step)(q, k, v, s)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), [str(r.reason) for r in explain.break_reasons]
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, s), step(q, k, v, s))
    torch._dynamo.reset()


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float64])
def test_decode_a_query_before_the_last_key(score_dtype, gen):
    """A static KV cache holds empty slots after the query: one query at position p (q_offset=p)
    gathers what the whole call's row p keeps."""
    L = 130
    q, k, v = cache(gen, L)
    qs = torch.randn(B, HQ, L, D, generator=gen, dtype=torch.float64)
    s = torch.randint(0, 4, (B, HKV, L), generator=gen).to(score_dtype)
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 50, 40]))[None].repeat(B, 1)
    masks = [
        fm.topk(s, 9),
        fm.topk(s, 9, among=fm.document(ids)),
        fm.topk_blocks(s, 2, block_size=16),
        fm.causal() & fm.topk(s, 200),
    ]
    for mask in masks:
        whole = fm.attention(qs, k, v, mask=mask)
        for p in (0, 5, 39, 40, 77, 129):
            assert kind(mask, L) == "gather"
            one = fm.attention(qs[:, :, p : p + 1], k, v, mask=mask, q_offset=p)
            torch.testing.assert_close(one, whole[:, :, p : p + 1], rtol=1e-12, atol=1e-12)


def _kept_set(kept, b, h):
    """The positions in ``kept[b, h]`` (``-1`` for none), each at most once."""
    row = kept[b if kept.shape[0] > 1 else 0, h].tolist()
    assert len(row) == len(set(row) - {-1}) + row.count(-1), row  # no key twice
    return {j for j in row if j >= 0}


@pytest.mark.parametrize("among", [None, "padding", "documents", "key_mask"])
@pytest.mark.parametrize("N, k", [(1, 3), (29, 4), (70, 16), (33, 40)])
def test_keep_step_by_step_matches_brute_force(among, N, k, gen):
    """`TopK.keep(t, previous=...)` goes from one query's kept keys to the next one's in O(k): at every
    position it keeps what a brute-force sort of all candidates keeps (ties: many equal scores)."""
    s = torch.randint(0, 3, (B, HKV, N), generator=gen).float()
    lengths = torch.tensor([N, max(1, N - 7)])
    ids = torch.sort(torch.randint(0, 3, (B, N), generator=gen), -1).values
    keys = torch.rand(B, N, generator=gen) < 0.7
    parts = {
        None: (None, {}),
        "padding": (fm.padding(lengths), dict(lengths=lengths.tolist())),
        "documents": (fm.document(ids), dict(ids=ids.tolist())),
        "key_mask": (fm.key_mask(keys), dict(valid=keys)),
    }
    mask, brute = parts[among]
    want = brute_topk(s, k, **brute)  # [B, Hs, N, N]
    sel = fm.topk(s, k, among=mask)
    kept = None
    for t in range(N):
        query = torch.tensor([t]) if t % 2 else t  # an int or a one-element tensor
        kept = sel.keep(query) if kept is None else sel.keep(query, previous=kept)
        assert kept.shape == (B, HKV, min(k, N))
        for b in range(B):
            for h in range(HKV):
                allowed = {j for j in range(t + 1) if want[b, h, t, j]}
                got = _kept_set(kept, b, h)
                # what keep returns beyond the candidates (other documents, masked keys) the mask removes
                assert got & set(range(t + 1)) >= allowed and not (got - set(range(t + 1))), (t, b, h)
                assert len(got) <= k and (got - allowed) <= _outside(among, b, t, lengths, ids, keys), (t, b, h)
    # a replayed step and a step at position 0 (a stale `previous`) keep the same keys
    if N > 1:
        again = sel.keep(N - 1, previous=kept)
        assert all(_kept_set(again, b, h) == _kept_set(kept, b, h) for b in range(B) for h in range(HKV))
        first = sel.keep(0, previous=kept)
        assert all(_kept_set(first, b, h) == {0} for b in range(B) for h in range(HKV))


def _outside(among, b, t, lengths, ids, keys) -> set[int]:
    """Keys at or before ``t`` that are not candidates of query ``t`` under ``among``."""
    if among == "padding":
        return {j for j in range(t + 1) if j >= lengths[b]}
    if among == "documents":
        return {j for j in range(t + 1) if ids[b, j] != ids[b, t]}
    if among == "key_mask":
        return {j for j in range(t + 1) if not keys[b, j]}
    return set()


@pytest.mark.parametrize("among", [None, "key_mask"])
def test_decode_with_kept_keys_matches_float64(among, gen):
    """Decoding step by step with `fm.topk(..., kept=sel.keep(t, previous=...))` equals the rows of
    float64 attention over a brute-force top-k, at odd lengths, with GQA, batch 2 and ties."""
    L, w = 45, 7
    qs = torch.randn(B, HQ, L, D, generator=gen, dtype=torch.float64)
    _, k, v = cache(gen, L)
    s = torch.randint(0, 4, (B, HKV, L), generator=gen).double()
    keys = torch.rand(B, L, generator=gen) < 0.8
    keys[:, 0] = True
    mask = None if among is None else fm.key_mask(keys)
    keep = heads_to(brute_topk(s, w, valid=None if among is None else keys), HQ)
    want = ref_attention(qs, k, v, keep=keep, bias=heads_to(s, HQ)[:, :, None, :])
    sel = fm.topk(s, w, among=mask)
    kept = sel.keep(9)
    for t in range(10, L):
        kept = sel.keep(torch.tensor([t]), previous=kept)
        step = fm.topk(s, w, among=mask, kept=kept)
        assert kind(step, L) == "gather"
        out = fm.attention(qs[:, :, t : t + 1], k, v, mask=step, bias=fm.key_bias(s), q_offset=torch.tensor([t]))
        torch.testing.assert_close(out, want[:, :, t : t + 1], rtol=1e-12, atol=1e-12)


def test_kept_keys_are_checked(gen):
    s = torch.randn(B, HKV, 20, generator=gen)
    sel = fm.topk(s, 4)
    kept = sel.keep(10)
    with pytest.raises(TypeError, match="kept"):
        fm.topk(s, 4, kept=kept.tolist())
    for bad in (kept.int(), kept[:, :1], torch.zeros(B, HKV, 5, dtype=torch.long), kept[..., :3], kept[0]):
        with pytest.raises(ValueError, match="kept"):
            fm.topk(s, 4, kept=bad)
    with pytest.raises(ValueError, match="batch"):
        fm.attention(*cache(gen, 20)[:1], *cache(gen, 20)[1:], mask=fm.topk(s, 4, kept=kept.repeat(3, 1, 1)))
    for query, error in ((20, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="query"):
            sel.keep(query)
    for query in (torch.tensor([1, 2]), torch.tensor([20]), torch.tensor(-3), torch.tensor([True])):
        with pytest.raises(ValueError, match="query"):
            sel.keep(query)
    assert torch.equal(sel.keep(np.int64(10)), kept)  # an integer of another kind
    with pytest.raises(ValueError, match="previous"):
        sel.keep(11, previous=kept[..., :0])


def test_kept_keys_updated_in_place_are_seen_through_the_plan_cache(gen):
    """One `fm.topk(..., kept=held)` expression reused while `held` is rewritten in place (as
    `fm.hf` does), at int positions (where the plan cache keeps lowered gathers): every step
    equals float64 attention over a brute-force top-k, never a stale gather."""
    L, w = 40, 5
    qs = torch.randn(B, HQ, L, D, generator=gen, dtype=torch.float64)
    _, k, v = cache(gen, L)
    s = torch.randn(B, HKV, L, generator=gen, dtype=torch.float64)
    keep = heads_to(brute_topk(s, w), HQ)
    want = ref_attention(qs, k, v, keep=keep, bias=heads_to(s, HQ)[:, :, None, :])
    sel = fm.topk(s, w)
    held = sel.keep(19)
    mask = fm.topk(s, w, kept=held)
    for t in range(20, L):
        held.copy_(sel.keep(t, previous=held))
        out = fm.attention(qs[:, :, t : t + 1], k, v, mask=mask, bias=fm.key_bias(s), q_offset=t)
        torch.testing.assert_close(out, want[:, :, t : t + 1], rtol=1e-12, atol=1e-12)
