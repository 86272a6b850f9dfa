"""The in-place token top-k kernels (``options={"token_kernel": "gather"}``, experimental) without a
GPU: exactness in Triton's interpreter (run with ``TRITON_INTERPRET=1``), compilation for sm_90."""

from __future__ import annotations

import math

import pytest
import torch

from flexmask.backends.triton import token_gather as tg
from flexmask.lowering.selection import topk_ends

from ._reference import heads_to, ref_attention
from ._triton import compile_for_sm90, compiled, interpreted

CASES = [
    (1, 2, 1, 1, 70, 16),
    (2, 4, 2, 2, 131, 40),
    (1, 4, 2, 4, 97, 100),
    (2, 2, 2, 1, 150, 7),
    (1, 8, 2, 2, 77, 20),  # GQA groups of 4 sharing selection: programs of 2 heads, 2 a KV head
    (1, 6, 1, 1, 45, 9),  # a group of 6: programs of 2 heads
]


def dense(q, k, v, ends, t, scale, lse=False):
    """float64 attention under ``j <= i < ends[j]`` with a per-key bias ``t`` (and with ``lse``, the
    scores' logsumexp)."""
    B, Hq, N, _ = q.shape
    e = heads_to(ends.long(), Hq)[:, :, None, :]
    i, j = torch.arange(N).view(-1, 1), torch.arange(N).view(1, -1)
    bias = None if t is None else heads_to(t.expand(B, -1, -1), Hq)[:, :, None, :]
    return ref_attention(q, k, v, keep=(j <= i) & (i < e), bias=bias, scale=scale, with_lse=lse)


@interpreted
@pytest.mark.parametrize("bias", ["normal", "rising"])
@pytest.mark.parametrize("B,Hq,Hkv,Hs,N,w", CASES)
def test_matches_float64(B, Hq, Hkv, Hs, N, w, bias):
    """Forward and every gradient against float64; a ``rising`` bias (to 200 along the keys) makes
    each row's max grow by far more than its sum can absorb unless the softmax rescales."""
    g = torch.Generator().manual_seed(N + w)
    D = 16
    q = torch.randn(B, Hq, N, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, generator=g, requires_grad=True)
    scores = torch.randint(0, 4, (B, Hs, N), generator=g).float()  # ties
    ends = topk_ends(scores, None, w)
    t = torch.randn(B, Hs, N, generator=g)
    if bias == "rising":
        t += torch.linspace(0, 200, N)
    t.requires_grad_()
    out = tg.token_gather_attention(q, k, v, ends, w, bias=t, block_m=16, block_n=16)
    ref = dense(q, k, v, ends, t, 1 / math.sqrt(D))
    tol = 1e-5 if bias == "normal" else 1e-4  # float32 scores near 200 carry ~1e-5 of rounding
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, t), go)
    want = torch.autograd.grad(ref, (q, k, v, t), go.double())
    for a, b, name in zip(got, want, "qkvt", strict=True):
        err = (a.double() - b).abs().max().item()
        assert err < 10 * tol * (1 + b.abs().max().item()), (name, err)


@interpreted
@pytest.mark.parametrize("bs, block_m", [(16, 16), (8, 32), (32, 16)], ids=["equal", "shorter-blocks", "longer-blocks"])
def test_block_selection_through_the_kernels_matches_float64(bs, block_m):
    """``fm.topk_blocks`` through the kernels, as Hopper runs it: its interval ends, and lists bounded
    by ``_token_keep`` (past blocks and its own) whether a query block is shorter than a selection
    block, as long or longer; output and every gradient against float64 over a block-by-block brute
    force."""
    import flexmask as fm

    from ._lowering import Layout, lowering
    from ._reference import brute_topk_blocks

    g = torch.Generator().manual_seed(bs + block_m)
    B, Hq, Hkv, N, D, k = 2, 4, 2, 141, 16, 3
    q = torch.randn(B, Hq, N, D, generator=g, requires_grad=True)
    key, v = (torch.randn(B, Hkv, N, D, generator=g, requires_grad=True) for _ in range(2))
    t = torch.randn(B, Hkv, N, generator=g, requires_grad=True)
    mask = fm.topk_blocks(t.detach(), k, block_size=bs)
    ends = mask._token_ends(lowering(Layout(B, Hq, N, N, torch.device("cpu"), Hkv)))
    out = tg.token_gather_attention(q, key, v, ends, mask._token_keep(), bias=t, block_m=block_m, block_n=16)
    keep = heads_to(brute_topk_blocks(t.detach(), k, bs), Hq)
    ref = ref_attention(q, key, v, keep=keep, bias=heads_to(t, Hq)[:, :, None, :], scale=1 / math.sqrt(D))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, key, v, t), go)
    want = torch.autograd.grad(ref, (q, key, v, t), go.double())
    for a, b, name in zip(got, want, "qkvt", strict=True):
        assert (a.double() - b).abs().max().item() < 1e-4 * (1 + b.abs().max().item()), name


