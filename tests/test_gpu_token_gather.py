"""The in-place token top-k kernel on a CUDA GPU (``options={"token_kernel": "gather"}``): bf16
output and every gradient against float64, and the same as the default key-layout path."""

from __future__ import annotations

import pytest
import torch

import flexmask as fm
from flexmask.lowering.selection import key_candidates, topk_ends

from ._reference import rel_err
from .test_token_gather import dense

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "B,Hq,Hkv,Hs,N,w",
    [
        (1, 16, 8, 8, 2000, 256),
        (2, 4, 2, 2, 1531, 300),
        (1, 2, 1, 1, 4099, 2048),
        (2, 8, 2, 2, 1100, 300),  # groups of 4
        (1, 12, 2, 2, 777, 200),  # groups of 6
        (1, 4, 2, 4, 1000, 128),  # a selection per query head: one head a program
    ],
)
def test_token_gather_matches_float64_on_gpu(B, Hq, Hkv, Hs, N, w):
    g = torch.Generator().manual_seed(N)
    D = 128
    q, k, v = (torch.randn(B, h, N, D, generator=g).cuda().bfloat16().requires_grad_() for h in (Hq, Hkv, Hkv))
    s = torch.randn(B, Hs, N, generator=g).cuda().requires_grad_()
    gather = {"token_kernel": "gather", "cache": False}
    out = fm.attention(q, k, v, mask=fm.topk(s, w), bias=fm.key_bias(s), options=gather)
    e = topk_ends(key_candidates(s.detach(), (B, s.device))[0], None, w)
    ref = dense(q.cpu(), k.cpu(), v.cpu(), e.cpu(), s.detach().cpu(), D**-0.5)
    assert rel_err(out.double().cpu(), ref) < 2e-2
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, s), go)
    qd, kd, vd, sd = (x.detach().double().cpu().requires_grad_() for x in (q, k, v, s))
    want = torch.autograd.grad(dense(qd, kd, vd, e.cpu(), sd, D**-0.5), (qd, kd, vd, sd), go.double().cpu())
    for a, b, name in zip(got, want, "qkvs", strict=True):
        assert rel_err(a.double().cpu(), b) < 3e-2, name
    default = fm.attention(q, k, v, mask=fm.topk(s, w), bias=fm.key_bias(s), options={"cache": False})
    assert rel_err(out.double(), default.double()) < 2e-2


def test_token_gather_under_torch_compile_matches_eager_and_new_scores_do_not_recompile():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    B, Hq, Hkv, N, D, w = 2, 4, 2, 1000, 64, 128
    gather = {"token_kernel": "gather", "cache": False}

    def layer(q, k, v, s):
        return fm.attention(q, k, v, mask=fm.topk(s, w), bias=fm.key_bias(s), options=gather)

    compiled = torch.compile(layer)
    graphs = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(B, h, N, D, generator=g).cuda().bfloat16().requires_grad_() for h in (Hq, Hkv, Hkv))
        s = torch.randn(B, Hkv, N, generator=g).cuda().requires_grad_()
        go = torch.randn(B, Hq, N, D, generator=g).cuda().bfloat16()
        want = layer(q, k, v, s)
        got = compiled(q, k, v, s)
        assert rel_err(got.double(), want.double()) < 1e-2
        for a, b, name in zip(
            torch.autograd.grad(got, (q, k, v, s), go), torch.autograd.grad(want, (q, k, v, s), go), "qkvs", strict=True
        ):
            assert rel_err(a.double(), b.double()) < 2e-2, name
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 2, graphs


@pytest.mark.parametrize("selection", ["token", "block"])
@pytest.mark.parametrize("keys", ["lengths", "key_mask"])
def test_token_gather_among_documents_and_padding_matches_float64_on_gpu(keys, selection, monkeypatch):
    """``fm.topk(s, w, among=document & padding)`` (and on Hopper ``fm.topk_blocks``) takes the
    in-place kernel (its ends fold the documents and the padding in): output and every gradient
    against float64 over the mask's dense truth (packed documents, GQA, batch 2; padding as lengths,
    or a key mask with left padding and holes, as ``fm.hf`` builds for padded batches)."""
    from flexmask.backends import token_gather

    from ._reference import ref_attention

    calls = []
    real = token_gather.run
    monkeypatch.setattr(token_gather, "run", lambda *args: calls.append(1) or real(*args))
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, N, D, w = 2, 4, 2, 1500, 64, 200
    q, k, v = (torch.randn(B, h, N, D, generator=g).cuda().bfloat16().requires_grad_() for h in (Hq, Hkv, Hkv))
    s = torch.randn(B, Hkv, N, generator=g).cuda().requires_grad_()
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([400, 700, 400]))[None].expand(B, N).cuda()
    if keys == "lengths":
        padding = fm.padding(torch.tensor([N, 1200], device="cuda"))
    else:
        valid = torch.rand(B, N, generator=g) < 0.9
        valid[1, :150] = False
        padding = fm.key_mask(valid.cuda())
    among = fm.document(ids) & padding
    mask = fm.topk(s, w, among=among) if selection == "token" else fm.topk_blocks(s, 2, among=among)
    out = fm.attention(q, k, v, mask=mask, bias=fm.key_bias(s), options={"cache": False})
    assert bool(calls) == (selection == "token" or torch.cuda.get_device_capability() == (9, 0))
    keep = mask.to_dense(N, N, batch=B, heads=Hkv).repeat_interleave(Hq // Hkv, 1).cpu()
    qd, kd, vd, sd = (x.detach().double().cpu().requires_grad_() for x in (q, k, v, s))
    bias = sd.repeat_interleave(Hq // Hkv, 1)[:, :, None, :]
    ref = ref_attention(qd, kd, vd, keep=keep, bias=bias)
    assert rel_err(out.double().cpu(), ref) < 2e-2
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, s), go)
    want = torch.autograd.grad(ref, (qd, kd, vd, sd), go.double().cpu())
    for a, b, name in zip(got, want, "qkvs", strict=True):
        assert rel_err(a.double().cpu(), b) < 3e-2, name
