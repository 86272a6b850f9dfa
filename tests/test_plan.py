"""One plan, no hidden state: the planner's choices, the one cache and its contract, options, and
regressions of results that once depended on state kept between calls (each against float64 truths)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexmask as fm
from flexmask.lowering import cache
from flexmask.lowering.planner import lower

from ._lowering import Layout, block_mask_for, lowering
from ._reference import brute_topk, brute_topk_blocks, ref_attention, rel_err


def qkv(gen, B=2, Hq=4, Hkv=2, Q=50, KV=50, D=8):
    return (
        torch.randn(B, Hq, Q, D, generator=gen, dtype=torch.float64),
        torch.randn(B, Hkv, KV, D, generator=gen, dtype=torch.float64),
        torch.randn(B, Hkv, KV, D, generator=gen, dtype=torch.float64),
    )


def grid(B, H, Q, KV, offset=0):
    return (
        torch.arange(B).view(-1, 1, 1, 1),
        torch.arange(H).view(1, -1, 1, 1),
        torch.arange(offset, offset + Q).view(1, 1, -1, 1),
        torch.arange(KV).view(1, 1, 1, -1),
    )


def plan_kind(mask, bias=None, *, n=64, device="cpu", softcap=None, **options):
    low = lowering(Layout(1, 4, n, n, torch.device(device), 2), backend="flex", **options)
    return lower(mask, bias, layout=low.layout, options=low.options, scale=0.5, softcap=softcap).kind


# ---------------------------------------------------------------------------------------------
# the planner chooses from what masks offer, not from their types


def test_planner_choices(gen):
    s = torch.randn(1, 2, 64, generator=gen)
    assert plan_kind(fm.topk(s, 8), fm.key_bias(s)) == "token_layout"
    assert plan_kind(fm.topk(s, 8)) == "token_layout"
    assert plan_kind(fm.topk(s, 8), fm.key_bias(s), token_layout=False) == "flex"
    assert plan_kind(fm.topk(s, 8), fm.key_bias(s), softcap=5.0) == "flex"
    assert plan_kind(fm.topk(s, 8) & fm.causal()) == "token_layout"  # causal() adds nothing to a top-k
    assert plan_kind(fm.causal() & fm.topk(s, 8), fm.key_bias(s)) == "token_layout"
    assert plan_kind(fm.topk(s, 8) & fm.sliding_window(16)) == "flex"  # only a lone topk offers the layout
    assert plan_kind(fm.topk(s, 8, among=fm.padding(torch.tensor([60])))) == "flex"
    assert plan_kind(fm.topk(s, 8), fm.alibi(4)) == "flex"
    assert plan_kind(fm.causal()) == "flex"
    low = lowering(Layout(1, 4, 64, 64, torch.device("cpu"), 2))  # backend "auto" on CPU
    assert lower(fm.causal(), None, layout=low.layout, options=low.options, scale=1.0, softcap=None).kind == "reference"


def test_causal_is_dropped_only_beside_a_mask_that_implies_it(gen):
    s = torch.randn(1, 2, 64, generator=gen)
    top, blocks, causal = fm.topk(s, 8), fm.topk_blocks(s, 2, block_size=16), fm.causal()
    assert (causal & top)._essential() is top and (blocks & causal)._essential() is blocks
    window = fm.sliding_window(4)
    for kept in (causal & window, window & top, top & blocks):
        assert kept._essential() is kept
    assert (causal & causal)._essential() is causal  # of factors that imply each other, the first stays
    n = 37  # the plans (of the simplified mask) equal float64 attention under the whole expression's dense mask
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    sc = torch.randn(1, 2, n, generator=gen, dtype=torch.float64)
    for mask in (fm.causal() & fm.topk(sc, 5), fm.topk_blocks(sc, 1, block_size=8) & fm.causal()):
        keep = mask.to_dense(n, n)  # every factor evaluated elementwise
        assert torch.equal(keep, mask._essential().to_dense(n, n))
        ref = ref_attention(q, k, v, keep=keep)
        assert rel_err(fm.attention(q, k, v, mask=mask, backend="reference"), ref) < 1e-12
        flex = fm.attention(q.float(), k.float(), v.float(), mask=mask, backend="flex")  # (flex on CPU: float32)
        assert rel_err(flex, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# regressions: results that depended on state kept between calls


def test_content_mask_used_at_two_query_lengths(gen):
    """One topk mask used for a decode step (Q = 1), then for the whole sequence, and back."""
    B, H, N, k = 2, 2, 57, 9
    q, kk, v = qkv(gen, B=B, Hq=H, Hkv=H, Q=N, KV=N)
    s = torch.randn(B, H, N, generator=gen, dtype=torch.float64)
    for mask, keep in (
        (fm.topk(s, k), brute_topk(s, k)),
        (fm.topk_blocks(s, 1, block_size=8), brute_topk_blocks(s, 1, 8)),
    ):
        for rows in (slice(N - 1, N), slice(0, N), slice(N - 1, N), slice(N - 20, N)):
            out = fm.attention(q[:, :, rows], kk, v, mask=mask)
            torch.testing.assert_close(
                out, ref_attention(q[:, :, rows], kk, v, keep=keep[:, :, rows]), rtol=1e-10, atol=1e-10
            )
        bm = block_mask_for(mask, Layout(B, H, 1, N, torch.device("cpu")), 16)
        assert bm.seq_lengths == (1, N)


def test_topk_mask_mod_is_exact_at_absolute_positions(gen):
    B, H, N = 2, 3, 70
    s = torch.randn(B, H, N, generator=gen)
    s[:, :, ::5] = 0.0  # ties
    m = fm.topk(s, 11)
    dense = m.mask_mod(*grid(B, H, N, N)).expand(B, H, N, N)
    assert torch.equal(dense, brute_topk(s, 11))
    assert torch.equal(dense, m.to_dense(N, N))
    last = m.mask_mod(*grid(B, H, 1, N, offset=N - 1)).expand(B, H, 1, N)  # any query, e.g. decoding
    assert torch.equal(last, dense[:, :, -1:])
    with pytest.raises(ValueError, match="depends on the call's lengths.*block_mask"):
        _ = fm.topk_blocks(s, 2, block_size=8).mask_mod
    bm = fm.topk_blocks(s, 2, block_size=8).block_mask(N, N, block_size=16)  # call-local mask_mod
    assert torch.equal(bm.mask_mod(*grid(B, H, N, N)).expand(B, H, N, N), brute_topk_blocks(s, 2, 8))


@pytest.mark.parametrize("write", ["copy_", "index", "fill_"])
def test_tensors_inside_among_changed_in_place(write, gen):
    B, H, N, k = 2, 2, 40, 6
    q, kk, v = qkv(gen, B=B, Hq=H, Hkv=H, Q=N, KV=N)
    s = torch.randn(B, H, N, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([40, 33])
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([10, 20, 10]))[None].repeat(B, 1)
    mask = fm.topk(s, k, among=fm.padding(lengths) & fm.document(ids))

    def truth():
        keep = brute_topk(s, k, lengths=lengths.tolist(), ids=ids.tolist())
        return keep & (torch.arange(N) < lengths.view(-1, 1, 1, 1)) & (ids[:, None, :, None] == ids[:, None, None, :])

    for step in range(3):
        out = fm.attention(q, kk, v, mask=mask)
        torch.testing.assert_close(out, ref_attention(q, kk, v, keep=truth()), rtol=1e-10, atol=1e-10)
        if write == "copy_":
            lengths.copy_(torch.tensor([30 - step, 25 + step]))
        elif write == "index":
            ids[:, 5:] = ids[:, 5:].clone() + 0  # same values: still a new version
            ids[1, 25:] = 7
        else:
            s[0].fill_(float(step))


def test_float64_scores_are_ranked_in_float64():
    s = torch.zeros(1, 1, 5, dtype=torch.float64)
    s[0, 0, 0], s[0, 0, 3] = 1.0 + 1e-12, 1.0  # equal in float32: the later key would win
    assert fm.topk(s, 1).to_dense(5, 5)[0, 0, 4].tolist() == [True, False, False, False, False]
    big = torch.tensor([[[1e300, 3e300, -1e300, 2e300]]], dtype=torch.float64)  # beyond float32's range
    assert fm.topk(big, 1).to_dense(4, 4)[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 1, 0, 0],
        [0, 1, 0, 0],
    ]


def test_topk_blocks_with_one_score_per_block_among_documents(gen):
    B, H, N, bs = 1, 2, 50, 8
    nb = -(-N // bs)
    per_block = torch.randn(B, H, nb, generator=gen)
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([13, 20, 17]))[None]
    mask = fm.topk_blocks(per_block, 2, block_size=bs, among=fm.document(ids))
    per_key = per_block.repeat_interleave(bs, -1)[..., :N]
    want = brute_topk_blocks(per_key, 2, bs) & (ids[:, None, :, None] == ids[:, None, None, :])
    assert torch.equal(mask.to_dense(N, N), want)


def test_sizes_and_tensors_checked_at_construction():
    huge = 10**20
    for make in (
        lambda: fm.sliding_window(huge),
        lambda: fm.chunked(huge),
        lambda: fm.prefix_lm(huge),
        lambda: fm.topk(torch.zeros(1, 1, 4), huge),
        lambda: fm.topk_blocks(torch.zeros(1, 1, 4), 1, block_size=huge),
    ):
        with pytest.raises(ValueError, match="at most 2,147,483,647"):
            make()
    meta = torch.zeros(1, 8, dtype=torch.long, device="meta")
    for make in (
        lambda: fm.document(meta),
        lambda: fm.padding(meta[:, 0]),
        lambda: fm.topk(meta[None].float(), 2),
        lambda: fm.key_bias(meta[None].float()),
    ):
        with pytest.raises(ValueError, match="meta device"):
            make()
    with pytest.raises(ValueError, match="even head_dim, got 3"):
        fm.DynamicMaskAttention(12, num_heads=4)
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        fm.DynamicMaskAttention(12, num_heads=0)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        fm.DynamicMaskAttention(10, num_heads=4, rope_theta=None)
    with pytest.raises(ValueError, match="returned shape \\(1, 1, 1, 2\\).*does not broadcast"):
        fm.mask(lambda b, h, q, kv: kv[..., :2] <= 1, name="bad").to_dense(4, 4)
    with pytest.raises(TypeError, match="must return a bool tensor.*int64"):
        fm.attention(*qkv(torch.Generator()), mask=fm.mask(lambda b, h, q, kv: kv - q))


def test_errors_name_the_expression_and_the_call():
    q = k = v = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match=r"document ids have length 9[\s\S]*in mask `causal\(\) & document"):
        fm.attention(q, k, v, mask=fm.causal() & fm.document(torch.zeros(1, 9, dtype=torch.long)))


# ---------------------------------------------------------------------------------------------
# the one cache


def test_cache_reuses_and_follows_versions(gen):
    cache.clear()
    layout = Layout(1, 2, 300, 300, torch.device("cpu"))
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 100, 100]))[None]
    m = fm.causal() & fm.document(ids)
    first = block_mask_for(m, layout, 64)
    assert block_mask_for(m, layout, 64) is first  # same tensors, same versions
    assert block_mask_for(fm.causal() & fm.document(ids), layout, 64) is first  # an equal expression
    assert block_mask_for(m, Layout(1, 2, 100, 300, torch.device("cpu")), 64) is not first  # another q_len
    ids[0, 150:] = 5  # in place: a new version
    again = block_mask_for(m, layout, 64)
    assert again is not first
    assert block_mask_for(fm.causal() & fm.document(ids.clone()), layout, 64) is not again  # another tensor


def test_cache_ignores_writes_that_bypass_versions_until_cleared(gen):
    """The documented limit: `.data` writes are not seen; `fm.clear_cache()` makes the next call see them."""
    layout = Layout(1, 1, 256, 256, torch.device("cpu"))
    ids = torch.zeros(1, 256, dtype=torch.long)
    m = fm.document(ids)
    before = block_mask_for(m, layout, 64)
    ids.data[0, 128:] = 1
    assert block_mask_for(m, layout, 64) is before  # stale, as documented
    fm.clear_cache()
    after = block_mask_for(m, layout, 64)
    assert after is not before and int(after.full_kv_num_blocks.sum()) == 8  # two documents of 2 blocks


def test_cache_entries_die_with_their_tensors():
    """A training step's scores die after the step: so does what was lowered from them."""
    cache.clear()
    layout = Layout(1, 1, 256, 256, torch.device("cpu"))
    for _ in range(3):
        s = torch.randn(1, 1, 256)
        block_mask_for(fm.topk(s, 16), layout, 64)
        assert len(cache._lowered) == 1
    del s
    assert len(cache._lowered) == 0