def test_kept_lists_hold_each_blocks_keys_those_kept_by_all_its_queries_first():
    """The reference layout against the rule itself, query by query: a block's list holds the keys
    some query of it keeps, those kept by all of its queries in front (``counts[..., 0]``)."""
    g = torch.Generator().manual_seed(3)
    n, w, block, cap = 75, 9, 8, 9 + 8
    ends = topk_ends(torch.randint(0, 5, (2, 2, n), generator=g).float(), None, w)
    lists, counts = tg.kept_lists(ends, block, cap)
    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    for r, e in enumerate(ends.reshape(-1, n).long()):
        kept = (j <= i) & (i < e)  # [queries, keys]
        for m in range(-(-n // block)):
            rows = kept[m * block : (m + 1) * block]
            n_full, total = counts[r, m].tolist()
            front, back = lists[r, m, :n_full], lists[r, m, cap - (total - n_full) :]
            assert set(torch.cat([front, back]).tolist()) == set(rows.any(0).nonzero().flatten().tolist())
            assert rows[:, front.long()].all() and not rows[:, back.long()].all(0).any()
            assert torch.equal(front, front.sort().values) and total <= w + block - 1


@interpreted
@pytest.mark.parametrize("n", [300, 256], ids=["partial-last-block", "whole-blocks"])
def test_lists_kernels_equal_reference(n):
    g = torch.Generator().manual_seed(n)
    ends = topk_ends(torch.randn(2, 3, n, generator=g), None, 37).contiguous()
    lists, counts = tg.kept_lists(ends, 32, 37 + 32)
    got_lists, got_counts = tg._build_lists(ends, 37, 32, chunks=(128, 16))  # several chunks per scan
    assert torch.equal(got_counts, counts) and bool((counts[..., 0] > 0).any())
    assert torch.equal(got_lists, lists)


@compiled
@pytest.mark.parametrize("bias", [True, False])
def test_kernels_compile_for_a_gpu(bias):
    ints = dict.fromkeys(("E", "LIST", "CNT"), "*i32")
    halves = dict.fromkeys(("Q", "K", "V"), "*bf16")
    floats = dict.fromkeys(("LSE", "DK", "DV", "DT"), "*fp32")
    sizes = {"sm_scale": "fp32", "N": "i32", "CAP": "i32", "NQB": "i32"}
    c = dict(HQ=16, G=2, HS_DIV=2, T_HEADS_DIV=2, T_BATCH=1, HAS_T=bias, STACK=2, D=128, BM=64, BN=64)
    fwd = {**halves, "T": "*fp32", **ints, "O": "*bf16", "LSE": "*fp32", **sizes}
    bwd = {**halves, "T": "*fp32", **ints, "O": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DQ": "*bf16"}
    bwd = {**bwd, **{name: floats[name] for name in ("DK", "DV", "DT")}, **sizes}
    lists = {**ints, "KEPT": "*i32", "BELOW": "*i32", "N": "i32", "CAP": "i32", "NQB": "i32"}
    scan = {"E": "*i32", "KEPT": "*i32", "BELOW": "*i32", "N": "i32", "NQB": "i32"}
    launch = {"BM": 64, "CHUNK": 1024}
    compile_for_sm90(
        [(tg._ever_kept, scan, {"BM": 64, "CHUNK": 4096}), (tg._lists, lists, launch), (tg._fwd, fwd, c)]
        + [(tg._bwd, bwd, {**c, "T_GRAD": bias})]
    )


@compiled
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "backward,bias,D,BN,G",
    [
        (False, True, 128, 128, 2),
        (False, False, 128, 64, 4),  # groups of 4: two pairs a KV head
        (False, True, 64, 128, 2),
        (True, True, 128, 64, 2),
        (True, False, 128, 64, 4),
        (True, True, 64, 64, 2),
    ],
)
def test_hopper_kernels_compile_for_sm90(backward, bias, D, BN, G, dtype):
    from flexmask.backends.triton import token_hopper as th

    if th.gluon is None:
        pytest.skip("needs Gluon (Triton >= 3.5)")
    halves = ("Q", "K", "V", "O") + (("DO", "DQ") if backward else ())
    floats = ("T", "LSE") + (("DK", "DV", "DT") if backward else ())
    sig = dict.fromkeys(halves, f"*{dtype}") | dict.fromkeys(floats, "*fp32")
    sig |= dict.fromkeys(("E", "LIST", "CNT"), "*i32")
    sig |= dict.fromkeys(("qk_scale", "sm_scale") if backward else ("qk_scale",), "fp32")
    sig |= dict.fromkeys(("N", "CAP", "NQB"), "i32")
    c = dict(HQ=16, G=G, HS_DIV=G, T_HEADS_DIV=G, T_BATCH=1, HAS_T=bias, D=D, BM=64, BN=BN)
    c |= dict(STAGES=2 if backward or BN == 128 else 3) | (dict(T_GRAD=bias) if backward else {})
    compile_for_sm90([(th._bwd if backward else th._fwd, sig, c)], options={"num_warps": 4})


def test_a_gqa_group_is_stacked_when_it_shares_selection_and_bias():
    q, k = torch.empty(1, 16, 8, 16), torch.empty(1, 8, 8, 16)
    shared = torch.empty(1, 8, 8, dtype=torch.int32)
    assert tg._launch_args(q, k, shared, torch.empty(1, 8, 8))["STACK"] == 2
    assert tg._launch_args(q, k, shared, None)["STACK"] == 2
    assert tg._launch_args(q, k, torch.empty(1, 16, 8, dtype=torch.int32), None)["STACK"] == 1  # per query head
    assert tg._launch_args(q, k, shared, torch.empty(1, 16, 8))["STACK"] == 1  # a bias per query head
    k4, shared4 = torch.empty(1, 4, 8, 16), torch.empty(1, 4, 8, dtype=torch.int32)
    assert tg._launch_args(q, k4, shared4, None)["STACK"] == tg.STACK_MOST  # groups of 4
    assert tg._launch_args(q, k4, shared4, None, most=4)["STACK"] == 4
    q12, k2, shared2 = torch.empty(1, 12, 8, 16), torch.empty(1, 2, 8, 16), torch.empty(1, 2, 8, dtype=torch.int32)
    assert tg._launch_args(q12, k2, shared2, None, most=8)["STACK"] == 2  # groups of 6: a power of two divides it
    q3, k1, shared1 = torch.empty(1, 3, 8, 16), torch.empty(1, 1, 8, 16), torch.empty(1, 1, 8, dtype=torch.int32)
    assert tg._launch_args(q3, k1, shared1, None)["STACK"] == 1


@interpreted
def test_custom_ops_trace_under_torch_compile():
    """The kernels are custom ops with fake implementations: ``opcheck``, and a compiled call
    (``fullgraph``) gives the eager output and gradients."""
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, N, D, w = 2, 4, 2, 90, 16, 24
    q, k, v = (torch.randn(B, h, N, D, generator=g, requires_grad=True) for h in (Hq, Hkv, Hkv))
    t = torch.randn(B, Hkv, N, generator=g, requires_grad=True)
    ends = topk_ends(t.detach(), None, w).contiguous()
    torch.library.opcheck(tg._forward, (q, k, v, t, ends, w, 0.25, 16, 16))
    out, lse, lists, counts = tg._forward(q, k, v, t, ends, w, 0.25, 16, 16)
    go = torch.randn_like(out)
    backward_args = (q, k, v, t, ends, lists, counts, out, lse, go, 0.25, 16, 16, True)
    torch.library.opcheck(tg._backward, tuple(x.detach() if torch.is_tensor(x) else x for x in backward_args))

    def layer(q, k, v, t):
        return tg.token_gather_attention(q, k, v, ends, w, bias=t, block_m=16, block_n=16)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got, want = compiled(q, k, v, t), layer(q, k, v, t)
    assert torch.equal(got, want)
    for a, b in zip(
        torch.autograd.grad(got, (q, k, v, t), go), torch.autograd.grad(want, (q, k, v, t), go), strict=True
    ):
        assert torch.equal(a, b)
