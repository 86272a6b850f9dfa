"""``flexmask.attention`` and the bias algebra against a float64 dense reference written here.

The reference is plain softmax attention on ``[B, Hq, Q, KV]`` scores built from the definitions
in the issue (absolute positions; queries are the last Q of the KV positions; GQA shares each
key/value head with ``Hq / Hkv`` consecutive query heads; softcap before the bias; rows with no
kept key give zeros). Gradients are float64 autograd through that reference.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexmask as fm
from flexmask.backends import flex as flex_backend

from ._lowering import Layout, block_mask_for, lower_score
from ._reference import ref_attention, rel_err

# ---------------------------------------------------------------------------------------------
# truths of the biases


def positions(Q, KV):
    """Absolute query positions as a column ``[Q, 1]``, key positions as a row ``[1, KV]``."""
    return torch.arange(KV - Q, KV).view(-1, 1), torch.arange(KV).view(1, -1)


def t5_bucket(rel: int, num_buckets: int, max_distance: int, bidirectional: bool) -> int:
    """T5's relative-position bucket of ``rel = j - i`` (as in the T5 paper's reference code)."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            bucket = num_buckets
        n = abs(rel)
    else:
        n = max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    big = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(big, num_buckets - 1)


def alibi_truth(H, Q, KV):
    i, j = positions(Q, KV)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    return slopes.view(H, 1, 1) * (j - i).double()  # [H, Q, KV]


def relative_truth(table, Q, KV, max_distance, bidirectional):
    nb = table.shape[1]
    idx = torch.tensor(
        [[t5_bucket(j - i, nb, max_distance, bidirectional) for j in range(KV)] for i in range(KV - Q, KV)]
    )
    return table.double()[:, idx]  # [H, Q, KV]


