"""DMA on a CUDA GPU: bf16 numerics and gradients vs float64, kernel reuse across new scores."""

from __future__ import annotations

import pytest
import torch

import flexmask as fm

from ._reference import brute_topk_blocks, dense_attention, heads_to, ref_attention, rel_err

pytestmark = pytest.mark.gpu


def interval_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Dense prefix top-k keep map on the GPU via a sort of each prefix (independent of flexmask)."""
    B, H, n = scores.shape
    keep = torch.zeros(B, H, n, n, dtype=torch.bool, device=scores.device)
    pos = torch.arange(n, device=scores.device)
    for i in range(n):
        key = torch.where(pos <= i, scores.double() + pos * 1e-9, torch.full_like(scores.double(), -torch.inf))
        top = key.topk(min(k, i + 1), dim=-1).indices
        keep[:, :, i].scatter_(-1, top, True)
    return keep


def plan_kind(q, k, v, mask, bias, **options) -> str:
    """The plan ``fm.attention(q, k, v, mask=mask, bias=bias, options=options)`` runs."""
    from flexmask import backends
    from flexmask.lowering.planner import lower
    from flexmask.settings import Resolved

    from ._lowering import Layout

    layout = Layout(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.device, k.shape[1])
    opts = backends.choose_kernels(Resolved().merged(options), q, v)
    return lower(mask, bias, layout=layout, options=opts, scale=1.0, softcap=None).kind


@pytest.mark.parametrize("content, token_kernel", [("token", "auto"), ("block", "auto"), ("block", "flex")])
def test_dma_bf16_matches_float64(content, token_kernel):
    """Token and block top-k with a key bias through their default kernels; block top-k also
    through its BlockMask (flex, and the fused backward), which Hopper GPUs leave for the in-place
    token kernels."""
    torch.manual_seed(0)
    B, Hq, Hkv, n, D, w = 1, 4, 2, 1000, 64, 256
    dev = "cuda"
    q = torch.randn(B, Hq, n, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, n, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, n, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    s = torch.randn(B, Hkv, n, device=dev, requires_grad=True)
    if content == "token":
        mask, keep = fm.topk(s, w), interval_keep(s.detach(), w)
    else:
        mask, keep = fm.topk_blocks(s, 2), brute_topk_blocks(s.detach().cpu(), 2, 128).to(dev)
    options = {"token_kernel": token_kernel}
    hopper = torch.cuda.get_device_capability() == (9, 0)
    expected = "token_gather" if content == "token" or (hopper and token_kernel == "auto") else "key_bias"
    assert plan_kind(q, k, v, mask, fm.key_bias(s), **options) == expected
    out = fm.attention(q, k, v, mask=mask, bias=fm.key_bias(s), options=options)
    ref = dense_attention(q, k, v, heads_to(keep, Hq), heads_to(s, Hq))
    assert rel_err(out, ref) < 1e-2
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, s), g)
    want = torch.autograd.grad(ref, (q, k, v, s), g.double())
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 2e-2


def test_new_scores_do_not_recompile_on_gpu():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q = torch.randn(1, 4, 512, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 512, 64, device="cuda", dtype=torch.bfloat16)
    graphs = []
    for _ in range(5):  # token top-k through the layout; first call compiles selection and kernel
        s = torch.randn(1, 2, 512, device="cuda")
        fm.attention(q, k, k, mask=fm.topk(s, 128), bias=fm.key_bias(s))
        graphs.append(counters["stats"]["unique_graphs"])
    for _ in range(3):  # block top-k
        s = torch.randn(1, 2, 512, device="cuda")
        fm.attention(q, k, k, mask=fm.topk_blocks(s, 2), bias=fm.key_bias(s))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1:5] == [graphs[0]] * 4, graphs
    assert graphs[6:] == [graphs[5]] * 2, graphs


def test_module_on_gpu_trains():
    torch.manual_seed(1)
    layer = fm.DynamicMaskAttention(256, 4, 2, keep_window=128).cuda().to(torch.bfloat16)
    with torch.no_grad():
        layer.A.fill_(0.3)
    x = torch.randn(2, 700, 256, device="cuda", dtype=torch.bfloat16)
    layer(x).float().square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_decoding_with_a_growing_cache_compiles_a_bounded_number_of_graphs():
    """Q = 1 against K = 3000 … 3039 cached keys with a fresh top-k mask each step: the flex decoding
    kernel goes dynamic after the second length; nothing else may compile per length."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    q = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
    before = counters["stats"]["unique_graphs"]
    for n in range(3000, 3040):
        k = torch.randn(1, 1, n, 64, device="cuda", dtype=torch.bfloat16)
        s = torch.randn(1, 1, n, device="cuda")
        with torch.no_grad():
            out = fm.attention(q, k, k, mask=fm.topk(s, 256), bias=fm.key_bias(s))
    assert torch.isfinite(out).all()
    assert counters["stats"]["unique_graphs"] - before <= 4


