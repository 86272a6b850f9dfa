"""Dynamic Mask Attention: selection, numerics, gradients and the module, against independent references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import flexmask as fm
from flexmask.lowering.prefix_topk import prefix_kth_smallest

from ._reference import brute_topk, brute_topk_blocks, dense_attention, heads_to

# ---------------------------------------------------------------------------------------------
# selection


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 45),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_matches_prefix_topk(n, k, ties, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (2, 2, n), generator=g).float() if ties else torch.randn(2, 2, n, generator=g)
    got = fm.topk(scores, k).to_dense(n, n)
    assert torch.equal(got, brute_topk(scores, k))
    assert torch.equal(got.sum(-1), torch.clamp(torch.arange(1, n + 1), max=k).expand(2, 2, n))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 36), k=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_topk_among_padding_and_documents(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (2, 1, n), generator=g).float()
    lengths = torch.randint(1, n + 1, (2,), generator=g)
    ids = torch.randint(0, 3, (2, n), generator=g).sort(-1).values
    got = fm.topk(scores, k, among=fm.padding(lengths)).to_dense(n, n)
    assert torch.equal(got, brute_topk(scores, k, lengths=lengths.tolist()))
    got = fm.topk(scores, k, among=fm.document(ids) & fm.padding(lengths)).to_dense(n, n)
    assert torch.equal(got, brute_topk(scores, k, lengths=lengths.tolist(), ids=ids.tolist()))
    valid = torch.rand(2, n, generator=g) < 0.7  # any pattern: left padding, holes
    got = fm.topk(scores, k, among=fm.key_mask(valid)).to_dense(n, n)
    assert torch.equal(got, brute_topk(scores, k, valid=valid))
    got = fm.topk(scores, k, among=fm.document(ids) & fm.key_mask(valid)).to_dense(n, n)
    assert torch.equal(got, brute_topk(scores, k, ids=ids.tolist(), valid=valid))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(1, 6), bs=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**31 - 1))
def test_topk_blocks_among_a_key_mask(n, k, bs, seed):
    """Block top-k among ``fm.key_mask(valid)``: a block's score is its best valid key's, blocks with
    no valid key don't compete, and the result keeps valid keys only (per-key and per-block scores)."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(2, n, generator=g) < 0.6
    keys = valid[:, None, None, :]
    per_key = torch.randint(0, 4, (2, 1, n), generator=g).float()
    got = fm.topk_blocks(per_key, k, block_size=bs, among=fm.key_mask(valid)).to_dense(n, n)
    assert torch.equal(got, brute_topk_blocks(per_key.masked_fill(~valid[:, None], float("-inf")), k, bs) & keys)
    nb = -(-n // bs)
    per_block = torch.randint(0, 4, (2, 1, nb), generator=g).float()
    block_valid = F.pad(valid, (0, nb * bs - n)).view(2, nb, bs).any(-1)
    want = per_block.masked_fill(~block_valid[:, None], float("-inf")).repeat_interleave(bs, -1)[..., :n]
    got = fm.topk_blocks(per_block, k, block_size=bs, among=fm.key_mask(valid)).to_dense(n, n)
    assert torch.equal(got, brute_topk_blocks(want, k, bs) & keys)


def test_topk_edge_cases_and_head_broadcast():
    n = 23
    s = torch.randn(1, 2, n)
    assert torch.equal(fm.topk(s, 100).to_dense(n, n), fm.causal().to_dense(n, n, heads=2))  # k >= N
    one = fm.topk(s, 1).to_dense(n, n)[0]
    best = [max(range(i + 1), key=lambda j, h=h: (s[0, h, j].item(), j)) for h in range(2) for i in range(n)]
    assert one.reshape(2 * n, n).float().argmax(-1).tolist() == best
    # constant scores: ties to the later key = sliding window
    assert torch.equal(fm.topk(torch.zeros(1, 1, n), 5).to_dense(n, n), fm.sliding_window(5).to_dense(n, n))
    # KV-head scores are shared by each query-head group
    got = fm.topk(s, 4).to_dense(n, n, heads=6)
    assert torch.equal(got, heads_to(brute_topk(s, 4), 6))
    # queries as the last positions of the keys
    assert torch.equal(fm.topk(s, 4).to_dense(7, n), brute_topk(s, 4)[:, :, -7:])


def test_topk_blocks_matches_reference():
    torch.manual_seed(3)
    for n, k, bs in [(100, 2, 16), (64, 1, 8), (37, 3, 8), (50, 10, 16)]:
        s = torch.randn(2, 2, n)
        got = fm.topk_blocks(s, k, block_size=bs).to_dense(n, n)
        assert torch.equal(got, brute_topk_blocks(s, k, bs)), (n, k, bs)
        # one score per block gives the same selection as the per-key max
        per_block = torch.nn.functional.pad(s, (0, -n % bs), value=float("-inf")).view(2, 2, -1, bs).amax(-1)
        assert torch.equal(fm.topk_blocks(per_block, k, block_size=bs).to_dense(n, n), got)


def test_prefix_kth_smallest_matches_sorting():
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 1), (5, 2), (64, 7), (130, 130), (257, 31)]:
        values = torch.stack([torch.randperm(n, generator=g) for _ in range(3)])
        got = prefix_kth_smallest(values, k)
        for r in range(3):
            for i in range(n):
                prefix = sorted(values[r, : i + 1].tolist())
                assert got[r, i].item() == (prefix[k - 1] if i + 1 >= k else n)


