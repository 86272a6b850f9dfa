"""The reference backend (``flexmask.backends.reference.reference``) against a dense float64 truth.

The truth is written here from the definition: scores ``q kᵀ · scale`` over all ``[B, Hq, Q, KV]``
(query head ``h`` reads KV head ``h // (Hq/Hkv)``), the score_mod applied to the whole score
tensor, masked keys set to ``-inf``, softmax, rows with no finite score give zeros. Masks and
biases are dense random tensors that the mod functions index (so the truth needs no mod function
at all), or formulas written twice. Gradients are float64 autograd through that truth.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmask.backends import reference as ref_backend
from flexmask.backends.reference import reference

F64 = torch.float64

# ---------------------------------------------------------------------------------------------
# the truth


def truth(q, k, v, *, keep=None, bias=None, scale, softcap=None):
    """Dense float64 attention; ``keep``/``bias`` broadcastable to ``[B, Hq, Q, KV]``."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    alive = (s > -math.inf).any(-1, keepdim=True)
    p = torch.softmax(torch.where(alive, s, torch.zeros_like(s)), dim=-1)
    return torch.where(alive, p, torch.zeros_like(p)) @ v


def randn(*shape, gen, dtype=F64, grad=False):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_(grad)


def qkv(B, Hq, Hkv, Q, KV, D, Dv, gen, dtype=F64, grad=True):
    return (
        randn(B, Hq, Q, D, gen=gen, dtype=dtype, grad=grad),
        randn(B, Hkv, KV, D, gen=gen, dtype=dtype, grad=grad),
        randn(B, Hkv, KV, Dv, gen=gen, dtype=dtype, grad=grad),
    )


def random_keep(B, Hq, Q, KV, gen, density=0.5, dead_rows=3):
    """A dense random mask ``[B, Hq, Q, KV]`` with some fully masked rows."""
    keep = torch.rand(B, Hq, Q, KV, generator=gen) < density
    for _ in range(dead_rows):
        b, h, i = (int(torch.randint(n, (1,), generator=gen)) for n in (B, Hq, Q))
        keep[b, h, i] = False
    return keep


def indexed_mask(keep):
    """A mask_mod that reads a dense mask: ``keep[b, h, q, kv]``."""
    return lambda b, h, q_idx, kv_idx: keep[b, h, q_idx, kv_idx]


def f64(t):
    return t.to(F64)


def grads(out, inputs, gen):
    do = torch.randn(out.shape, generator=gen, dtype=F64).to(out.dtype)
    return torch.autograd.grad(out, inputs, do), do


def assert_grads_match(out, ref, inputs, ref_inputs, gen, tol):
    """Gradients of ``out`` w.r.t. ``inputs`` equal the truth's w.r.t. its float64 twins."""
    got, do = grads(out, inputs, gen)
    want = torch.autograd.grad(ref, ref_inputs, do.to(F64))
    for name, a, b in zip("qkvtuvw", got, want, strict=False):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.to(F64), b, rtol=tol, atol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


TOL64 = 1e-12


@pytest.fixture(params=["kernel", "general"])
def path(request, monkeypatch):
    """Run a test on CPU's fused kernel path and on the device-agnostic path used off CPU."""
    if request.param == "general":
        monkeypatch.setattr(ref_backend, "_has_kernel", lambda device: False)
    return request.param


# ---------------------------------------------------------------------------------------------
# masks, biases, shapes


