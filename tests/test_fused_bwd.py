"""Block top-k's fused Triton backward (``flexmask/backends/triton/fused_bwd.py``) without a GPU:
``dq``, ``dk``, ``dv`` and the key-bias gradient against float64 autograd in Triton's interpreter
(run with ``TRITON_INTERPRET=1``). The GPU tests (``tests/test_gpu_dma.py``) check it in bf16 through
``fm.attention``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from ._reference import brute_topk_blocks, heads_to, ref_attention
from ._triton import interpreted


@interpreted
@pytest.mark.parametrize("n", [300, 384], ids=["partial-last-block", "whole-blocks"])
@pytest.mark.parametrize("split", [False, True], ids=["one-program-per-key-block", "split-lists"])
def test_fused_backward_matches_float64_in_the_interpreter(n, split):
    from flexmask.backends.triton import fused_bwd

    B, Hq, Hkv, D = 2, 4, 2, 16
    g = torch.Generator().manual_seed(n + split)
    q = torch.randn(B, Hq, n, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hkv, n, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t = torch.randn(1, Hkv, n, generator=g, dtype=torch.float64, requires_grad=True)  # shared over the batch
    keep = heads_to(brute_topk_blocks(t.detach().expand(B, -1, -1), 1, 128), Hq)  # [B, Hq, N, N]
    block_mask = create_block_mask(lambda b, h, i, j: keep[b, h, i, j], B, Hq, n, n, device="cpu", _compile=False)
    scale = 1 / math.sqrt(D)
    bias = heads_to(t.expand(B, -1, -1), Hq)[:, :, None, :]
    out, lse = ref_attention(q, k, v, keep=keep, bias=bias, scale=scale, with_lse=True)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(out, (q, k, v, t), go)
    f32 = [x.detach().float() for x in (q, k, v, out, go, lse, t)]
    got = fused_bwd.backward(*f32[:6], f32[6], block_mask, scale, split_below=10**6 if split else 0, chunk=1)
    for a, b, name in zip(got, want, ("dq", "dk", "dv", "dt"), strict=True):
        err = (a.double() - b).abs().max().item()
        assert err < 1e-4 * (1 + b.abs().max().item()), (name, err)