@pytest.mark.parametrize("content", ["token", "block"])
def test_dma_block_mask_consistent_with_dense(content):
    torch.manual_seed(1)
    n, q_len, bs = 300, 170, 32
    s = torch.randn(2, 2, n)
    m = fm.topk(s, 40) if content == "token" else fm.topk_blocks(s, 3, block_size=bs)
    m = m & fm.padding(torch.tensor([n, 250]))
    dense = m.to_dense(q_len, n, heads=4)
    bm = m.block_mask(q_len, n, heads=4, block_size=bs)
    nq, nk = -(-q_len // bs), -(-n // bs)

    def dense_blocks(num, idx):
        out = torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool)
        for index in torch.cartesian_prod(*[torch.arange(d) for d in idx.shape[:-1]]):
            b, h, r = index.tolist()
            out[b, h, r, idx[b, h, r, : num[b, h, r]].long()] = True
        return out.expand(2, 4, nq, nk)

    partial = dense_blocks(bm.kv_num_blocks, bm.kv_indices)
    full = dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices)
    for qb in range(nq):
        for kb in range(nk):
            tile = dense[:, :, qb * bs : (qb + 1) * bs, kb * bs : (kb + 1) * bs]
            assert bool(tile.flatten(2).any(-1).le(partial[:, :, qb, kb] | full[:, :, qb, kb]).all())
            assert bool(tile.flatten(2).all(-1).ge(full[:, :, qb, kb]).all())


# ---------------------------------------------------------------------------------------------
# attention numerics and gradients


