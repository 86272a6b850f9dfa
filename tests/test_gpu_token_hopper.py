"""The token top-k kernels for Hopper (``flexmask.backends.triton.token_hopper``, Gluon) on an sm_90 GPU:
output and logsumexp, and every gradient, against float64 and the same as the plain Triton kernels on
the same lists."""

from __future__ import annotations

import pytest
import torch

from flexmask.backends.triton import token_gather as tg
from flexmask.backends.triton import token_hopper
from flexmask.lowering.selection import key_candidates, topk_ends

from ._reference import rel_err
from .test_token_gather import dense

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or token_hopper.gluon is None,
        reason="needs an sm_90 GPU and Gluon",
    ),
]


def _case(B, Hq, Hkv, N, w, D, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g).cuda().to(dtype) for h in (Hq, Hkv, Hkv))
    s = torch.randn(B, Hkv, N, generator=g).cuda()
    if bias == "bf16":  # what a bf16 model passes
        s = s.bfloat16()
    if bias == "rising":  # each row's max grows far past what its running sum can absorb unrescaled
        s = s + torch.linspace(0, 200, N, device="cuda")
    ends = topk_ends(key_candidates(s, (B, s.device))[0], None, w).contiguous()
    return q, k, v, (None if bias is None else s), ends


CASES = [
    (2, 4, 2, 1531, 300, 128, torch.bfloat16, "normal"),  # odd length, partial last block, batch 2
    (1, 2, 1, 4099, 2048, 128, torch.float16, "normal"),  # the paper's heads, w past most blocks
    (1, 4, 2, 700, 1000, 128, torch.bfloat16, "normal"),  # w past N: every earlier key kept
    (1, 16, 8, 2000, 256, 64, torch.bfloat16, None),
    (1, 4, 2, 1000, 100, 128, torch.bfloat16, "rising"),
    (1, 2, 1, 64, 64, 128, torch.bfloat16, "normal"),  # one block, every key kept
    (1, 16, 8, 1100, 512, 128, torch.bfloat16, "bf16"),
    (2, 8, 2, 1100, 300, 128, torch.bfloat16, "normal"),  # GQA groups of 4: two pairs a KV head
    (1, 12, 2, 777, 200, 64, torch.float16, "normal"),  # groups of 6
]


@pytest.mark.parametrize("B,Hq,Hkv,N,w,D,dtype,bias", CASES)
@pytest.mark.parametrize("block_n", [0, 64])
def test_hopper_forward_matches_float64_and_the_triton_forward(B, Hq, Hkv, N, w, D, dtype, bias, block_n):
    q, k, v, t, ends = _case(B, Hq, Hkv, N, w, D, dtype, bias, seed=N + w)
    heads = tg._launch_args(q, k, ends, t)
    assert token_hopper.supported(q, k, v, heads, 64, block_n)
    lists, counts = tg._build_lists(ends, w, 64)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, N, device="cuda", dtype=torch.float32)
    token_hopper.forward(q, k, v, t, ends, lists, counts, o, lse, D**-0.5, heads, block_n)
    ref, ref_lse = dense(q.cpu(), k.cpu(), v.cpu(), ends.cpu(), None if t is None else t.cpu(), D**-0.5, lse=True)
    assert rel_err(o.double().cpu(), ref) < 1e-2
    assert (lse.double().cpu() - ref_lse).abs().max().item() < 1e-3  # every row keeps some key

    o2 = torch.empty_like(q)
    lse2 = torch.empty_like(lse)
    tg.triton_forward(q, k, v, t, ends, lists, counts, o2, lse2, D**-0.5, heads, 64, 0)
    assert rel_err(o.double(), o2.double()) < 1e-2
    assert (lse - lse2).abs().max().item() < 1e-3


@pytest.mark.parametrize("B,Hq,Hkv,N,w,D,dtype,bias", CASES)
def test_hopper_backward_matches_float64_and_the_triton_backward(B, Hq, Hkv, N, w, D, dtype, bias):
    q, k, v, t, ends = _case(B, Hq, Hkv, N, w, D, dtype, bias, seed=N + w + 1)
    heads = tg._launch_args(q, k, ends, t)
    assert token_hopper.supported(q, k, v, heads, 64, 0, backward=True)
    lists, counts = tg._build_lists(ends, w, 64)
    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, N, device="cuda", dtype=torch.float32)
    tg.triton_forward(q, k, v, t, ends, lists, counts, o, lse, D**-0.5, heads, 64, 0)
    do = torch.randn_like(q)

    def grads(backward, *launch):
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(x.shape, device="cuda") for x in (k, v))
        dt = torch.zeros(t.shape if t is not None else (0,), device="cuda")
        backward(q, k, v, t, ends, lists, counts, o, do, lse, dq, dk, dv, dt, D**-0.5, heads, *launch)
        return dq, dk, dv, dt

    got = grads(token_hopper.backward)
    triton = grads(tg.triton_backward, 64, 0)
    leaves = [x.double().cpu().requires_grad_() for x in (q, k, v) + (() if t is None else (t,))]
    ref = dense(*leaves[:3], ends.cpu(), leaves[3] if t is not None else None, D**-0.5)
    want = torch.autograd.grad(ref, leaves, do.double().cpu())
    n = len(want)  # without a bias: q, k, v
    for name, a, b, c in zip("qkvt"[:n], got[:n], triton[:n], want, strict=True):
        assert rel_err(a.double().cpu(), c) < 3e-2, name
        assert rel_err(a.double(), b.double()) < 1e-2, name


def test_hopper_forward_is_not_taken_where_it_does_not_apply():
    q, k, v, t, ends = _case(1, 4, 4, 256, 64, 128, torch.bfloat16, "normal", seed=0)  # no GQA pair to stack
    assert not token_hopper.supported(q, k, v, tg._launch_args(q, k, ends, t), 64, 0)
    q, k, v, t, ends = _case(1, 4, 2, 256, 64, 128, torch.bfloat16, "normal", seed=0)
    heads = tg._launch_args(q, k, ends, t)
    assert token_hopper.supported(q, k, v, heads, 64, 0)
    assert not token_hopper.supported(q, k, v, heads, 32, 0)
    assert not token_hopper.supported(q.float(), k, v, heads, 64, 0)
    assert not token_hopper.supported(q, k, v, heads, 64, 32)
    assert token_hopper.supported(q, k, v, heads, 64, 128)
    assert not token_hopper.supported(q, k, v, heads, 64, 128, backward=True)  # too little shared memory
    assert token_hopper.supported(q, k, v, heads, 64, 64, backward=True)
    shifted = torch.empty(k.numel() + 1, device="cuda", dtype=k.dtype)[1:].view_as(k)  # 2 bytes past an alignment
    assert not token_hopper.supported(q, shifted, v, heads, 64, 0)