def test_graphed_topk_blocks_build_matches_eager_and_results_never_alias():
    from flexmask.lowering.cache import graph_store
    from flexmask.lowering.planner import lower_block_mask

    from ._lowering import Layout, lowering

    torch.manual_seed(5)
    n, Hq, Hkv = 3000, 4, 2
    layout = Layout(1, Hq, n, n, torch.device("cuda"), Hkv)
    s1, s2 = (torch.randn(1, Hkv, n, device="cuda") for _ in range(2))

    def tensors(bm):
        return [
            bm.kv_num_blocks,
            bm.kv_indices,
            bm.full_kv_num_blocks,
            bm.full_kv_indices,
            bm.q_num_blocks,
            bm.q_indices,
            bm.full_q_num_blocks,
            bm.full_q_indices,
        ]

    def build(s, graphed):
        return lower_block_mask(fm.topk_blocks(s, 3), lowering(layout, graphed_build=graphed, cache=False))

    eager1, eager2 = (tensors(build(s, False)) for s in (s1, s2))
    graphed = [build(s, True) for s in (s1, s2, s1)]
    assert any(entry != "eager" for entry in graph_store().values()), "nothing was captured"
    # each result is its own memory: later replays left the earlier BlockMasks intact
    for bm, want in zip(graphed, (eager1, eager2, eager1), strict=True):
        for got, expected in zip(tensors(bm), want, strict=True):
            assert torch.equal(got, expected)
    # and the attention through a replayed BlockMask is the eager one's
    q = torch.randn(1, Hq, n, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, Hkv, n, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    outs = []
    for graphed_build in (False, True):
        outs.append(
            fm.attention(
                q,
                k,
                v,
                mask=fm.topk_blocks(s2, 3),
                bias=fm.key_bias(s2),
                options={"graphed_build": graphed_build, "cache": False, "token_kernel": "flex"},
            )
        )
    assert torch.equal(outs[0], outs[1])


def test_graphed_topk_blocks_ends_match_eager_and_results_never_alias():
    """Block top-k's interval ends (its route to the token kernels on Hopper) replayed from a CUDA
    graph equal the eager build; a first result survives a second replay."""
    from flexmask.lowering import selection

    from ._lowering import Layout

    key = (3, 128, Layout(2, 4, 1000, 1000, torch.device("cuda"), 2))
    results = []
    for seed in (0, 1):
        s = torch.randn(2, 2, 1000, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        results.append((s, selection.graphed_topk_blocks_ends(s, key=key)[0]))
    for s, ends in results:
        eager = selection.topk_blocks_ends(selection.block_selection(s, 3, 128, key[2]), 128, 1000)
        assert torch.equal(ends, eager)


@pytest.mark.parametrize("kernel", ["flex", "gather"])  # the key layout's build, or the interval ends'
def test_graphed_token_layout_matches_eager_and_results_never_alias(kernel):
    from flexmask.lowering.cache import graph_store

    torch.manual_seed(6)
    n, Hq, Hkv, D, w = 3000, 4, 2, 64, 256
    q = torch.randn(1, Hq, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, Hkv, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    scores = [torch.randn(1, Hkv, n, device="cuda", requires_grad=True) for _ in range(2)]
    g = torch.randn(1, Hq, n, D, device="cuda", dtype=torch.bfloat16)

    def run(s):
        options = {"graphed_build": False, "token_kernel": kernel}
        out = fm.attention(q, k, v, mask=fm.topk(s, w), bias=fm.key_bias(s), options=options)
        return [out, *torch.autograd.grad(out, (q, k, v, s), g)]

    eager = [run(s) for s in scores]
    fm.clear_cache()
    # both forwards first, then both backwards: the first call's layout must survive the second's replay
    graphed = {"token_kernel": kernel}
    outs = [fm.attention(q, k, v, mask=fm.topk(s, w), bias=fm.key_bias(s), options=graphed) for s in scores]
    assert any(entry != "eager" for entry in graph_store().values()), "nothing was captured"
    for out, s, want in zip(outs, scores, eager, strict=True):
        got = [out, *torch.autograd.grad(out, (q, k, v, s), g)]
        assert torch.equal(got[0], want[0])
        for a, b in zip(got[1:], want[1:], strict=True):  # atomics: summation order may differ
            assert rel_err(a, b) < 1e-2


def test_query_side_key_mass_matches_float64_and_the_transposed_pass():
    """The Triton kernel behind block DMA's bias gradient (backends/triton/key_mass.py): Σ_i P_ij Δ_i vs
    a float64 dense sum, and fm.attention's gradients with it vs with the transposed flex pass."""
    import math

    from flexmask.backends.triton import key_mass

    torch.manual_seed(8)
    B, Hq, Hkv, n, D = 2, 4, 2, 1000, 64
    q = torch.randn(B, Hq, n, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, n, D, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(1, Hkv, n, device="cuda")
    mask = fm.topk_blocks(torch.randn(B, Hkv, n, device="cuda"), 3)
    bm = mask.block_mask(n, n, batch=B, heads=Hq, device="cuda")
    scale = D**-0.5
    allowed = mask.to_dense(n, n, batch=B, heads=Hq)
    s = scale * q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)
    s = (s + t.double().repeat_interleave(2, 1)[:, :, None, :]).masked_fill(~allowed, -math.inf)
    lse = s.logsumexp(-1)
    delta = torch.randn(B, Hq, n, device="cuda", dtype=torch.float64)
    want = (torch.exp(s - lse[..., None]) * delta[..., None]).sum(-2)
    got = key_mass.key_mass(q, k, t, lse.float(), delta.float(), bm, scale)
    assert rel_err(got, want) < 1e-2

    v = torch.randn(B, Hkv, n, D, device="cuda", dtype=torch.bfloat16)
    ins = [x.clone().requires_grad_() for x in (q, k, v)] + [torch.randn(B, Hkv, n, device="cuda", requires_grad=True)]
    g = torch.randn(B, Hq, n, D, device="cuda", dtype=torch.bfloat16)
    grads = []
    for choice in ("query_side", "transposed"):
        out = fm.attention(
            *ins[:3],
            mask=fm.topk_blocks(ins[3].detach(), 3),
            bias=fm.key_bias(ins[3]),
            options={"key_bias_grad": choice, "token_kernel": "flex"},  # its BlockMask, also on Hopper
        )
        grads.append(torch.autograd.grad(out, ins, g))
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-2


def bf16_inputs(seed: int, B: int, Hq: int, Hkv: int, rows: int, n: int, D: int, score_batch: int | None = None):
    """``q`` ``[B, Hq, rows, D]``, ``k``, ``v`` ``[B, Hkv, n, D]`` (bf16) and scores ``[score_batch or B, Hkv, n]``
    (float32) on CUDA from ``seed``, all requiring gradients."""
    torch.manual_seed(seed)
    q = torch.randn(B, Hq, rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.randn(score_batch or B, Hkv, n, device="cuda", requires_grad=True)
    return q, k, v, s


def spy_on_fused_backward(monkeypatch) -> list:
    """A list that gets one entry per call of the fused Triton backward."""
    from flexmask.backends.triton import fused_bwd

    calls = []
    real = fused_bwd.backward
    monkeypatch.setattr(fused_bwd, "backward", lambda *a: calls.append(1) or real(*a))
    return calls


def assert_gradients_match(out, ref, inputs) -> None:
    """Every gradient of ``out`` (bf16) within 2e-2 relative of float64 ``ref``'s, for one random ``dO``."""
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, g)
    want = torch.autograd.grad(ref, inputs, g.double())
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("split", [False, True], ids=["one-program-per-key-block", "split-lists"])
def test_fused_backward_matches_float64(monkeypatch, split):
    """The fused Triton backward for block DMA (backends/triton/fused_bwd.py): dq, dk, dv and the key-bias
    gradient vs float64 autograd, GQA, a bias shared over the batch; with each key block's list in
    one program, and split over programs of one entry (float32 atomics)."""
    options = {"key_bias_grad": "fused", "split_below": 10**6 if split else 0, "split_chunk": 1 if split else 16}
    options["token_kernel"] = "flex"  # block top-k over its BlockMask (Hopper would take the token kernels)
    B, Hq, Hkv, n, D = 2, 4, 2, 1000, 64
    q, k, v, s = bf16_inputs(9, B, Hq, Hkv, n, n, D, score_batch=1)
    calls = spy_on_fused_backward(monkeypatch)
    out = fm.attention(q, k, v, mask=fm.topk_blocks(s.detach(), 2), bias=fm.key_bias(s), options=options)
    keep = brute_topk_blocks(s.detach().expand(B, -1, -1).cpu(), 2, 128).to("cuda")
    ref = dense_attention(q, k, v, heads_to(keep, Hq), heads_to(s.expand(B, -1, -1), Hq))
    assert_gradients_match(out, ref, (q, k, v, s))
    assert calls, "the fused backward did not run"


@pytest.mark.parametrize("choice", ["auto", "query_side", "transposed", "flex"])
def test_causal_key_bias_every_gradient_path_matches_float64(monkeypatch, choice):
    """A causal mask's partial blocks are causal too: the planner offers the Triton paths for
    `causal() + key_bias` (DMA with a window larger than the sequence); every choice of
    `key_bias_grad` gives float64's gradients, and "auto" takes the fused backward (whose forward
    runs flex without autograd)."""
    from flexmask.backends import key_bias

    B, Hq, Hkv, n, D = 1, 4, 2, 777, 64
    q, k, v, s = bf16_inputs(10, B, Hq, Hkv, n, n, D)
    calls = spy_on_fused_backward(monkeypatch)
    grad_modes, real_run = [], key_bias.with_lse

    def run(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return real_run(*args, **kwargs)

    monkeypatch.setattr(key_bias, "with_lse", run)
    out = fm.attention(q, k, v, mask=fm.causal(), bias=fm.key_bias(s), options={"key_bias_grad": choice})
    keep = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()[None, None]
    ref = dense_attention(q, k, v, keep, heads_to(s, Hq))
    assert rel_err(out, ref) < 1e-2
    assert_gradients_match(out, ref, (q, k, v, s))
    assert bool(calls) == (choice == "auto")
    forward_mode = grad_modes[:1]  # ("transposed" runs flex once more, without autograd, for the bias gradient)
    assert forward_mode == ([] if choice == "flex" else [choice != "auto"])


@pytest.mark.parametrize("offset, rows", [(128, 256), (256, 744)], ids=["whole-blocks", "to-the-end"])
def test_fused_backward_for_rows_at_an_offset(monkeypatch, offset, rows):
    """Context parallelism's calls: a run of query rows at ``q_offset`` (from a block boundary)
    against every key takes the fused backward too; dq, dk, dv and the key-bias gradient vs float64."""
    B, Hq, Hkv, n, D = 1, 4, 2, 1000, 64
    q, k, v, s = bf16_inputs(11, B, Hq, Hkv, rows, n, D)
    calls = spy_on_fused_backward(monkeypatch)
    out = fm.attention(q, k, v, mask=fm.topk_blocks(s.detach(), 2), bias=fm.key_bias(s), q_offset=offset)
    keep = brute_topk_blocks(s.detach().cpu(), 2, 128).to("cuda")[:, :, offset : offset + rows]
    ref = dense_attention(q, k, v, heads_to(keep, Hq), heads_to(s, Hq))
    assert rel_err(out, ref) < 1e-2
    assert_gradients_match(out, ref, (q, k, v, s))
    assert calls, "the fused backward did not run"


def last_row_keep(s: torch.Tensor, k: int, query: int, lengths=None, ids=None) -> torch.Tensor:
    """``[B, Hs, L]`` keys kept by the query at ``query`` under prefix top-``k``: its candidates
    (at or before it, in its document, before the row's length) sorted by score, then position."""
    B, Hs, L = s.shape
    keep = torch.zeros(B, Hs, L, dtype=torch.bool)
    for b in range(B):
        for h in range(Hs):
            row = s[b, h].tolist()
            cand = [
                j
                for j in range(query + 1)
                if (lengths is None or j < lengths[b]) and (ids is None or ids[b][j] == ids[b][query])
            ]
            cand.sort(key=lambda j: (row[j], j), reverse=True)
            keep[b, h, cand[:k]] = True
    return keep


@pytest.mark.parametrize("L", [1, 7, 301, 5000])
@pytest.mark.parametrize("hs", [1, 2, 4])
def test_decode_token_selection_on_gpu_matches_float64(hs, L):
    """A decoding query under ``fm.topk`` on CUDA (the compiled selection over 64-bit keys): exact
    against float64 attention over a sorted selection; ties, signed zeros, NaN, GQA, batch 2, every
    head layout, caches longer than one top-k block."""
    gen = torch.Generator().manual_seed(1000 * hs + L)
    B, HQ, HKV, D = 2, 4, 2, 16
    q = torch.randn(B, HQ, 1, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    s = torch.randint(-2, 3, (B, hs, L), generator=gen).float()  # many ties
    s[0, 0, : L // 2] *= -0.0
    if L > 5:
        s[1, -1, 3] = float("nan")
    clean = torch.nan_to_num(s.double(), nan=float("-inf"))
    for w in sorted({1, 5, L, L + 3, 2048}):
        keep = heads_to(last_row_keep(clean, w, L - 1), HQ)[:, :, None, :]
        out = fm.attention(q.cuda(), k.cuda(), v.cuda(), mask=fm.topk(s.cuda(), w))
        torch.testing.assert_close(out.cpu(), ref_attention(q, k, v, keep=keep), rtol=1e-12, atol=1e-12)


def test_decode_token_selection_on_gpu_among_documents_and_padding_and_before_the_end():
    gen = torch.Generator().manual_seed(7)
    B, HQ, HKV, D, L = 2, 4, 2, 16, 3001
    q = torch.randn(B, HQ, 1, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    s = torch.randn(B, HKV, L, generator=gen)
    lengths = torch.tensor([L, 2000])
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([900, 1500, 601]))[None].repeat(B, 1)
    cuda = [t.cuda() for t in (q, k, v)]
    cases = [
        (fm.topk(s.cuda(), 400, among=fm.padding(lengths.cuda())), dict(lengths=lengths.tolist())),
        (fm.topk(s.cuda(), 400, among=fm.document(ids.cuda())), dict(ids=ids.tolist())),
        (fm.topk(s.cuda(), 2000, among=fm.document(ids.cuda())), dict(ids=ids.tolist())),  # fewer candidates
    ]
    for mask, among in cases:
        keep = last_row_keep(s.double(), mask.k, L - 1, **among)
        if "lengths" in among:
            keep &= torch.arange(L) < lengths.view(-1, 1, 1)
        want = ref_attention(q, k, v, keep=heads_to(keep, HQ)[:, :, None, :])
        torch.testing.assert_close(fm.attention(*cuda, mask=mask).cpu(), want, rtol=1e-12, atol=1e-12)
    # the query at position 1700 of the cache: keys after it never count
    keep = last_row_keep(s.double(), 300, 1700)
    want = ref_attention(q, k[:, :, :1701], v[:, :, :1701], keep=heads_to(keep, HQ)[:, :, None, :1701])
    out = fm.attention(*cuda, mask=fm.topk(s.cuda(), 300), q_offset=torch.tensor(1700, device="cuda"))
    torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


def test_decode_with_kept_keys_carried_on_gpu_matches_float64():
    """Decoding step by step on CUDA with the kept keys carried (`keep(t, previous=...)`, compiled)
    inside a CUDA graph replayed once per position: each step equals float64 attention over a
    sorted selection of all keys at or before the query (ties, a key mask, GQA, batch 2)."""
    gen = torch.Generator().manual_seed(5)
    B, HQ, HKV, D, L, w, start = 2, 4, 2, 16, 700, 64, 600
    qs = torch.randn(B, HQ, L, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, HKV, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    s = torch.randint(0, 5, (B, HKV, L), generator=gen).float()  # many ties
    valid = torch.rand(B, L, generator=gen) < 0.8
    sel = fm.topk(s.cuda(), w, among=fm.key_mask(valid.cuda()))
    q1, kc, vc = torch.zeros(B, HQ, 1, D, device="cuda", dtype=torch.float64), k.cuda(), v.cuda()
    t = torch.full((1,), start, device="cuda")
    held = sel.keep(start - 1)
    out = torch.zeros_like(q1)

    def step():
        held.copy_(sel.keep(t, previous=held))
        mask = fm.topk(sel.scores, w, among=sel.among, kept=held)
        out.copy_(fm.attention(q1, kc, vc, mask=mask, bias=fm.key_bias(sel.scores), q_offset=t))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles; position `start` twice (a replayed step keeps the same keys)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for pos in range(start, L):  # one replay per position, each going on from the one before
        t.fill_(pos)
        q1.copy_(qs[:, :, pos : pos + 1])
        graph.replay()
        if pos % 7 and pos != L - 1:
            continue
        keep = last_row_keep(torch.where(valid[:, None], s.double(), float("-inf")), w, pos) & valid[:, None]
        bias = heads_to(s.double(), HQ)[:, :, None]
        want = ref_attention(qs[:, :, pos : pos + 1], k, v, keep=heads_to(keep, HQ)[:, :, None, :], bias=bias)
        torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("selection", ["token", "block"])
def test_decode_kernel_matches_float64_on_gpu(selection, monkeypatch):
    """One bf16 decoding query through the Triton decoding kernel (gathered keys; GQA, batch 2, a key
    bias, padding): equal to float64 attention over the same (bf16-rounded) inputs, which takes the
    PyTorch gather path."""
    from flexmask.backends.triton import gather_decode

    calls = []
    real = gather_decode.gathered_decode
    monkeypatch.setattr(gather_decode, "gathered_decode", lambda *args: calls.append(1) or real(*args))
    gen = torch.Generator().manual_seed(11)
    B, HQ, HKV, D, L = 2, 16, 8, 128, 5000
    q, k, v = (torch.randn(B, h, n, D, generator=gen).cuda().bfloat16() for h, n in ((HQ, 1), (HKV, L), (HKV, L)))
    s = torch.randn(B, HKV, L, generator=gen).cuda()
    lengths = torch.tensor([L, 3001], device="cuda")
    if selection == "token":
        mask = fm.topk(s, 2048, among=fm.padding(lengths))
    else:
        mask = fm.topk_blocks(s, 16) & fm.padding(lengths)
    bias = fm.key_bias(s) + fm.alibi(HQ)
    with torch.no_grad():
        got = fm.attention(q, k, v, mask=mask, bias=bias)
        assert len(calls) == 1
        want = fm.attention(q.double(), k.double(), v.double(), mask=mask, bias=bias)
    assert len(calls) == 1  # (float64 runs the PyTorch path)
    assert rel_err(got.double(), want) < 1e-2