@pytest.mark.parametrize(
    "B,Hq,Hkv,Q,KV,D,Dv",
    [
        (1, 2, 2, 37, 91, 16, 16),  # odd lengths, Q < KV
        (3, 4, 2, 45, 45, 8, 8),  # batch, GQA
        (2, 6, 1, 13, 130, 16, 8),  # MQA, Dv < D
        (1, 3, 3, 20, 33, 8, 24),  # Dv > D
    ],
)
def test_random_mask_and_learnable_bias_match_truth(B, Hq, Hkv, Q, KV, D, Dv, gen, path):
    """Dense random mask (with dead rows) and a learnable dense bias table: values and all grads."""
    q, k, v = qkv(B, Hq, Hkv, Q, KV, D, Dv, gen)
    keep = random_keep(B, Hq, Q, KV, gen)
    table = randn(B, Hq, Q, KV, gen=gen, grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[b, h, q_idx, kv_idx]

    out = reference(q, k, v, score_mod, indexed_mask(keep), 0.3)
    ref = truth(q, k, v, keep=keep, bias=table, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=TOL64, atol=TOL64)
    assert_grads_match(out, ref, (q, k, v, table), (q, k, v, table), gen, TOL64)


def test_structured_masks_relative_bias_table_and_per_key_bias(gen):
    """Causal + window on absolute positions (queries are the last Q), a learnable relative-position
    table per head and a learnable per-key bias per (batch, KV head): the usual bias shapes."""
    B, Hq, Hkv, Q, KV, D, W = 2, 4, 2, 29, 77, 16, 23
    q, k, v = qkv(B, Hq, Hkv, Q, KV, D, D, gen)
    rel = randn(Hq, 2 * KV, gen=gen, grad=True)
    key_bias = randn(B, Hkv, KV, gen=gen, grad=True)
    off = KV - Q

    def mask_mod(b, h, q_idx, kv_idx):  # call-local query indices, as reference receives them
        i = q_idx + off
        return (kv_idx <= i) & (kv_idx > i - W)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + rel[h, q_idx + off - kv_idx + KV] + key_bias[b, h // (Hq // Hkv), kv_idx]

    out = reference(q, k, v, score_mod, mask_mod, 0.25)
    i = torch.arange(off, KV).view(-1, 1)
    j = torch.arange(KV).view(1, -1)
    keep = (j <= i) & (j > i - W)
    bias = rel[:, i - j + KV][None] + key_bias.repeat_interleave(Hq // Hkv, dim=1)[:, :, None, :]
    ref = truth(q, k, v, keep=keep, bias=bias, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=TOL64, atol=TOL64)
    assert_grads_match(out, ref, (q, k, v, rel, key_bias), (q, k, v, rel, key_bias), gen, TOL64)


def test_alibi_score_mod_and_no_mask(gen, path):
    """ALiBi-like ``score + slope[h] * (kv - q)`` with no mask: attend everywhere."""
    B, Hq, Q, KV, D = 2, 4, 31, 31, 8
    q, k, v = qkv(B, Hq, Hq, Q, KV, D, D, gen)
    slopes = torch.tensor([2.0 ** (-(h + 1)) for h in range(Hq)], dtype=F64)
    out = reference(q, k, v, lambda s, b, h, qi, kv: s + slopes[h] * (kv - qi), None, 0.5)
    i, j = torch.arange(Q).view(-1, 1), torch.arange(KV).view(1, -1)
    ref = truth(q, k, v, bias=slopes.view(-1, 1, 1) * (j - i), scale=0.5)
    torch.testing.assert_close(out, ref, rtol=TOL64, atol=TOL64)
    assert_grads_match(out, ref, (q, k, v), (q, k, v), gen, TOL64)
    plain = reference(q, k, v, None, None, 0.5)
    torch.testing.assert_close(plain, truth(q, k, v, scale=0.5), rtol=TOL64, atol=TOL64)


def test_softcap_score_mod_takes_the_general_path(gen):
    """A score_mod that is not a pure addition (tanh softcap, then a learnable bias) stays exact."""
    B, Hq, Hkv, Q, KV, D = 2, 4, 2, 19, 40, 8
    q, k, v = qkv(B, Hq, Hkv, Q, KV, D, D, gen)
    keep = random_keep(B, Hq, Q, KV, gen, density=0.4)
    table = randn(1, Hq, Q, KV, gen=gen, grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return 3.0 * torch.tanh(score / 3.0) + table[0, h, q_idx, kv_idx]

    out = reference(q, k, v, score_mod, indexed_mask(keep), 0.7)
    ref = truth(q, k, v, keep=keep, bias=table, scale=0.7, softcap=3.0)
    torch.testing.assert_close(out, ref, rtol=TOL64, atol=TOL64)
    assert_grads_match(out, ref, (q, k, v, table), (q, k, v, table), gen, TOL64)


@pytest.mark.parametrize(
    "name,score_mod,bias_of",
    [
        ("identity", lambda s, b, h, qi, kv: s, lambda i, j: 0.0),
        ("scalar", lambda s, b, h, qi, kv: s + 2.5, lambda i, j: 2.5),
        ("radd", lambda s, b, h, qi, kv: 0.1 * f64(kv - qi) + s, lambda i, j: 0.1 * (j - i)),
        ("sub", lambda s, b, h, qi, kv: s - 0.1 * f64(kv - qi), lambda i, j: -0.1 * (j - i)),
        ("torch.add", lambda s, b, h, qi, kv: torch.add(s, 0.05 * f64(qi)), lambda i, j: 0.05 * i + 0 * j),
        ("twice", lambda s, b, h, qi, kv: (s + 0.1 * f64(kv)) - 0.2 * f64(qi), lambda i, j: 0.1 * j - 0.2 * i),
        ("scaled", lambda s, b, h, qi, kv: 0.5 * s + 0.1 * f64(kv), None),  # not additive: general path
        ("where", lambda s, b, h, qi, kv: torch.where(kv <= qi, s, -math.inf), "causal"),
    ],
)
def test_score_mod_forms(name, score_mod, bias_of, gen):
    """Additions in any spelling are found; anything else is evaluated on the real scores."""
    B, H, Q, KV, D = 1, 2, 17, 17, 8
    q, k, v = qkv(B, H, H, Q, KV, D, D, gen)
    i, j = torch.arange(Q, dtype=F64).view(-1, 1), torch.arange(KV, dtype=F64).view(1, -1)
    out = reference(q, k, v, score_mod, None, 0.4)
    if bias_of is None:  # 0.5 * (q kᵀ · 0.4) + 0.1 kv
        ref = truth(q, k, v, bias=0.1 * j, scale=0.2)
    elif bias_of == "causal":
        ref = truth(q, k, v, keep=j <= i, scale=0.4)
    else:
        ref = truth(q, k, v, bias=torch.as_tensor(bias_of(i, j), dtype=F64), scale=0.4)
    torch.testing.assert_close(out, ref, rtol=TOL64, atol=TOL64)
    assert_grads_match(out, ref, (q, k, v), (q, k, v), gen, TOL64)


# ---------------------------------------------------------------------------------------------
# fully masked rows, -inf scores


def test_fully_masked_rows_give_zeros_and_zero_finite_grads(gen, path):
    """Dead rows (whole batch entry, single rows, rows killed by a score_mod's -inf) are exact zeros,
    and every gradient is finite, zero for those rows and zero for a batch entry with no live row."""
    B, Hq, Hkv, Q, KV, D = 2, 4, 2, 21, 34, 8
    q, k, v = qkv(B, Hq, Hkv, Q, KV, D, D, gen)
    keep = random_keep(B, Hq, Q, KV, gen, density=0.6, dead_rows=5)
    keep[0] = False  # batch 0: nothing at all
    kill = torch.zeros(B, Hq, Q, KV, dtype=F64)
    kill[1, 2, 7] = -math.inf  # a row the score_mod masks entirely
    kill[1, 1, 3, ::2] = -math.inf  # partly
    table = randn(B, Hq, Q, KV, gen=gen, grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[b, h, q_idx, kv_idx] + kill[b, h, q_idx, kv_idx]

    out = reference(q, k, v, score_mod, indexed_mask(keep), 0.3)
    ref = truth(q, k, v, keep=keep, bias=table + kill, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=TOL64, atol=TOL64)
    dead = ~(keep & (kill > -math.inf)).any(-1)
    assert dead[0].all() and dead[1, 2, 7]
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    (dq, dk, dv, dt), _ = grads(out, (q, k, v, table), gen)
    for g in (dq, dk, dv, dt):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[dead], torch.zeros_like(dq[dead]))
    assert not dk[0].any() and not dv[0].any() and not dt[0].any()
    assert not dt[1, 2, 7].any()
    out = reference(q, k, v, score_mod, indexed_mask(keep), 0.3)
    assert_grads_match(out, ref, (q, k, v, table), (q, k, v, table), gen, TOL64)


def test_all_keys_masked_everywhere(gen, path):
    q, k, v = qkv(1, 2, 1, 5, 9, 4, 4, gen)
    out = reference(q, k, v, None, lambda b, h, qi, kv: kv < 0, 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True, materialize_grads=True)
    assert not dq.any() and not dk.any() and not dv.any()


# ---------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_lower_precision_inputs_compute_in_float32(dtype, tol, gen, path):
    """Output in q's dtype; values are float32-accurate on the (rounded) inputs, grads too."""
    B, Hq, Hkv, Q, KV, D = 2, 4, 2, 33, 70, 16
    q, k, v = qkv(B, Hq, Hkv, Q, KV, D, D, gen, dtype=dtype)
    keep = random_keep(B, Hq, Q, KV, gen)
    table = randn(1, Hq, Q, KV, gen=gen, dtype=torch.float32, grad=True)
    out = reference(q, k, v, lambda s, b, h, qi, kv: s + table[0, h, qi, kv], indexed_mask(keep), 0.25)
    assert out.dtype == dtype
    twins = [t.detach().to(F64).requires_grad_() for t in (q, k, v, table)]
    ref = truth(*twins[:3], keep=keep, bias=twins[3], scale=0.25)
    # half/bf16 outputs carry their own rounding; float32 is the compute precision
    out_tol = tol if dtype != torch.float32 else 2e-6
    torch.testing.assert_close(out.to(F64), ref, rtol=out_tol, atol=out_tol)
    assert_grads_match(out, ref, (q, k, v, table), twins, gen, tol * 10)


# ---------------------------------------------------------------------------------------------
# chunking and memory


def test_chunks_are_bounded_and_change_nothing(gen, path, monkeypatch):
    """A tiny chunk budget gives many chunks of at most that many elements; numbers and grads hold."""
    B, Hq, Hkv, Q, KV, D = 2, 4, 2, 53, 71, 8
    q, k, v = qkv(B, Hq, Hkv, Q, KV, D, D, gen)
    keep = random_keep(B, Hq, Q, KV, gen)
    table = randn(B, Hq, Q, KV, gen=gen, grad=True)
    rows_seen = []

    def mask_mod(b, h, q_idx, kv_idx):
        rows_seen.append(q_idx.numel())
        return keep[b, h, q_idx, kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[b, h, q_idx, kv_idx]

    whole = reference(q, k, v, score_mod, mask_mod, 0.3)
    assert max(rows_seen) == Q  # one chunk
    budget = B * Hq * KV * 5
    monkeypatch.setattr(ref_backend, "CHUNK_ELEMENTS", budget)
    rows_seen.clear()
    out = reference(q, k, v, score_mod, mask_mod, 0.3)
    assert max(rows_seen) == 5 and len(set(rows_seen)) == 2  # 10 chunks of 5 rows, one of 3
    assert B * Hq * max(rows_seen) * KV <= budget
    torch.testing.assert_close(out, whole, rtol=TOL64, atol=TOL64)
    ref = truth(q, k, v, keep=keep, bias=table, scale=0.3)
    assert_grads_match(out, ref, (q, k, v, table), (q, k, v, table), gen, TOL64)


@pytest.mark.parametrize("bias", ["none", "fixed", "learnable", "softcap"])
def test_autograd_keeps_no_quadratic_tensor(bias, gen, monkeypatch):
    """What autograd saves for the backward stays O((Q + KV) · D), not O(Q · KV), on every path."""
    B, H, Q, KV, D = 1, 4, 256, 256, 8
    monkeypatch.setattr(ref_backend, "CHUNK_ROWS", 32)
    q, k, v = qkv(B, H, H, Q, KV, D, D, gen)
    table = randn(1, H, Q, KV, gen=gen, grad=bias == "learnable")
    mods = {
        "none": None,
        "fixed": lambda s, b, h, qi, kv: s + table[0, h, qi, kv],
        "learnable": lambda s, b, h, qi, kv: s + table[0, h, qi, kv],
        "softcap": lambda s, b, h, qi, kv: 5.0 * torch.tanh(s / 5.0),
    }
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = reference(q, k, v, mods[bias], lambda b, h, qi, kv: kv <= qi, 0.3)
    storages.pop(table.untyped_storage().data_ptr(), None)  # the captured table itself
    dense = B * H * Q * KV * 8  # one float64 score matrix
    assert sum(storages.values()) < dense / 4, sorted(storages.values())
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------
# errors


def test_mask_function_errors(gen, path):
    q, k, v = qkv(1, 2, 2, 6, 8, 4, 4, gen, grad=False)
    with pytest.raises(TypeError, match=r"bool tensor, got a torch\.int64 tensor"):
        reference(q, k, v, None, lambda b, h, qi, kv: kv - qi, 1.0)
    with pytest.raises(TypeError, match=r"bool tensor, got bool"):
        reference(q, k, v, None, lambda b, h, qi, kv: True, 1.0)
    with pytest.raises(
        ValueError, match=r"broadcastable to \[B, Hq, q_rows, kv\] = \[1, 2, 6, 8\].*got shape \[7, 8\]"
    ):
        reference(q, k, v, None, lambda b, h, qi, kv: torch.ones(7, 8, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match=r"a score_mod must return .* got shape \[3, "):
        reference(q, k, v, lambda s, b, h, qi, kv: s + torch.zeros(3, 1, 1, 1), None, 1.0)


# ---------------------------------------------------------------------------------------------
# the kernel's GQA, and a property test


def test_gqa_without_native_kernel_support(gen, monkeypatch):
    """Where the CPU kernel cannot read shared KV heads itself, KV heads are repeated: same result."""
    q, k, v = qkv(2, 6, 2, 11, 23, 8, 8, gen)
    keep = random_keep(2, 6, 11, 23, gen)
    native = reference(q, k, v, None, indexed_mask(keep), 0.3)
    monkeypatch.setattr(ref_backend, "_native_gqa", lambda: False)
    repeated = reference(q, k, v, None, indexed_mask(keep), 0.3)
    torch.testing.assert_close(native, repeated, rtol=TOL64, atol=TOL64)
    assert_grads_match(repeated, truth(q, k, v, keep=keep, scale=0.3), (q, k, v), (q, k, v), gen, TOL64)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(
        st.integers(1, 2),  # B
        st.integers(1, 3),  # Hkv
        st.sampled_from([1, 2]),  # group
        st.integers(1, 40),  # Q
        st.integers(0, 30),  # KV - Q
        st.sampled_from([4, 8]),  # D
        st.sampled_from([4, 8, 12]),  # Dv
    ),
    density=st.floats(0.0, 1.0),
    chunk_rows=st.integers(1, 64),
    seed=st.integers(0, 2**31 - 1),
    with_bias=st.booleans(),
)
def test_property_matches_truth(shape, density, chunk_rows, seed, with_bias, monkeypatch):
    B, Hkv, g, Q, extra, D, Dv = shape
    Hq, KV = Hkv * g, Q + extra
    gen = torch.Generator().manual_seed(seed)
    monkeypatch.setattr(ref_backend, "CHUNK_ROWS", chunk_rows)
    q, k, v = qkv(B, Hq, Hkv, Q, KV, D, Dv, gen)
    keep = random_keep(B, Hq, Q, KV, gen, density=density, dead_rows=1)
    table = randn(B, 1, Q, KV, gen=gen, grad=True)
    score_mod = (lambda s, b, h, qi, kv: s + table[b, 0, qi, kv]) if with_bias else None
    out = reference(q, k, v, score_mod, indexed_mask(keep), 0.35)
    ref = truth(q, k, v, keep=keep, bias=table if with_bias else None, scale=0.35)
    torch.testing.assert_close(out, ref, rtol=TOL64, atol=TOL64)
    inputs = (q, k, v, table) if with_bias else (q, k, v)
    assert_grads_match(out, ref, inputs, inputs, gen, TOL64)


def test_float32_inputs_under_a_float64_default_dtype(gen):
    q, k, v = qkv(1, 2, 2, 9, 14, 8, 8, gen, dtype=torch.float32)
    keep = random_keep(1, 2, 9, 14, gen)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = reference(q, k, v, lambda s, b, h, qi, kv: s + 0.1 * (kv - qi), indexed_mask(keep), 0.3)
    finally:
        torch.set_default_dtype(old)
    assert out.dtype == torch.float32
    i, j = torch.arange(9).view(-1, 1), torch.arange(14).view(1, -1)
    ref = truth(q, k, v, keep=keep, bias=0.1 * (j - i), scale=0.3)
    torch.testing.assert_close(out.to(F64), ref, rtol=2e-6, atol=2e-6)


def test_traces_as_one_graph_under_torch_compile(gen):
    """Under torch.compile the data-dependent steps are skipped: one graph, same numbers."""
    q, k, v = qkv(2, 4, 2, 21, 30, 8, 8, gen, grad=False)
    table = randn(1, 4, 21, 30, gen=gen)

    def attend(q, k, v):
        return reference(
            q, k, v, lambda s, b, h, qi, kv: s + table[0, h, qi, kv], lambda b, h, qi, kv: kv <= qi + 9, 0.3
        )

    torch._dynamo.reset()
    explain = torch._dynamo.explain(attend)(q, k, v)
    assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
    compiled = torch.compile(attend, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), rtol=TOL64, atol=TOL64)