@pytest.mark.parametrize("content", ["token", "block"])
@pytest.mark.parametrize("score_heads", ["kv", "q"])
def test_dma_attention_matches_dense_reference(content, score_heads):
    torch.manual_seed(5)
    B, Hq, Hkv, n, D, w = 2, 4, 2, 150, 8, 24
    q = torch.randn(B, Hq, n, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, n, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, n, D, dtype=torch.float64, requires_grad=True)
    s = torch.randn(B, Hkv if score_heads == "kv" else Hq, n, dtype=torch.float64, requires_grad=True)
    if content == "token":
        mask, keep = fm.topk(s, w), heads_to(brute_topk(s.detach(), w), Hq)
    else:
        mask, keep = fm.topk_blocks(s, 2, block_size=16), heads_to(brute_topk_blocks(s.detach(), 2, 16), Hq)
    out = fm.attention(q, k, v, mask=mask, bias=fm.key_bias(s))
    ref = dense_attention(q, k, v, keep, heads_to(s, Hq))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, s), g)
    want = torch.autograd.grad(ref, (q, k, v, s), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dma_float32_padding_rows():
    torch.manual_seed(6)
    B, H, n, D = 2, 2, 70, 16
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    s = torch.randn(B, H, n)
    lengths = torch.tensor([70, 41])
    out = fm.attention(q, k, v, mask=fm.topk(s, 9, among=fm.padding(lengths)), bias=fm.key_bias(s))
    keep = brute_topk(s, 9, lengths=lengths.tolist())
    torch.testing.assert_close(out, dense_attention(q, k, v, keep, s).float(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the module


def module_parts(layer: fm.DynamicMaskAttention, x: torch.Tensor):
    """q, k, v (with rotary) and the per-key scores, recomputed from the layer's parameters."""
    from flexmask.dma import dynamic_bias
    from flexmask.rotary import apply_rotary

    B, n, _ = x.shape
    d = layer.head_dim

    def heads(t):
        return t.view(B, n, -1, d).transpose(1, 2)

    pos = torch.arange(n).expand(B, n)
    q = apply_rotary(heads(layer.q_proj(x)), pos, layer.rope_theta)
    k = apply_rotary(heads(layer.k_proj(x)), pos, layer.rope_theta)
    v = heads(layer.v_proj(x))
    return q, k, v, dynamic_bias(v, layer.dt_proj, layer.A, layer.bias_form)


@pytest.mark.parametrize("form", ["exp", "linear"])
@pytest.mark.parametrize("bias_heads", ["kv", "q"])
def test_module_equals_composable_form(form, bias_heads):
    torch.manual_seed(7)
    layer = fm.DynamicMaskAttention(32, 4, 2, keep_window=6, bias_form=form, bias_heads=bias_heads).double()
    with torch.no_grad():
        layer.A.normal_()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    q, k, v, s = module_parts(layer, x)
    out = fm.attention(q, k, v, mask=fm.topk(s, 6), bias=fm.key_bias(s))
    expected = layer.o_proj(out.transpose(1, 2).reshape(2, 19, -1))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    # and the composable form against the dense reference
    keep = heads_to(brute_topk(s.detach(), 6), 4)
    torch.testing.assert_close(out, dense_attention(q, k, v, keep, heads_to(s, 4)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("selection", ["token", "block"])
def test_module_with_any_padding_equals_the_dense_reference(selection):
    """``attention_mask`` in any pattern (left padding, right padding, holes): the top-k ranks real
    keys only and padded keys are never attended to; float64 against a dense reference."""
    torch.manual_seed(11)
    n = 23
    layer = fm.DynamicMaskAttention(32, 4, 2, keep_window=8, selection=selection, block_size=4).double()
    with torch.no_grad():
        layer.A.normal_()
    x = torch.randn(3, n, 32, dtype=torch.float64)
    am = torch.ones(3, n, dtype=torch.long)
    am[0, :6] = 0  # left padding
    am[1, 17:] = 0  # right padding
    am[2, 3:20:4] = 0  # holes
    q, k, v, s = module_parts(layer, x)
    real = am.bool()
    if selection == "token":
        keep = brute_topk(s.detach(), 8, valid=real)
    else:  # 8 // 4 = 2 past blocks, by their best real key
        keep = brute_topk_blocks(s.detach().masked_fill(~real[:, None], float("-inf")), 2, 4)
    keep = heads_to(keep & real[:, None, None, :], 4)
    out = dense_attention(q, k, v, keep, heads_to(s, 4))
    expected = layer.o_proj(out.transpose(1, 2).reshape(3, n, -1))
    torch.testing.assert_close(layer(x, attention_mask=am), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["exp", "linear"])
def test_zero_gate_is_sliding_window(form):
    torch.manual_seed(8)
    layer = fm.DynamicMaskAttention(32, 4, 2, keep_window=5, bias_form=form).double()
    x = torch.randn(1, 17, 32, dtype=torch.float64)
    q, k, v, _ = module_parts(layer, x)
    window = fm.attention(q, k, v, mask=fm.sliding_window(5))
    expected = layer.o_proj(window.transpose(1, 2).reshape(1, 17, -1))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_module_trains_and_window_covers_all():
    torch.manual_seed(9)
    layer = fm.DynamicMaskAttention(32, 4, 2, keep_window=4, selection="token")
    with torch.no_grad():
        layer.A.fill_(0.5)
    x = torch.randn(2, 21, 32)
    layer(x, attention_mask=torch.tensor([[1] * 21, [1] * 15 + [0] * 6])).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # w >= N: plain causal attention plus the key bias
    big = fm.DynamicMaskAttention(32, 4, 2, keep_window=64).double()
    with torch.no_grad():
        big.A.normal_()
    xd = x.double()
    q, k, v, s = module_parts(big, xd)
    out = fm.attention(q, k, v, mask=fm.causal(), bias=fm.key_bias(s))
    torch.testing.assert_close(big(xd), big.o_proj(out.transpose(1, 2).reshape(2, 21, -1)))


def test_block_selection_module_runs():
    layer = fm.DynamicMaskAttention(32, 2, keep_window=16, selection="block", block_size=8)
    y = layer(torch.randn(1, 40, 32))
    assert y.shape == (1, 40, 32) and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# compile reuse and errors


def test_new_scores_reuse_the_compiled_kernel():
    from torch._dynamo.utils import counters

    from flexmask.backends.flex import flex

    from ._lowering import Layout, block_mask_for, lower_score

    torch._dynamo.reset()
    counters.clear()
    layout = Layout(1, 2, 64, 64, torch.device("cpu"))
    q = torch.randn(1, 2, 64, 16)
    for step in range(4):
        s = torch.randn(1, 2, 64)
        mask = fm.topk(s, 8 + 0 * step)
        bm = block_mask_for(mask, layout, block_size=16)
        flex(q, q, q, lower_score(fm.key_bias(s), None, layout), bm, 0.25, compile_backend="eager")
    assert counters["stats"]["unique_graphs"] == 1
    # a structural change (another k changes nothing compiled; another mask kind does)
    bm = block_mask_for(fm.topk_blocks(torch.randn(1, 2, 64), 2, block_size=16), layout, block_size=16)
    flex(q, q, q, None, bm, 0.25, compile_backend="eager")
    assert counters["stats"]["unique_graphs"] == 2


def test_dma_errors():
    s = torch.randn(1, 2, 10)
    q = torch.randn(1, 4, 10, 8)
    with pytest.raises(ValueError, match="scores must be a floating tensor"):
        fm.topk(torch.randn(2, 10), 3)
    with pytest.raises(TypeError, match="scores must be a tensor"):
        fm.topk([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="k must be a positive int"):
        fm.topk(s, 0)
    with pytest.raises(ValueError, match="among must be built from"):
        fm.topk(s, 3, among=fm.sliding_window(4))
    with pytest.raises(ValueError, match="scores have length 10, expected kv_len=12"):
        fm.attention(q, torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), mask=fm.topk(s, 3))
    with pytest.raises(ValueError, match="must divide the 4 query heads"):
        fm.topk(torch.randn(1, 3, 10), 3).to_dense(10, 10, heads=4)
    with pytest.raises(ValueError, match="contiguous"):
        fm.topk(s, 3, among=fm.document(torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2, 2, 2]]))).to_dense(10, 10)
    with pytest.raises(ValueError, match="one per block of 4"):
        fm.topk_blocks(torch.randn(1, 1, 5), 1, block_size=4).to_dense(10, 10)
    layer = fm.DynamicMaskAttention(16, 2, keep_window=4)
    with pytest.raises(ValueError, match=r"attention_mask must be a bool or integer tensor \[batch, seq_len\]"):
        layer(torch.randn(1, 4, 16), attention_mask=torch.tensor([[0.0, 1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"= \[1, 4\], got dtype torch.int64 and shape \(1, 5\)"):
        layer(torch.randn(1, 4, 16), attention_mask=torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must be a tensor"):
        layer(torch.randn(1, 4, 16), attention_mask=[[1, 1, 1, 1]])
    with pytest.raises(ValueError, match="selection must be"):
        fm.DynamicMaskAttention(16, 2, selection="tokens")


# ---------------------------------------------------------------------------------------------
# the key layout behind token top-k on the flex backend


def test_layout_plan_keeps_exactly_the_selected_keys():
    from flexmask.lowering.prefix_topk import interval_ends
    from flexmask.lowering.token_layout import layout_plan as plan

    g = torch.Generator().manual_seed(11)
    for trial, (n, k, block) in enumerate([(1, 1, 8), (37, 5, 8), (200, 17, 16), (300, 40, 32), (129, 128, 16)]):
        rows = 3
        s = torch.randn(rows, n, generator=g) if trial % 2 else torch.randint(0, 3, (rows, n), generator=g).float()
        ends = interval_ends(s, k)
        p = plan(ends, block, k)
        m = p["length"]
        orig, lo, hi = p["orig"], p["serve_lo"], p["serve_hi"]
        qi = torch.arange(n)[:, None]
        valid = (
            ((qi // block)[None] >= lo[:, None])
            & ((qi // block)[None] < hi[:, None])
            & (orig[:, None] <= qi[None])
            & (qi[None] < ends.gather(1, orig)[:, None])
        )  # [rows, n, m]: layout entry x serves query i
        count = torch.zeros(rows, n, n, dtype=torch.long)
        count.scatter_add_(2, orig[:, None].expand(rows, n, m), valid.long())
        keep = brute_topk(s[:, None], k)[:, 0]
        assert torch.equal(count, keep.long()), (n, k, block)  # every kept key exactly once
        nq, nkb = -(-n // block), -(-m // block)
        padded = torch.nn.functional.pad(valid, (0, nkb * block - m, 0, nq * block - n))
        touched = padded.view(rows, nq, block, nkb, block).any(-1).any(-2)
        padded_all = torch.nn.functional.pad(valid, (0, nkb * block - m, 0, nq * block - n), value=True)
        everywhere = padded_all.view(rows, nq, block, nkb, block).all(-1).all(-2)
        assert bool((touched <= p["any_"]).all()) and bool((p["all_"] <= everywhere).all())


@pytest.mark.parametrize("hs", [2, 1])
def test_layout_attention_matches_reference(monkeypatch, hs):
    from torch.nn.attention.flex_attention import flex_attention

    from flexmask.backends import flex
    from flexmask.lowering.planner import lower

    from ._lowering import Layout, lowering

    # dynamo without inductor: exercises the layout's BlockMask and mask_mod cheaply on CPU
    eager_flex = torch.compile(flex_attention, backend="eager")
    monkeypatch.setattr(flex, "compiled_flex", lambda backend="inductor", dynamic=False: eager_flex)
    torch.manual_seed(12)
    B, Hq, Hkv, n, D, w = 2, 4, 2, 300, 16, 24
    q, k, v = torch.randn(B, Hq, n, D), torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    s = torch.randn(B, hs, n)  # one score per KV head, or one shared by all heads
    mask, bias = fm.topk(s, w), fm.key_bias(s)
    low = lowering(Layout(B, Hq, n, n, q.device, Hkv), backend="flex")
    assert lower(mask, bias, layout=low.layout, options=low.options, scale=0.25, softcap=None).kind == "token_layout"
    with torch.no_grad():
        out = fm.attention(q, k, v, mask=mask, bias=bias, backend="flex")
    ref = dense_attention(q, k, v, heads_to(brute_topk(s, w), Hq), heads_to(s, Hq)).float()
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("among", [None, "padding", "document"])
def test_topk_for_one_decoding_query_matches_brute_force(among):
    """Q = 1 (decoding) takes a shortcut for the interval ends; the kept keys must be exact."""
    g = torch.Generator().manual_seed(21)
    B, H, n, k = 2, 3, 150, 17
    s = torch.randint(0, 4, (B, H, n), generator=g).float()  # many ties
    lengths = torch.tensor([150, 90])
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([40, 60, 50]))[None].expand(B, n)
    kw = {"lengths": lengths} if among == "padding" else {"ids": ids} if among == "document" else {}
    m = {"padding": fm.padding(lengths), "document": fm.document(ids), None: None}[among]
    got = fm.topk(s, k, among=m).to_dense(1, n, batch=B, heads=H)[:, :, 0]
    want = brute_topk(s, k, **kw)[:, :, -1]
    if among is not None:
        want = want & m.to_dense(n, n, batch=B, heads=H)[:, :, -1]
    assert torch.equal(got, want)


@pytest.mark.parametrize("q_start, q_len", [(None, 1000), (128, 384), (640, 360)])
@pytest.mark.parametrize("hs", [1, 2, 4])
def test_topk_blocks_build_function_matches_generic_build(hs, q_start, q_len):
    """The function the CUDA graph replays gives the generic builder's index tensors and selection,
    for self-attention and for a run of its rows from a block boundary (context parallelism)."""
    from flexmask.lowering.blocks import classify, from_block_states
    from flexmask.lowering.selection import _topk_blocks_build

    from ._lowering import Layout, lowering

    torch.manual_seed(11)
    n, k, bs = 1000, 3, 64
    s = torch.randn(2, hs, n)
    layout = Layout(2, 4, q_len, n, torch.device("cpu"), q_start=q_start)
    sel, *tensors = _topk_blocks_build(s, key=(k, bs, layout))
    mask = fm.topk_blocks(s, k, block_size=bs)
    low = lowering(layout)
    generic = from_block_states(*classify(mask, low, bs), mask._mask_mod(low), q_len, n, bs)
    want = (
        generic.kv_num_blocks,
        generic.kv_indices,
        generic.full_kv_num_blocks,
        generic.full_kv_indices,
        generic.q_num_blocks,
        generic.q_indices,
        generic.full_q_num_blocks,
        generic.full_q_indices,
    )
    assert all(t.dtype == torch.int32 for t in (sel, *tensors))
    for got, expected in zip(tensors, want, strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(sel.long(), mask.block_selection(low))


def test_topk_blocks_graphed_build_at_an_offset_keeps_call_local_positions():
    """The graphed builder's BlockMask for a run of query rows (context parallelism's calls) carries the
    mask in call-local query positions, as flex calls it: its mask_mod and its blocks equal the rows
    ``q_start ..`` of the whole keep map. (On CPU the graph's function runs eagerly.)"""
    from ._lowering import Layout, lowering

    torch.manual_seed(12)
    n, k, q_start, q_len = 700, 2, 256, 300
    s = torch.randn(1, 2, n)
    mask = fm.topk_blocks(s, k)
    bm = mask._graphed_block_mask(lowering(Layout(1, 4, q_len, n, torch.device("cpu"), 2, q_start=q_start)))
    want = heads_to(brute_topk_blocks(s, k, 128), 4)[:, :, q_start : q_start + q_len]
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.arange(4).view(1, 4, 1, 1)
    q_idx, kv_idx = torch.arange(q_len).view(1, 1, -1, 1), torch.arange(n).view(1, 1, 1, -1)
    assert torch.equal(bm.mask_mod(b, h, q_idx, kv_idx).expand_as(want), want)
    blocks = bm.to_dense()[..., : -(-q_len // 128), : -(-n // 128)].bool()  # blocks any query keeps a key of
    pad = (0, -n % 128, 0, -q_len % 128)
    held = torch.nn.functional.pad(want, pad).unflatten(2, (-1, 128)).unflatten(-1, (-1, 128)).any(-1).any(-2)
    assert torch.equal(blocks, held)


@pytest.mark.parametrize(
    "B, Hs, n, k, bs, per_block, shared",
    [
        (2, 2, 300, 2, 16, False, False),
        (1, 3, 77, 1, 8, False, False),
        (2, 1, 129, 3, 32, True, False),
        (1, 2, 200, 20, 16, False, False),
        (3, 2, 150, 2, 16, False, True),
    ],
)
def test_topk_blocks_interval_ends_are_the_mask(B, Hs, n, k, bs, per_block, shared):
    """``fm.topk_blocks``'s interval ends (what the in-place token kernels read for it on Hopper): the
    rule ``j <= i < e_j`` is the mask, against a block-by-block brute force, with ties and a last
    partial block, scores shared by the batch (``shared``); and the kernels' list bound
    (``_token_keep`` keys per query) holds."""
    from ._lowering import Layout, lowering

    g = torch.Generator().manual_seed(n + k)
    s = torch.randint(0, 4, (1 if shared else B, Hs, -(-n // bs) if per_block else n), generator=g).float()  # ties
    mask = fm.topk_blocks(s, k, block_size=bs)
    ends = mask._token_ends(lowering(Layout(B, 2 * Hs, n, n, torch.device("cpu"), Hs)))
    assert ends.shape == (B, Hs, n) and ends.dtype == torch.int32
    i = torch.arange(n)
    rule = (i[None, :] <= i[:, None]) & (i[:, None] < ends[:, :, None, :])  # [B, Hs, queries, keys]
    per_key = (s.repeat_interleave(bs, -1)[..., :n] if per_block else s).expand(B, -1, -1)
    assert torch.equal(rule, brute_topk_blocks(per_key, k, bs))
    assert torch.equal(rule, mask.to_dense(n, n, batch=B, heads=Hs))
    assert int(rule.sum(-1).max()) <= mask._token_keep()


@pytest.mark.parametrize("among", ["padding", "document", "key_mask", "document&padding"])
def test_topk_blocks_interval_ends_among_are_the_mask(among):
    """With ``among`` (padding, packed documents, a key mask; documents restrict the result, not the
    ranking) the folded interval ends are still the whole mask, against ``to_dense``."""
    from ._lowering import Layout, lowering

    g = torch.Generator().manual_seed(len(among))
    B, Hs, n, k, bs = 2, 2, 203, 3, 16
    s = torch.randint(0, 4, (B, Hs, n), generator=g).float()
    lengths = torch.tensor([203, 150])
    ids = torch.cat([torch.zeros(B, 70), torch.ones(B, 90), torch.full((B, n - 160), 2.0)], -1).long()
    valid = torch.rand(B, n, generator=g) > 0.3
    parts = {"padding": fm.padding(lengths), "document": fm.document(ids), "key_mask": fm.key_mask(valid)}
    masks = [parts[name] for name in among.split("&")]
    mask = fm.topk_blocks(s, k, block_size=bs, among=masks[0] if len(masks) == 1 else masks[0] & masks[1])
    ends = mask._token_ends(lowering(Layout(B, 2 * Hs, n, n, torch.device("cpu"), Hs)))
    i = torch.arange(n)
    rule = (i[None, :] <= i[:, None]) & (i[:, None] < ends[:, :, None, :])
    assert torch.equal(rule, mask.to_dense(n, n, batch=B, heads=Hs))
    assert int(rule.sum(-1).max()) <= mask._token_keep()
