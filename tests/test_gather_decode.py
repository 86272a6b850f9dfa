"""The decoding kernel of the gather plan without a GPU: its inputs (the mask and the additive bias
evaluated at the gathered positions) against the PyTorch path, the kernels in Triton's
interpreter (``TRITON_INTERPRET=1``) against float64, and their compilation for sm_90."""

from __future__ import annotations

import pytest
import torch

import flexmask as fm
from flexmask.backends import gather
from flexmask.backends.triton import gather_decode as kernel
from flexmask.lowering.planner import lower

from ._lowering import Layout, lowering
from ._triton import compile_for_sm90, compiled, interpreted


def gathered_attention(q, k, v, positions, keep, add, scale):
    """float64 attention of ``q`` ``[B, Hq, 1, D]`` over ``positions`` ``[B, Hkv, S]`` of the cache."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    idx = positions.expand(B, Hkv, positions.shape[-1])
    ks = k.double().gather(2, idx[..., None].expand(-1, -1, -1, D)).repeat_interleave(Hq // Hkv, 1)
    vs = v.double().gather(2, idx[..., None].expand(-1, -1, -1, v.shape[-1])).repeat_interleave(Hq // Hkv, 1)
    s = (q.double() @ ks.transpose(-1, -2))[:, :, 0] * scale
    if add is not None:
        s = s + add.double()
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p[:, :, None, :] @ vs).to(q.dtype) if q.dtype != torch.float64 else p[:, :, None, :] @ vs


@pytest.mark.parametrize("mask_kind", ["topk", "topk_blocks", "topk_blocks_padded"])
def test_mask_and_bias_at_the_gathered_positions_give_the_pytorch_path(mask_kind, gen):
    """What the kernel is given (``keep``, the additive ``score_mod(0)``) reproduces the PyTorch
    gather path on every decoding plan DMA makes: token and block selection, padding, a key bias."""
    B, Hq, Hkv, L, D = 2, 4, 2, 45, 8
    q = torch.randn(B, Hq, 1, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, L, D, generator=gen, dtype=torch.float64) for _ in range(2))
    s = torch.randn(B, Hkv, L, generator=gen, dtype=torch.float64)
    if mask_kind == "topk":
        mask = fm.topk(s, 7)
    elif mask_kind == "topk_blocks":
        mask = fm.causal() & fm.topk_blocks(s, 2, block_size=4)
    else:
        mask = fm.topk_blocks(s, 2, block_size=4) & fm.padding(torch.tensor([45, 30]))
    bias = fm.key_bias(s) + fm.alibi(Hq)
    low = lowering(Layout(B, Hq, 1, L, torch.device("cpu"), Hkv))
    plan = lower(mask, bias, layout=low.layout, options=low.options, scale=0.3, softcap=None)
    assert plan.kind == "gather" and plan.softcap is None
    positions, valid = plan.gathered
    keep, add = gather._terms_eager(positions, valid, Hq, plan.score_mod, plan.mask_mod, torch.float64)
    assert keep.shape == add.shape == (B, Hq, positions.shape[-1]) and keep.any()
    want = gather._attend_eager(q, k, v, positions, valid, 0.3, plan.score_mod, plan.mask_mod)
    got = gathered_attention(q, k, v, positions, keep, add, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@interpreted
@pytest.mark.parametrize("G", [1, 2, 3])
@pytest.mark.parametrize("with_add", [True, False])
def test_kernels_match_float64(G, with_add, gen):
    B, Hkv, L, S, D, Dv = 2, 2, 70, 37, 16, 32
    Hq = G * Hkv
    q = torch.randn(B, Hq, 1, D, generator=gen)
    k = torch.randn(B, Hkv, L, D, generator=gen)
    v = torch.randn(B, Hkv, L, Dv, generator=gen)
    positions = torch.randint(0, L, (B, Hkv, S), generator=gen)
    keep = torch.rand(B, Hq, S, generator=gen) < 0.6
    keep[1, -1] = False  # a row that keeps nothing: zeros
    add = torch.randn(B, Hq, S, generator=gen) if with_add else None
    out = kernel.gathered_decode(q, k, v, positions, keep, add, 0.25)
    want = gathered_attention(q.double(), k.double(), v.double(), positions, keep, add, 0.25)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[1, -1], torch.zeros_like(out[1, -1]))
    torch.library.opcheck(kernel._gathered_decode_op, (q, k, v, positions, keep, add, 0.25))  # what compile sees


@compiled
def test_kernels_compile_for_a_gpu():
    partial = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "POS": "*i64", "KEEP": "*u8", "ADD": "*fp32"}
    partial |= {"M": "*fp32", "L": "*fp32", "ACC": "*fp32", "sm_scale": "fp32", "S": "i32", "LEN": "i32"}
    partial |= {"CHUNK": "i32", "SPLITS": "i32"}
    merge = {"M": "*fp32", "L": "*fp32", "ACC": "*fp32", "O": "*bf16", "SPLITS": "i32"}
    compile_for_sm90(
        [
            (kernel._partial, partial, dict(HKV=8, G=2, GP=16, D=128, DV=128, HAS_ADD=True, BS=64)),
            (kernel._merge, merge, dict(G=2, DV=128, SP=16)),
        ]
    )
