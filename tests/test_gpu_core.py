"""Core checks on a CUDA GPU: the default (compiled FlexAttention) backend in bf16 against a float64
dense reference written here, gradients, recompiles, and the structural BlockMask builder against
torch's compiled ``create_block_mask``. Run with ``pytest -m gpu`` on the GPU machine.

Tolerances (device/METHOD.md): bf16 operands land between 1e-3 and 1e-2 in ‖out − ref‖ / ‖ref‖;
the reference is computed in float64 from the same (bf16-rounded) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

import flexmask as fm

from ._reference import ref_attention, rel_err

pytestmark = pytest.mark.gpu
DEV = "cuda"
B, HQ, HKV, D = 2, 8, 2, 64


# ---------------------------------------------------------------------------------------------
# float64 reference: the CPU tests' own (device-agnostic); position helpers here live on the GPU


def positions(Q, KV):
    return torch.arange(KV - Q, KV, device=DEV).view(-1, 1), torch.arange(KV, device=DEV).view(1, -1)


def alibi_truth(H, Q, KV):
    i, j = positions(Q, KV)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64, device=DEV)
    return slopes.view(H, 1, 1) * (j - i).double()


def t5_buckets(rel, num_buckets, max_distance):
    """T5's unidirectional bucket of ``rel = j - i``, in float64."""
    n = (-rel).clamp_min(0)
    exact = num_buckets // 2
    large = exact + (
        torch.log(n.double().clamp_min(1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    )
    return torch.where(n < exact, n, large.long().clamp_max(num_buckets - 1))


def same_doc(ids, Q, KV):
    i, _ = positions(Q, KV)
    return (ids[:, i.flatten()][:, :, None] == ids[:, None, :])[:, None]  # [B, 1, Q, KV]


def rand(*shape, gen, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEV, dtype=dtype)


def doc_ids(gen, KV, n_docs=5):
    return torch.randint(0, n_docs, (B, KV), generator=gen).sort(-1).values.to(DEV)


def case(name, Q, KV, gen):
    """``(mask, keep, bias, bias_ref, softcap)`` for one named configuration."""
    i, j = positions(Q, KV)
    if name == "document_causal":
        ids = doc_ids(gen, KV)
        return fm.causal() & fm.document(ids), same_doc(ids, Q, KV) & (j <= i), None, None, None
    if name == "document_bidirectional":  # whole blocks of one document: full, ragged last block
        ids = doc_ids(gen, KV, n_docs=3)
        return fm.document(ids), same_doc(ids, Q, KV), None, None, None
    if name == "sliding_window_alibi_softcap":
        keep = (j <= i) & (j > i - 200)
        return fm.causal() & fm.sliding_window(200), keep, fm.alibi(HQ), alibi_truth(HQ, Q, KV), 30.0
    if name == "prefix_lm_key_bias":
        t = rand(B, HKV, KV, gen=gen, dtype=torch.float32)
        bias_ref = t.double().repeat_interleave(HQ // HKV, dim=1)[:, :, None, :]
        return fm.prefix_lm(100), (j < 100) | (j <= i), fm.key_bias(t), bias_ref, None
    if name == "padding_relative_bias":
        n = torch.tensor([KV, KV - 217], device=DEV)
        table = rand(HQ, 32, gen=gen, dtype=torch.float32)
        bias_ref = table.double()[:, t5_buckets(j - i, 32, 128)]
        return fm.padding(n), j < n.view(-1, 1, 1, 1), fm.relative_bias(table, max_distance=128), bias_ref, None
    if name == "chunked_causal_tensor_bias":  # a dense [Q, KV] bias: rows are the call's queries
        t = rand(Q, KV, gen=gen, dtype=torch.float32)
        keep = (i // 256 == j // 256) & (j <= i)
        return fm.chunked(256) & fm.causal(), keep, fm.tensor_bias(t), t.double(), None
    if name == "full_none":
        return None, None, None, None, None
    raise AssertionError(name)


FORWARD = [
    ("document_causal", 1000, 1000),
    ("document_bidirectional", 1000, 1000),
    ("sliding_window_alibi_softcap", 1000, 1000),
    ("prefix_lm_key_bias", 1000, 1000),
    ("padding_relative_bias", 1000, 1000),
    ("chunked_causal_tensor_bias", 1000, 1000),
    ("full_none", 1000, 1000),
    ("document_causal", 300, 1000),
    ("sliding_window_alibi_softcap", 300, 1000),
    ("chunked_causal_tensor_bias", 300, 1000),
    ("prefix_lm_key_bias", 7, 1000),
]


@pytest.mark.parametrize("name, Q, KV", FORWARD, ids=[f"{n}-{q}x{kv}" for n, q, kv in FORWARD])
def test_bf16_forward_matches_float64_reference(name, Q, KV, gen):
    mask, keep, bias, bias_ref, softcap = case(name, Q, KV, gen)
    q, k, v = rand(B, HQ, Q, D, gen=gen), rand(B, HKV, KV, D, gen=gen), rand(B, HKV, KV, D, gen=gen)
    with torch.no_grad():
        out = fm.attention(q, k, v, mask=mask, bias=bias, softcap=softcap)
    assert out.shape == (B, HQ, Q, D) and out.dtype == torch.bfloat16 and out.device == q.device
    assert torch.isfinite(out).all()
    ref = ref_attention(q, k, v, keep=keep, bias=bias_ref, softcap=softcap)
    err = rel_err(out, ref)
    assert err < 1e-2, f"{name}: relative error {err:.2e}"


def test_bf16_gradients_match_float64_reference(gen):
    """q, k, v, a learnable key_bias [B, Hkv, KV] and head_bias [Hq] through compiled flex."""
    N = 1000
    ids = doc_ids(gen, N)
    i, j = positions(N, N)
    keep = same_doc(ids, N, N) & (j <= i)
    q = rand(B, HQ, N, D, gen=gen).requires_grad_()
    k = rand(B, HKV, N, D, gen=gen).requires_grad_()
    v = rand(B, HKV, N, D, gen=gen).requires_grad_()
    kb = rand(B, HKV, N, gen=gen, dtype=torch.float32).requires_grad_()
    hb = torch.nn.Parameter(rand(HQ, gen=gen, dtype=torch.float32))
    out = fm.attention(
        q, k, v, mask=fm.causal() & fm.document(ids), bias=fm.key_bias(kb) + fm.head_bias(hb), softcap=20.0
    )
    g = rand(*out.shape, gen=gen)
    got = torch.autograd.grad(out, (q, k, v, kb, hb), g)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, kb, hb)]
    bias_ref = leaves[3].repeat_interleave(HQ // HKV, dim=1)[:, :, None, :] + leaves[4].view(HQ, 1, 1)
    ref = ref_attention(*leaves[:3], keep=keep, bias=bias_ref, softcap=20.0)
    want = torch.autograd.grad(ref, leaves, g.double())
    assert rel_err(out, ref) < 1e-2
    for name, a, b in zip(("q", "k", "v", "key_bias"), got[:4], want[:4], strict=True):
        assert torch.isfinite(a).all()
        err = rel_err(a, b)
        assert err < 2e-2, f"grad {name}: relative error {err:.2e}"
    # A per-head constant cancels in the softmax: its exact gradient is 0, and what the kernel
    # returns is rounding noise from delta = rowsum(dO * O) with O in bf16 (one bf16 ulp, 2^-8, of
    # |delta| per row at most). A wrong gradient (e.g. a missing "- delta") is ~|delta| per row.
    assert torch.isfinite(got[4]).all()
    delta = (g.double() * ref.detach()).sum(-1)  # [B, Hq, Q]
    bound = 2.0**-8 * delta.abs().sum(dim=(0, 2))  # per head
    assert (got[4].double() - want[4]).abs().le(bound).all(), (got[4], bound)


def test_bf16_gradient_of_relative_bias_with_q_shorter_than_kv(gen):
    Q, KV = 300, 1000
    i, j = positions(Q, KV)
    keep = (j <= i) & (j > i - 256)
    q = rand(B, HQ, Q, D, gen=gen).requires_grad_()
    k = rand(B, HKV, KV, D, gen=gen).requires_grad_()
    v = rand(B, HKV, KV, D, gen=gen).requires_grad_()
    table = torch.nn.Parameter(rand(HQ, 32, gen=gen, dtype=torch.float32))
    out = fm.attention(q, k, v, mask=fm.causal() & fm.sliding_window(256), bias=fm.relative_bias(table))
    g = rand(*out.shape, gen=gen)
    got = torch.autograd.grad(out, (q, k, v, table), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref = ref_attention(*leaves[:3], keep=keep, bias=leaves[3][:, t5_buckets(j - i, 32, 128)])
    want = torch.autograd.grad(ref, leaves, g.double())
    assert rel_err(out, ref) < 1e-2
    for name, a, b in zip(("q", "k", "v", "table"), got, want, strict=True):
        err = rel_err(a, b)
        assert err < 2e-2, f"grad {name}: relative error {err:.2e}"


def test_fully_masked_rows_are_zero_on_gpu(gen):
    N = 1000
    mask = fm.padding(torch.tensor([0, N], device=DEV)) & ~fm.causal()  # batch 0: nothing; last row: nothing
    q = rand(B, HQ, N, D, gen=gen).requires_grad_()
    k = rand(B, HKV, N, D, gen=gen).requires_grad_()
    v = rand(B, HKV, N, D, gen=gen).requires_grad_()
    out = fm.attention(q, k, v, mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :, -1], torch.zeros_like(out[1, :, -1]))
    assert out[1, :, 0].float().abs().sum() > 0
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for grad in grads:
        assert torch.isfinite(grad).all()
    assert torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))


def test_new_document_ids_and_bias_tensors_do_not_recompile(gen):
    """Inductor: fresh ids / key-bias tensors every step reuse the graphs of the first step; a new
    mask structure adds at least one (so the counter is live).

    The first step may compile more than one graph (flex itself, and on CUDA the BlockMask index
    builder), so later steps are compared with the count after the first.
    """
    from torch._dynamo.utils import counters

    N = 1024
    torch._dynamo.reset()
    counters.clear()
    i, j = positions(N, N)
    after_first = None
    for step in range(4):
        ids = doc_ids(gen, N)
        t = rand(B, HKV, N, gen=gen, dtype=torch.float32)
        q, k, v = rand(B, HQ, N, D, gen=gen), rand(B, HKV, N, D, gen=gen), rand(B, HKV, N, D, gen=gen)
        with torch.no_grad():
            out = fm.attention(q, k, v, mask=fm.causal() & fm.document(ids), bias=fm.key_bias(t))
        bias_ref = t.double().repeat_interleave(HQ // HKV, dim=1)[:, :, None, :]
        ref = ref_attention(q, k, v, keep=same_doc(ids, N, N) & (j <= i), bias=bias_ref)
        assert rel_err(out, ref) < 1e-2  # the reused kernel computes the new contents
        graphs = counters["stats"]["unique_graphs"]
        if after_first is None:
            assert graphs >= 1
            after_first = graphs
        assert graphs == after_first, f"recompiled at step {step}: {dict(counters['stats'])}"
    with torch.no_grad():
        fm.attention(q, k, v, mask=fm.causal() & fm.sliding_window(128), bias=fm.key_bias(t))
    assert counters["stats"]["unique_graphs"] > after_first


@pytest.mark.parametrize("which", ["causal_window", "causal_document"])
def test_structural_builder_matches_create_block_mask_at_4096(which, gen):
    from torch.nn.attention.flex_attention import create_block_mask

    N = 4096
    if which == "causal_window":
        mask = fm.causal() & fm.sliding_window(1000)
    else:
        mask = fm.causal() & fm.document(doc_ids(gen, N, n_docs=12))
    batch = 1 if which == "causal_window" else B
    ours = mask.block_mask(N, N, batch=batch, device=DEV)
    theirs = create_block_mask(mask.mask_mod, batch, 1, N, N, device=DEV, BLOCK_SIZE=128, _compile=True)

    def dense_blocks(num, idx):
        n = idx.shape[-1]
        out = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.int32, device=DEV)
        valid = torch.arange(n, device=DEV) < num[..., None]
        out.scatter_(-1, torch.where(valid, idx.long(), n), 1)
        return out[..., :n].bool().expand(batch, 1, -1, -1)

    assert torch.equal(
        dense_blocks(ours.kv_num_blocks, ours.kv_indices), dense_blocks(theirs.kv_num_blocks, theirs.kv_indices)
    )
    assert torch.equal(
        dense_blocks(ours.full_kv_num_blocks, ours.full_kv_indices),
        dense_blocks(theirs.full_kv_num_blocks, theirs.full_kv_indices),
    )


def test_block_partition_compiles_with_broadcast_maps(gen):
    """The BlockMask partition of a broadcast [1, 16, 512, 512] block map compiles (torch < 2.13's
    split-scan code generation failed on it: pytorch/pytorch#180221) and equals the eager one."""
    from flexmask.lowering.blocks import _ordered

    any_ = (torch.rand(1, 1, 512, 512, generator=gen) < 0.3).cuda()
    all_ = (torch.rand(1, 16, 512, 512, generator=gen) < 0.5).cuda()
    fn = torch.compile(lambda a, b: _ordered(a & ~b), fullgraph=True)
    for got, want in zip(fn(any_, all_), _ordered(any_ & ~all_), strict=True):
        assert torch.equal(got, want)