def key_truth(t, Hq):
    return t.double().repeat_interleave(Hq // t.shape[1], dim=1)[:, :, None, :]  # [B|1, Hq, 1, KV]


# masks: (fm mask, keep [B|1, 1, Q, KV]) from the definitions
def mask_case(name, B, Q, KV, gen):
    i, j = positions(Q, KV)
    if name == "none":
        return None, None
    if name == "full":
        return fm.full(), torch.ones(Q, KV, dtype=torch.bool)
    if name == "causal":
        return fm.causal(), j <= i
    if name == "not_causal":  # the last query keeps no key
        return ~fm.causal(), j > i
    if name == "sliding_window":
        return fm.sliding_window(7), (i - 7 < j) & (j <= i)
    if name == "chunked_causal":
        return fm.chunked(10) & fm.causal(), (i // 10 == j // 10) & (j <= i)
    if name == "prefix_lm":
        return fm.prefix_lm(12), (j < 12) | (j <= i)
    if name == "prefix_lm_per_batch":
        n = torch.randint(0, KV, (B,), generator=gen)
        return fm.prefix_lm(n), (j < n.view(-1, 1, 1, 1)) | (j <= i)
    if name == "document_causal":
        ids = torch.randint(0, 4, (B, KV), generator=gen).sort(-1).values
        same = ids[:, i.flatten()][:, :, None] == ids[:, None, :]
        return fm.document(ids) & fm.causal(), same[:, None] & (j <= i)
    if name == "document_unsorted_batch1":
        ids = torch.randint(0, 3, (1, KV), generator=gen)
        return fm.document(ids), (ids[:, i.flatten()][:, :, None] == ids[:, None, :])[:, None]
    if name == "padding_with_empty_row":
        n = torch.tensor([0] + [KV - 5] * (B - 1))
        return fm.padding(n), (j < n.view(-1, 1, 1, 1))
    if name == "custom":
        return fm.mask(lambda b, h, q, kv: (q + 2 * kv) % 3 != 1, name="mod3"), (i + 2 * j) % 3 != 1
    if name == "combo":
        ids = torch.randint(0, 2, (B, KV), generator=gen).sort(-1).values
        same = (ids[:, i.flatten()][:, :, None] == ids[:, None, :])[:, None]
        m = fm.causal() & fm.document(ids) & (fm.sliding_window(9) | fm.chunked(16))
        return m, same & (j <= i) & (((i - 9 < j) & (j <= i)) | (i // 16 == j // 16))
    raise AssertionError(name)


MASKS = [
    "none",
    "full",
    "causal",
    "not_causal",
    "sliding_window",
    "chunked_causal",
    "prefix_lm",
    "prefix_lm_per_batch",
    "document_causal",
    "document_unsorted_batch1",
    "padding_with_empty_row",
    "custom",
    "combo",
]


def randn(*shape, gen, dtype=torch.float64, grad=False):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(grad)


def check_grads(out, ref, ours, theirs, gen, tol):
    """Backprop the same random output gradient through both and compare every input's gradient."""
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, ours, g.to(out.dtype))
    want = torch.autograd.grad(ref, theirs, g)
    for n, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a is not None and torch.isfinite(a).all(), f"gradient {n} is missing or not finite"
        assert a.shape == b.shape and a.dtype == ours[n].dtype
        # relative, with a floor of 1: a head_bias gradient is exactly 0 in theory (a per-row
        # constant cancels in the softmax), so both sides are rounding noise there.
        err = ((a.double() - b).norm() / b.norm().clamp_min(1.0)).item()
        assert err < tol, f"gradient {n}: relative error {err:.2e} >= {tol:.0e}"


def twins(*tensors):
    """float64 leaf copies of ``tensors`` for the reference (so both sides get their own grads)."""
    return [t.detach().double().requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------------------
# masks


@pytest.mark.parametrize("name", MASKS)
def test_every_mask_kind_forward_and_backward(name, gen):
    B, Hq, Hkv, Q, KV, D, Dv = 2, 6, 3, 37, 53, 16, 24
    mask, keep = mask_case(name, B, Q, KV, gen)
    q = randn(B, Hq, Q, D, gen=gen, grad=True)
    k = randn(B, Hkv, KV, D, gen=gen, grad=True)
    v = randn(B, Hkv, KV, Dv, gen=gen, grad=True)
    out = fm.attention(q, k, v, mask=mask)
    assert out.shape == (B, Hq, Q, Dv) and out.dtype == torch.float64
    q2, k2, v2 = twins(q, k, v)
    ref = ref_attention(q2, k2, v2, keep=keep)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    check_grads(out, ref, (q, k, v), (q2, k2, v2), gen, tol=1e-10)


# ---------------------------------------------------------------------------------------------
# biases: (fm bias, learnable tensors, reference bias from float64 twins of those tensors)

HQ, HKV = 8, 2  # alibi slopes 2^-(h+1) are exact in float32 for 8 heads


def bias_case(name, B, Q, KV, gen, dtype=torch.float64):
    """``(bias, params, make_ref)``: ``make_ref(twins_of_params) -> float64 bias``."""
    if name == "alibi":
        return fm.alibi(HQ), [], lambda p: alibi_truth(HQ, Q, KV)
    if name == "head_bias":
        table = torch.nn.Parameter(randn(HQ, gen=gen, dtype=dtype))
        return fm.head_bias(table), [table], lambda p: p[0].view(HQ, 1, 1)
    if name == "relative_bias":
        table = torch.nn.Parameter(randn(HQ, 16, gen=gen, dtype=dtype))
        bias = fm.relative_bias(table, max_distance=20)
        return bias, [table], lambda p: relative_truth(p[0], Q, KV, 20, False)
    if name == "relative_bias_bidirectional":
        table = torch.nn.Parameter(randn(HQ, 12, gen=gen, dtype=dtype))
        bias = fm.relative_bias(table, max_distance=30, bidirectional=True)
        return bias, [table], lambda p: relative_truth(p[0], Q, KV, 30, True)
    if name.startswith("key_bias_"):
        heads = {"key_bias_1": 1, "key_bias_hkv": HKV, "key_bias_hq": HQ}[name]
        batch = 1 if heads == HQ else B  # batch-1 tensor broadcast over the batch
        t = randn(batch, heads, KV, gen=gen, dtype=dtype, grad=True)
        return fm.key_bias(t), [t], lambda p: key_truth(p[0], HQ)
    if name.startswith("tensor_bias"):
        shape = {
            "tensor_bias_full": (B, HQ, Q, KV),
            "tensor_bias_heads_keys": (HQ, 1, KV),
            "tensor_bias_2d": (Q, KV),
            "tensor_bias_1d": (KV,),
            "tensor_bias_batch_rows": (B, 1, Q, 1),
        }[name]
        t = randn(*shape, gen=gen, dtype=dtype, grad=True)
        return fm.tensor_bias(t), [t], lambda p: p[0]
    if name == "sum":
        parts = [bias_case(n, B, Q, KV, gen, dtype) for n in ("alibi", "head_bias", "key_bias_hkv", "relative_bias")]
        bias = parts[0][0] + parts[1][0] + parts[2][0] + parts[3][0]
        params = [t for part in parts for t in part[1]]

        def make_ref(p):
            return (
                alibi_truth(HQ, Q, KV)
                + p[0].view(HQ, 1, 1)
                + key_truth(p[1], HQ)
                + relative_truth(p[2], Q, KV, 20, False)
            )

        return bias, params, make_ref
    raise AssertionError(name)


BIASES = [
    "alibi",
    "head_bias",
    "relative_bias",
    "relative_bias_bidirectional",
    "key_bias_1",
    "key_bias_hkv",
    "key_bias_hq",
    "tensor_bias_full",
    "tensor_bias_heads_keys",
    "tensor_bias_2d",
    "tensor_bias_1d",
    "tensor_bias_batch_rows",
    "sum",
]


@pytest.mark.parametrize("name", BIASES)
def test_every_bias_kind_forward_and_backward(name, gen):
    B, Q, KV, D, Dv = 2, 29, 47, 8, 12
    bias, params, make_ref = bias_case(name, B, Q, KV, gen)
    q = randn(B, HQ, Q, D, gen=gen, grad=True)
    k = randn(B, HKV, KV, D, gen=gen, grad=True)
    v = randn(B, HKV, KV, Dv, gen=gen, grad=True)
    out = fm.attention(q, k, v, bias=bias)
    twin = twins(q, k, v, *params)
    ref = ref_attention(*twin[:3], bias=make_ref(twin[3:]))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    check_grads(out, ref, (q, k, v, *params), twin, gen, tol=1e-10)


def test_alibi_slopes_follow_the_definition():
    for H in (1, 3, 6, 8, 12):
        want = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
        got = fm.alibi(H).slopes()
        assert got.shape == (H,)
        torch.testing.assert_close(got.double(), want, rtol=2.5e-7, atol=0)  # float32: within 2 ulp


def test_alibi_with_heads_not_a_power_of_two(gen):
    """6 heads: slopes are float32 (not exact), so a float32-level tolerance on float64 inputs."""
    B, H, Q, KV, D = 1, 6, 19, 31, 8
    q, k, v = randn(B, H, Q, D, gen=gen), randn(B, H, KV, D, gen=gen), randn(B, H, KV, D, gen=gen)
    out = fm.attention(q, k, v, mask=fm.causal(), bias=fm.alibi(H))
    i, j = positions(Q, KV)
    ref = ref_attention(q, k, v, keep=j <= i, bias=alibi_truth(H, Q, KV))
    assert rel_err(out, ref) < 1e-6


def test_relative_bucket_matches_t5():
    """flexmask's bucket function, at every distance up to beyond max_distance."""
    from flexmask.algebra.bias import relative_bucket

    rel = torch.arange(-400, 400)
    for nb, md, bi in [(32, 128, False), (32, 128, True), (16, 20, False), (12, 30, True), (8, 9, False)]:
        want = torch.tensor([t5_bucket(r, nb, md, bi) for r in rel.tolist()])
        assert torch.equal(relative_bucket(rel, nb, md, bi), want), (nb, md, bi)


@pytest.mark.parametrize(
    "mask_name, bias_name",
    [("causal", "sum"), ("document_causal", "tensor_bias_full"), ("padding_with_empty_row", "key_bias_1")],
)
def test_softcap_scale_mask_and_bias_together(mask_name, bias_name, gen):
    B, Q, KV, D, Dv = 2, 33, 33, 16, 8
    mask, keep = mask_case(mask_name, B, Q, KV, gen)
    bias, params, make_ref = bias_case(bias_name, B, Q, KV, gen)
    q = randn(B, HQ, Q, D, gen=gen, grad=True) * 3  # large scores, so the cap bites
    k = randn(B, HKV, KV, D, gen=gen, grad=True)
    v = randn(B, HKV, KV, Dv, gen=gen, grad=True)
    out = fm.attention(q, k, v, mask=mask, bias=bias, scale=0.7, softcap=4.0)
    twin = twins(q, k, v, *params)
    ref = ref_attention(*twin[:3], keep=keep, bias=make_ref(twin[3:]), scale=0.7, softcap=4.0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    check_grads(out, ref, (q, k, v, *params), twin, gen, tol=1e-10)
    # the cap changes the result (so the check above is not vacuous)
    assert rel_err(fm.attention(q, k, v, mask=mask, bias=bias, scale=0.7), ref) > 1e-3


def test_default_scale_is_inverse_sqrt_head_dim(gen):
    q, k, v = randn(1, 2, 9, 20, gen=gen), randn(1, 2, 9, 20, gen=gen), randn(1, 2, 9, 5, gen=gen)
    out = fm.attention(q, k, v)
    torch.testing.assert_close(out, ref_attention(q, k, v, scale=1 / math.sqrt(20)), rtol=1e-12, atol=1e-12)
    assert rel_err(out, ref_attention(q, k, v, scale=1.0)) > 1e-3


@pytest.mark.parametrize(
    "mask_name, bias_name",
    [
        ("combo", "sum"),
        ("prefix_lm_per_batch", "tensor_bias_batch_rows"),
        ("padding_with_empty_row", "key_bias_hq"),
        ("custom", "relative_bias_bidirectional"),
    ],
)
def test_float32_inputs(mask_name, bias_name, gen):
    B, Q, KV, D, Dv = 2, 41, 66, 32, 16
    mask, keep = mask_case(mask_name, B, Q, KV, gen)
    bias, params, make_ref = bias_case(bias_name, B, Q, KV, gen, dtype=torch.float32)
    q = randn(B, HQ, Q, D, gen=gen, dtype=torch.float32, grad=True)
    k = randn(B, HKV, KV, D, gen=gen, dtype=torch.float32, grad=True)
    v = randn(B, HKV, KV, Dv, gen=gen, dtype=torch.float32, grad=True)
    out = fm.attention(q, k, v, mask=mask, bias=bias, softcap=20.0)
    assert out.dtype == torch.float32
    twin = twins(q, k, v, *params)
    ref = ref_attention(*twin[:3], keep=keep, bias=make_ref(twin[3:]), softcap=20.0)
    assert rel_err(out, ref) < 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # gradients sum many float32 terms (a head_bias gradient is 0 up to that rounding): 2e-5
    check_grads(out, ref, (q, k, v, *params), twin, gen, tol=2e-5)


def test_fully_masked_rows_are_zero_with_finite_gradients(gen):
    """Batch row 0 keeps nothing; ``~causal()`` leaves the last query of row 1 with nothing."""
    B, Q, KV, D = 2, 17, 30, 8
    mask = fm.padding(torch.tensor([0, KV])) & ~fm.causal()
    bias, params, make_ref = bias_case("sum", B, Q, KV, gen)
    q = randn(B, HQ, Q, D, gen=gen, grad=True)
    k = randn(B, HKV, KV, D, gen=gen, grad=True)
    v = randn(B, HKV, KV, D, gen=gen, grad=True)
    out = fm.attention(q, k, v, mask=mask, bias=bias, softcap=10.0)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :, -1], torch.zeros_like(out[1, :, -1]))
    assert torch.isfinite(out).all() and out[1, :, 0].abs().sum() > 0
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, *params), g_out, retain_graph=True)
    for g in grads:
        assert torch.isfinite(g).all()
    dq, dk, dv = grads[:3]
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dq[1, :, -1], torch.zeros_like(dq[1, :, -1]))
    assert torch.equal(dk[0], torch.zeros_like(dk[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))
    i, j = positions(Q, KV)
    twin = twins(q, k, v, *params)
    keep = torch.stack([torch.zeros(Q, KV, dtype=torch.bool), j > i])[:, None]
    ref = ref_attention(*twin[:3], keep=keep, bias=make_ref(twin[3:]), softcap=10.0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    check_grads(out, ref, (q, k, v, *params), twin, gen, tol=1e-10)


def test_reference_backend_chunks_over_queries(gen, monkeypatch):
    """With a tiny chunk budget the CPU path runs many query chunks; numbers and grads unchanged."""
    from flexmask.backends import reference as reference_backend

    B, Q, KV, D = 2, 45, 60, 8
    monkeypatch.setattr(reference_backend, "CHUNK_ELEMENTS", B * HQ * KV * 4)  # 4 query rows per chunk
    mask, keep = mask_case("combo", B, Q, KV, gen)
    bias, params, make_ref = bias_case("sum", B, Q, KV, gen)
    q = randn(B, HQ, Q, D, gen=gen, grad=True)
    k = randn(B, HKV, KV, D, gen=gen, grad=True)
    v = randn(B, HKV, KV, D, gen=gen, grad=True)
    out = fm.attention(q, k, v, mask=mask, bias=bias, softcap=15.0)
    twin = twins(q, k, v, *params)
    ref = ref_attention(*twin[:3], keep=keep, bias=make_ref(twin[3:]), softcap=15.0)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    check_grads(out, ref, (q, k, v, *params), twin, gen, tol=1e-10)


# ---------------------------------------------------------------------------------------------
# the lowered functions in torch's (eager, uncompiled) flex_attention


def eager_flex(q, k, v, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        return flex_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], **kw)


@pytest.mark.parametrize("name", BIASES)
def test_standalone_score_mod_and_mask_mod_in_flex(name, gen):
    """``bias.score_mod`` / ``mask.mask_mod`` used directly with torch's flex_attention (Q == KV)."""
    B, N, D = 2, 40, 8
    bias, params, make_ref = bias_case(name, B, N, N, gen)
    mask, keep = mask_case("document_causal", B, N, N, gen)
    q, k, v = randn(B, HQ, N, D, gen=gen), randn(B, HKV, N, D, gen=gen), randn(B, HKV, N, D, gen=gen)
    if name == "key_bias_hkv":
        bias = fm.alibi(HQ) + bias  # alone it cannot know Hq; summed with alibi(Hq) it does
        ref_bias = alibi_truth(HQ, N, N) + make_ref(params)
    else:
        ref_bias = make_ref(params)
    with torch.no_grad():
        bm = create_block_mask(mask.mask_mod, B, 1, N, N, device="cpu", BLOCK_SIZE=16, _compile=False)
        out = eager_flex(q, k, v, score_mod=bias.score_mod, block_mask=bm)
        ref = ref_attention(q, k, v, keep=keep, bias=ref_bias)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "mask_name, bias_name",
    [
        ("combo", "sum"),
        ("prefix_lm_per_batch", "tensor_bias_full"),
        ("not_causal", "key_bias_hkv"),
        ("custom", "tensor_bias_2d"),
    ],
)
def test_lowered_functions_in_flex_with_q_shorter_than_kv(mask_name, bias_name, gen):
    """What ``backend="flex"`` hands the kernel (cached BlockMask + lowered score_mod), run eagerly."""
    B, Q, KV, D = 2, 23, 70, 8
    mask, keep = mask_case(mask_name, B, Q, KV, gen)
    bias, params, make_ref = bias_case(bias_name, B, Q, KV, gen)
    q, k, v = randn(B, HQ, Q, D, gen=gen), randn(B, HKV, KV, D, gen=gen), randn(B, HKV, KV, D, gen=gen)
    layout = Layout(B, HQ, Q, KV, torch.device("cpu"))
    with torch.no_grad():
        out = eager_flex(
            q, k, v, score_mod=lower_score(bias, 6.0, layout), block_mask=block_mask_for(mask, layout, 16), scale=0.5
        )
        ref = ref_attention(q, k, v, keep=keep, bias=make_ref(params), softcap=6.0, scale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# recompiles


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_new_tensor_contents_do_not_recompile(gen):
    """New document ids / key-bias tensors of the same shape reuse one compiled graph.

    Uses the ``eager`` torch.compile backend (dynamo traces, nothing is code-generated). As a
    control, a structurally different mask does add a graph, so the counter is live.
    """
    from torch._dynamo.utils import counters

    B, H, N, D = 2, 4, 96, 16
    layout = Layout(B, H, N, N, torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()

    def run(mask, bias):
        q, k, v = (randn(B, H, N, D, gen=gen, dtype=torch.float32) for _ in range(3))
        with torch.no_grad():
            out = flex_backend.flex(
                q,
                k,
                v,
                lower_score(bias, None, layout),
                block_mask_for(mask, layout, 32),
                0.25,
                compile_backend="eager",
            )
        return out, q, k, v

    for step in range(5):
        ids = torch.randint(0, 4, (B, N), generator=gen).sort(-1).values
        t = randn(B, H, N, gen=gen, dtype=torch.float32)
        mask, bias = fm.causal() & fm.document(ids), fm.key_bias(t)
        out, q, k, v = run(mask, bias)
        i, j = positions(N, N)
        keep = ((ids[:, i.flatten()][:, :, None] == ids[:, None, :]) & (j <= i))[:, None]
        ref = ref_attention(q, k, v, keep=keep, bias=t.double()[:, :, None, :], scale=0.25)
        assert rel_err(out, ref) < 1e-5  # the reused graph computes the new contents
        assert counters["stats"]["unique_graphs"] == 1, f"recompiled at step {step}: {dict(counters['stats'])}"

    run(fm.causal() & fm.sliding_window(17), fm.key_bias(randn(B, H, N, gen=gen, dtype=torch.float32)))
    assert counters["stats"]["unique_graphs"] == 2  # a new structure is a new graph
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# compiled flex on CPU (one kernel compile: tens of seconds)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit notices from inductor's CPU codegen
def test_compiled_flex_backend_on_cpu_matches_reference(gen):
    B, Q, KV, D = 2, 150, 200, 16
    mask, keep = mask_case("document_causal", B, Q, KV, gen)
    bias, params, make_ref = bias_case("sum", B, Q, KV, gen, dtype=torch.float32)
    q = randn(B, HQ, Q, D, gen=gen, dtype=torch.float32)
    k = randn(B, HKV, KV, D, gen=gen, dtype=torch.float32)
    v = randn(B, HKV, KV, D, gen=gen, dtype=torch.float32)
    with torch.no_grad():
        out = fm.attention(q, k, v, mask=mask, bias=bias, softcap=20.0, backend="flex")
        ref = ref_attention(q, k, v, keep=keep, bias=make_ref([p.detach() for p in params]), softcap=20.0)
    assert out.dtype == torch.float32 and out.shape == (B, HQ, Q, D)
    assert rel_err(out, ref) < 1e-5


def test_bias_repr_and_sum_flattening():
    t = torch.zeros(2, 4, 10)
    total = fm.alibi(4) + (fm.head_bias(torch.zeros(4)) + fm.key_bias(t))
    assert repr(total) == "alibi(4) + head_bias(<table (4,)>) + key_bias(<(2, 4, 10)>)"
    assert len(total.parts) == 3  # a flat sum, not a nested one
    assert repr(fm.relative_bias(torch.zeros(4, 8), max_distance=16)) == (
        "relative_bias(<table (4, 8)>, max_distance=16)"
    )
    assert repr(fm.tensor_bias(torch.zeros(5, 5))) == "tensor_bias(<(5, 5)>)"