def test_inference_tensors_are_never_cached(gen):
    cache.clear()
    q, k, v = qkv(gen, B=1, Hq=2, Hkv=2, Q=40, KV=40)
    with torch.inference_mode():
        s = torch.randn(1, 2, 40, dtype=torch.float64)
        m = fm.topk(s, 5)
        a = fm.attention(q, k, v, mask=m, bias=fm.key_bias(s))
        s.mul_(-1)  # no version counter inside inference mode
        b = fm.attention(q, k, v, mask=m, bias=fm.key_bias(s))
    assert len(cache._lowered) == 0
    keep = brute_topk(s, 5)
    torch.testing.assert_close(b, ref_attention(q, k, v, keep=keep, bias=s[:, :, None, :]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(a, b)


def test_inference_mode_everywhere(gen):
    x = torch.randn(2, 150, 32, generator=gen)
    for selection in ("token", "block"):
        layer = fm.DynamicMaskAttention(32, 4, 2, keep_window=64, selection=selection, block_size=32)
        with torch.no_grad():
            want = layer(x)
        with torch.inference_mode():
            got = layer(x)
        torch.testing.assert_close(got, want)


def test_expressions_hold_no_state(gen):
    s = torch.randn(2, 2, 60, generator=gen)
    lengths = torch.tensor([60, 41])
    masks = [
        fm.topk(s, 7, among=fm.padding(lengths)),
        fm.topk_blocks(s, 2, block_size=16),
        fm.causal() & fm.document(torch.zeros(2, 60, dtype=torch.long)),
        fm.topk(s, 5),
    ]
    before = [copy.copy(vars(m)) for m in masks]
    q, k, v = qkv(gen, B=2, Hq=4, Hkv=2, Q=60, KV=60)
    for m in masks:
        fm.attention(q, k, v, mask=m)
        fm.attention(q[:, :, -1:], k, v, mask=m)
        m.to_dense(60, 60, heads=4)
        if not isinstance(m, type(fm.topk_blocks(s, 1))):
            m.mask_mod  # noqa: B018
    for m, old in zip(masks, before, strict=True):
        assert vars(m).keys() == old.keys() and all(vars(m)[key] is old[key] for key in old)


# ---------------------------------------------------------------------------------------------
# options


def test_options_context_and_per_call(gen):
    assert fm.options_in_effect() == fm.options_in_effect()
    with fm.options(token_layout=False, split_below=2) as outer:
        assert outer.token_layout is False and fm.options_in_effect().split_below == 2
        with fm.options(split_below=7):
            assert fm.options_in_effect().split_below == 7 and fm.options_in_effect().token_layout is False
        assert fm.options_in_effect().split_below == 2
    assert fm.options_in_effect().token_layout is True
    with pytest.raises(ValueError, match="unknown option 'tokenlayout'"):
        with fm.options(tokenlayout=False):
            pass
    with pytest.raises(ValueError, match="option key_bias_grad must be one of"):
        fm.attention(*qkv(gen), options={"key_bias_grad": "atomics"})
    with pytest.raises(TypeError, match="option cache must be True or False"):
        fm.attention(*qkv(gen), options={"cache": 1})
    q, k, v = qkv(gen, B=1, Hq=2, Hkv=2, Q=30, KV=30)
    ref = fm.attention(q, k, v, mask=fm.causal(), options={"backend": "reference", "cache": False})
    torch.testing.assert_close(ref, ref_attention(q, k, v, keep=fm.causal().to_dense(30, 30)), rtol=1e-12, atol=1e-12)
    ids = torch.zeros(1, 30, dtype=torch.long)
    for enabled in (False, True):
        cache.clear()
        low = lowering(Layout(1, 1, 30, 30, torch.device("cpu"), 1), backend="flex", cache=enabled)
        plan = lower(fm.document(ids), None, layout=low.layout, options=low.options, scale=1.0, softcap=None)
        assert plan.kind == "flex" and len(cache._lowered) == int(enabled)


@pytest.mark.parametrize("with_bias", [False, True])
def test_queries_at_an_offset_equal_the_rows_of_the_whole_call(with_bias, gen):
    """`q_offset` places the queries anywhere in the keys' sequence (a shard of a sequence split over
    devices): every slice of rows equals those rows of the whole call, for every mask kind."""
    B, Hq, Hkv, N = 2, 4, 2, 300
    q, k, v = qkv(gen, B=B, Hq=Hq, Hkv=Hkv, Q=N, KV=N)
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([100, 120, 80]))[None].repeat(B, 1)
    s = torch.randn(B, Hkv, N, generator=gen, dtype=torch.float64)
    bias = (fm.alibi(Hq) + fm.key_bias(s)) if with_bias else None
    masks = [
        fm.causal(),
        fm.causal() & fm.document(ids),
        fm.prefix_lm(50),
        fm.sliding_window(40) | fm.prefix_lm(10),
        fm.topk(s, 30),
        fm.topk_blocks(s, 2, block_size=32),
        fm.document(ids),
        None,
    ]
    for mask in masks:
        whole = fm.attention(q, k, v, mask=mask, bias=bias)
        for a, b in ((0, 100), (100, 230), (230, 300), (7, 8), (299, 300)):
            part = fm.attention(q[:, :, a:b], k, v, mask=mask, bias=bias, q_offset=a)
            torch.testing.assert_close(
                part, whole[:, :, a:b], rtol=1e-12, atol=1e-12, msg=lambda m, mask=mask: f"{mask!r}: {m}"
            )
    with pytest.raises(ValueError, match=r"q_offset must be in \[0, kv_len - q_len\] = \[0, 200\]"):
        fm.attention(q[:, :, :100], k, v, q_offset=201)
    with pytest.raises(TypeError, match="q_offset must be an int"):
        fm.attention(q[:, :, :100], k, v, q_offset=1.0)


def test_map_keys_replaces_every_key_indexed_tensor(gen):
    """`_map_keys` (how shards of a split sequence are gathered) reaches every key-indexed tensor
    of an expression and nothing else; the result equals the expression built from the new tensors."""
    s = torch.randn(2, 2, 10, generator=gen)
    ids = torch.tensor([[0] * 4 + [1] * 6] * 2)
    valid = torch.ones(2, 10, dtype=torch.bool)
    lengths = torch.tensor([10, 7])

    def twice(t):  # stands for "gather the shards": here, the sequence repeated (new document ids)
        return torch.cat([t, t + 100 if t.dtype == torch.long else t], -1)

    mask = (fm.causal() & fm.topk(s, 3, among=fm.padding(lengths) & fm.document(ids))) | ~fm.document(ids)
    mapped = mask._map_keys(twice)
    rebuilt = (fm.causal() & fm.topk(twice(s), 3, among=fm.padding(lengths) & fm.document(twice(ids)))) | ~fm.document(
        twice(ids)
    )
    assert repr(mapped) == repr(rebuilt)
    assert torch.equal(mapped.to_dense(20, 20, heads=2), rebuilt.to_dense(20, 20, heads=2))
    from flexmask.algebra.masks import KeyMask

    assert KeyMask(valid)._map_keys(twice).valid.shape == (2, 20)
    assert fm.sliding_window(3)._map_keys(twice).size == 3
    bias = fm.alibi(2) + fm.key_bias(s) + fm.tensor_bias(torch.zeros(2, 1, 5, 10)) + fm.tensor_bias(torch.zeros(2, 1))
    shapes = [tuple(p.t.shape) for p in bias._map_keys(twice)._parts() if hasattr(p, "t")]
    assert shapes == [(2, 2, 20), (2, 1, 5, 20), (2, 1)]
    assert fm.topk_blocks(s, 1, block_size=2)._map_keys(twice).scores.shape == (2, 2, 20)


def test_counting_scan_outside_inductor_fusion(gen):
    """The cumsum the lowering counts with (``_compat.cumsum``) and the unfused op it becomes under
    compile on torch < 2.13: equal to torch.cumsum, also with a broadcast operand, fullgraph."""
    from flexmask._compat import _unfused_cumsum, cumsum

    rows = torch.rand(3, 1, 517, generator=gen) < 0.4
    heads = torch.rand(1, 4, 517, generator=gen) < 0.7
    for x, dtype in ((rows & heads, torch.int32), ((rows & heads).long(), None)):
        assert torch.equal(cumsum(x, -1, dtype), torch.cumsum(x, -1, dtype=dtype))
    compiled = torch.compile(lambda a, b: _unfused_cumsum(a & b, -1, torch.int32) - 1, fullgraph=True)
    assert torch.equal(compiled(rows, heads), (rows & heads).cumsum(-1, dtype=torch.int32) - 1)
    maps = (rows & heads).int()
    for x in (maps, maps.transpose(0, 2)):  # also a transposed view: the fake kernel's strides must be right
        torch.library.opcheck(_unfused_cumsum, (x, -1, torch.int32))
    long_rows = torch.randint(-3, 4, (2, 3, 5000), generator=gen)  # scanned in chunks, with their carries
    for x, dim, dtype in ((long_rows, -1, torch.int64), (long_rows.transpose(1, 2), 1, torch.int32)):
        got = _unfused_cumsum(x, dim, dtype)
        assert got.is_contiguous() and torch.equal(got, torch.cumsum(x, dim, dtype=dtype))
    torch.library.opcheck(_unfused_cumsum, (long_rows.bool(), -1, torch.int64))


def test_graphed_ends_give_the_interval_ends_of_brute_force_topk_and_compile_as_one_op(gen):
    """``selection.graphed_ends`` (the token ends; a CUDA-graph replay on a GPU, eager here): per-key
    scores broadcast over the batch, ties included, equal a brute-force prefix top-k. Under
    ``torch.compile`` a caller's graph holds the op ``flexmask::graphed_topk_ends`` whole (its fake
    shapes checked by ``opcheck``), and gives the same ends."""
    from flexmask.lowering.selection import _graphed_ends_op, graphed_ends

    scores = torch.randint(0, 5, (1, 2, 77), generator=gen).float()  # many ties
    ends = graphed_ends(scores, 9, 3)
    assert ends.shape == (3, 2, 77) and ends.dtype == torch.int32
    i = torch.arange(77)
    kept = (i[None, None, :, None] >= i[None, None, None, :]) & (i[None, None, :, None] < ends[:, :, None, :].long())
    assert torch.equal(kept, brute_topk(scores.expand(3, 2, 77), 9))
    torch.library.opcheck(_graphed_ends_op, (scores, 9, 3))
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm

    compiled = torch.compile(lambda s: graphed_ends(s * 2, 9, 3) + 1, backend=backend, fullgraph=True)
    assert torch.equal(compiled(scores), ends + 1)
    assert torch.ops.flexmask.graphed_topk_ends.default in targets


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 70),
    k=st.integers(1, 12),
    cuts=st.lists(st.integers(1, 69), max_size=4),
    padded=st.booleans(),
    keyed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_topk_among_documents_and_padding_is_its_folded_interval_rule(n, k, cuts, padded, keyed, seed):
    """What the in-place token kernels read for ``fm.topk(s, k, among=...)``: the interval ends with
    the documents and padding folded in give exactly the mask (ties, packed documents, padding)."""
    from flexmask.lowering.layout import Offers

    g = torch.Generator().manual_seed(seed)
    B, Hs = 2, 2
    s = torch.randint(-2, 3, (B, Hs, n), generator=g).float()  # many ties
    starts = torch.tensor(sorted({c for c in cuts if c < n}), dtype=torch.long)  # where documents begin
    ids = torch.bucketize(torch.arange(n), starts, right=True)
    parts = [fm.document(ids[None].expand(B, n).clone())]
    if padded:
        parts.append(fm.padding(torch.randint(0, n + 1, (B,), generator=g)))
    if keyed:  # any pattern of valid keys, holes included
        parts.append(fm.key_mask(torch.rand(B, n, generator=g) < 0.7))
    among = parts[0]
    for part in parts[1:]:
        among = among & part
    mask = fm.topk(s, k, among=among)
    low = lowering(Layout(B, Hs, n, n, torch.device("cpu"), Hs))
    assert mask._offers(low) & Offers.TOKEN_ENDS and not mask._offers(low) & Offers.TOKEN_LAYOUT
    ends = mask._token_ends(low).long()  # [B, Hs, n]
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    rule = (j <= i) & (i < ends[:, :, None, :])
    assert torch.equal(rule, mask.to_dense(n, n, batch=B, heads=Hs))
