"""The per-key bias gradient by the closed form (flexmask/backends/key_bias.py) vs float64 autograd.

On CPU flex runs forward only, so the differentiable main pass is a dense stand-in here, while the
transposed pass (keys as queries, the transposed BlockMask) runs through real FlexAttention.
"""

import math

import pytest
import torch
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

import flexmask as fm
from flexmask.backends import key_bias

_flex_eager = torch.compile(flex_attention, backend="eager", fullgraph=True)


def _grid(q, k):
    B, H, Q, _ = q.shape
    kv = k.shape[2]
    return (
        torch.arange(B).view(B, 1, 1, 1),
        torch.arange(H).view(1, H, 1, 1),
        torch.arange(Q).view(1, 1, Q, 1),
        torch.arange(kv).view(1, 1, 1, kv),
    )


def run(q, k, v, score_mod, block_mask, scale):
    """Dense and differentiable while q/k/v need grad; real (eager) flex otherwise."""
    if not q.requires_grad:
        out, aux = _flex_eager(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
            return_aux=AuxRequest(lse=True),
        )
        return out, aux.lse
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    b, h, i, j = _grid(q, k)
    s = score_mod(scale * q @ kk.transpose(-1, -2), b, h, i, j)
    s = s.masked_fill(~block_mask.mask_mod(b, h, i, j), -math.inf)
    return _safe_softmax(s) @ vv, s.logsumexp(-1)  # lse -inf on fully masked rows, as flex returns


def _safe_softmax(s):
    """softmax over the last dim with fully masked (all -inf) rows giving zeros, gradients included."""
    live = torch.isfinite(s).any(-1, keepdim=True)
    s = torch.where(live, s, torch.zeros_like(s))
    return torch.softmax(s, -1) * live


def dense_reference(q, k, v, t, allowed, scale):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    tt = t.repeat_interleave(q.shape[1] // t.shape[1], 1)[:, :, None, :]
    s = (scale * q @ kk.transpose(-1, -2) + tt).masked_fill(~allowed, -math.inf)
    return _safe_softmax(s) @ vv


@pytest.mark.parametrize("hs,tb,n", [(2, 2, 200), (1, 2, 131), (2, 1, 77)])
def test_key_bias_gradient_closed_form_matches_autograd(hs, tb, n):
    gen = torch.Generator().manual_seed(1000 + n)
    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k, v = (torch.randn(B, h, n, D, generator=gen, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    t = torch.randn(tb, hs, n, generator=gen, dtype=torch.float64)
    mask = fm.causal() & (fm.sliding_window(23) | fm.topk(torch.randn(B, Hkv, n, generator=gen), 9))
    bm = mask.block_mask(n, n, batch=B, heads=Hq, block_size=32)
    allowed = mask.to_dense(n, n, batch=B, heads=Hq)
    ins = [x.clone().requires_grad_() for x in (q, k, v, t)]
    out = key_bias.attention(*ins, bm, 0.3, run)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, ins, grad_out)
    ref_ins = [x.clone().requires_grad_() for x in (q, k, v, t)]
    ref = dense_reference(*ref_ins, allowed, 0.3)
    want = torch.autograd.grad(ref, ref_ins, grad_out)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-9, atol=1e-9)
    for name, a, b in zip("qkvt", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=lambda m, name=name: f"d{name}: {m}")


def test_key_bias_gradient_with_fully_masked_rows_and_padding():
    """Rows with no key (a zero-length batch row) give zeros and no gradient; padded keys none."""
    gen = torch.Generator().manual_seed(77)
    B, Hq, Hkv, D, n = 2, 4, 2, 16, 90
    q, k, v = (torch.randn(B, h, n, D, generator=gen, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    t = torch.randn(B, Hkv, n, generator=gen, dtype=torch.float64)
    mask = fm.causal() & fm.padding(torch.tensor([0, 61]))
    bm = mask.block_mask(n, n, batch=B, heads=Hq, block_size=32)
    ins = [x.clone().requires_grad_() for x in (q, k, v, t)]
    out = key_bias.attention(*ins, bm, 0.25, run)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, ins, grad_out)
    ref_ins = [x.clone().requires_grad_() for x in (q, k, v, t)]
    ref = dense_reference(*ref_ins, mask.to_dense(n, n, batch=B, heads=Hq), 0.25)
    want = torch.autograd.grad(ref, ref_ins, grad_out)
    assert not out[0].any() and not got[3][0].any() and not got[3][1, :, 61:].any()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-9, atol=1e-9)
    for name, a, b in zip("qkvt", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=lambda m, name=name: f"d{name}: {m}")


def test_supported_bias_heads():
    from flexmask.lowering.layout import Layout
    from flexmask.lowering.planner import key_bias_path
    from flexmask.settings import Resolved

    cuda = Layout(1, 8, 8, 8, torch.device("cuda"), kv_heads=2)  # a layout only: no GPU needed

    def takes(heads, **options):
        return key_bias_path(torch.zeros(1, heads, 8, requires_grad=True), cuda, Resolved().merged(options))

    assert takes(2) and takes(1) and not takes(8)
    assert not takes(2, key_bias_grad="flex")
    assert not key_bias_path(torch.zeros(1, 2, 8), cuda, Resolved())  # no gradient wanted
    assert not key_bias_path(
        torch.zeros(1, 2, 8, requires_grad=True), Layout(1, 8, 8, 8, torch.device("cpu"), 2), Resolved()
    )


@pytest.mark.parametrize("which", ["block", "window"])
def test_fm_attention_routes_key_bias_gradients_through_the_closed_form(monkeypatch, which):
    """fm.attention (flex backend) takes the closed form for a key bias on its BlockMask path (DMA
    block selection, any structured mask); the result and all gradients match float64 autograd.
    (The token layout keeps flex's own bias gradient: the closed form measured slower there.)"""
    from flexmask import functional
    from flexmask.backends import flex
    from flexmask.lowering import planner

    used = []

    def counting_run(*args):
        used.append(args[0].requires_grad)
        return run(*args)

    monkeypatch.setattr(key_bias, "with_lse", counting_run)
    monkeypatch.setattr(flex, "with_lse", counting_run)
    monkeypatch.setattr(functional, "_needs_grad", lambda *a: False)  # CPU flex guard: the stand-in trains
    monkeypatch.setattr(planner, "key_bias_path", lambda t, layout, options: True)  # as on CUDA
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, n, D = 2, 4, 2, 300, 16
    q, k, v = (torch.randn(B, h, n, D, generator=gen, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    s = torch.randn(B, Hkv, n, generator=gen, dtype=torch.float64)
    if which == "block":

        def make(x):
            return fm.topk_blocks(x, 2, block_size=128)
    else:

        def make(x):
            return fm.causal() & fm.sliding_window(70)

    ins = [x.clone().requires_grad_() for x in (q, k, v, s)]
    out = fm.attention(*ins[:3], mask=make(ins[3].detach()), bias=fm.key_bias(ins[3]), backend="flex")
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, ins, grad_out)
    assert used == [True, False]  # the main pass, then (in backward) the transposed one
    ref_ins = [x.clone().requires_grad_() for x in (q, k, v, s)]
    allowed = make(s).to_dense(n, n, batch=B, heads=Hq)
    ref = dense_reference(*ref_ins[:3], ref_ins[3], allowed, D**-0.5)
    want = torch.autograd.grad(ref, ref_ins, grad_out)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-9, atol=1e-9)
    for name, a, b in zip("qkvs", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=lambda m, name=name: f"d{name}: {m}")
