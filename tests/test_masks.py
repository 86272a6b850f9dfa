"""The mask algebra against truth tables computed independently, in numpy, from the definitions.

Nothing here uses flexmask to produce the truth: each primitive's truth is its formula from the
issue on absolute positions (queries are the last ``q_len`` of ``kv_len`` positions), combined
with numpy's ``&``, ``|``, ``~``; BlockMasks are decoded by the test's own loop.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

import flexmask as fm

from ._lowering import Layout, block_mask_for
from ._reference import ref_attention

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# independent truth


def positions(q_len: int, kv_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Absolute query positions ``i`` as a column and key positions ``j`` as a row."""
    i = np.arange(kv_len - q_len, kv_len)[:, None]
    j = np.arange(kv_len)[None, :]
    return i, j


def hash_rule_np(i, j):
    return (i * 7 + j * 3) % 5 < 3


def hash_rule(b, h, q_idx, kv_idx):
    """A custom mask with no structure a block classifier could exploit."""
    return (q_idx * 7 + kv_idx * 3) % 5 < 3


def realize(spec, B: int, Q: int, KV: int) -> tuple[fm.Mask, np.ndarray]:
    """The flexmask mask of an expression spec and its truth table ``[B, Q, KV]`` (numpy bool).

    A spec is a tuple: ``("and", a, b)``, ``("or", a, b)``, ``("not", a)`` or a leaf. Leaves with
    tensors carry a seed; their tensors are drawn from it for the given B and KV.
    """
    kind = spec[0]
    if kind in ("and", "or"):
        ma, ta = realize(spec[1], B, Q, KV)
        mb, tb = realize(spec[2], B, Q, KV)
        return (ma & mb, ta & tb) if kind == "and" else (ma | mb, ta | tb)
    if kind == "not":
        m, t = realize(spec[1], B, Q, KV)
        return ~m, ~t

    i, j = positions(Q, KV)
    if kind == "full":
        m, t = fm.full(), np.ones((Q, KV), bool)
    elif kind == "causal":
        m, t = fm.causal(), j <= i
    elif kind == "window":
        s = spec[1]
        m, t = fm.sliding_window(s), (i - s < j) & (j <= i)
    elif kind == "chunked":
        s = spec[1]
        m, t = fm.chunked(s), (i // s) == (j // s)
    elif kind == "prefix":
        n = spec[1]
        m, t = fm.prefix_lm(n), (j < n) | (j <= i)
    elif kind == "custom":
        m, t = fm.mask(hash_rule, name="hash"), hash_rule_np(i, j)
    else:
        per_batch, seed = spec[1], spec[-1]
        rng = np.random.default_rng(seed)
        nb = B if per_batch else 1
        if kind == "prefix_t":
            n = rng.integers(0, KV + 1, nb)
            m = fm.prefix_lm(torch.from_numpy(n))
            t = (j[None] < n[:, None, None]) | (j <= i)[None]
        elif kind == "pad":
            n = rng.integers(0, KV + 1, nb)
            m = fm.padding(torch.from_numpy(n).to(torch.int32))
            t = np.broadcast_to(j[None] < n[:, None, None], (nb, Q, KV))
        elif kind == "doc":
            ids = rng.integers(0, 4, (nb, KV))
            if spec[2]:
                ids = np.sort(ids, axis=1)
            m = fm.document(torch.from_numpy(ids))
            t = ids[:, i[:, 0]][:, :, None] == ids[:, None, :]
        else:
            raise AssertionError(spec)
    return m, np.broadcast_to(t, (B, Q, KV))


def dense(m: fm.Mask, B: int, Q: int, KV: int) -> np.ndarray:
    """flexmask's own dense evaluation, as numpy ``[B, Q, KV]`` (heads = 1)."""
    d = m.to_dense(Q, KV, batch=B)
    assert d.shape == (B, 1, Q, KV) and d.dtype == torch.bool
    return d[:, 0].numpy()


# ---------------------------------------------------------------------------------------------
# reading a BlockMask (the test's own decoding)


def decode(num: torch.Tensor, idx: torch.Tensor, n_kv: int) -> np.ndarray:
    """``[b, h, nQ, nK]`` booleans from a (num_blocks, indices) pair, checking the indices."""
    num, idx = num.numpy(), idx.numpy()
    out = np.zeros(num.shape + (n_kv,), bool)
    for pos in np.ndindex(*num.shape):
        listed = idx[pos][: num[pos]]
        assert ((listed >= 0) & (listed < n_kv)).all(), f"block index out of range at {pos}: {listed}"
        assert len(set(listed.tolist())) == len(listed), f"repeated block index at {pos}: {listed}"
        out[pos + (listed,)] = True
    return out


def block_truth(t: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (q block, kv block): does the truth keep any entry / every (in-range) entry."""
    B, Q, KV = t.shape
    nq, nk = -(-Q // bs), -(-KV // bs)
    any_, all_ = np.zeros((B, nq, nk), bool), np.zeros((B, nq, nk), bool)
    for r in range(nq):
        for c in range(nk):
            blk = t[:, r * bs : (r + 1) * bs, c * bs : (c + 1) * bs]
            any_[:, r, c] = blk.any(axis=(1, 2))
            all_[:, r, c] = blk.all(axis=(1, 2))
    return any_, all_


def expand_blocks(x: np.ndarray, bs: int, Q: int, KV: int) -> np.ndarray:
    return np.repeat(np.repeat(x, bs, axis=-2), bs, axis=-1)[..., :Q, :KV]


def check_block_mask(bm, truth: np.ndarray, bs: int, head: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Soundness of ``bm`` (one head) against ``truth [B, Q, KV]``; returns (partial, full) ``[B, nQ, nK]``."""
    B, Q, KV = truth.shape
    nq, nk = -(-Q // bs), -(-KV // bs)
    assert tuple(bm.seq_lengths) == (Q, KV)
    assert tuple(bm.BLOCK_SIZE) == (bs, bs)
    assert bm.kv_num_blocks.shape[0] in (1, B) and bm.kv_num_blocks.shape[2:] == (nq,)
    assert bm.kv_indices.shape[-2:] == (nq, nk)
    partial = decode(bm.kv_num_blocks, bm.kv_indices, nk)
    full = decode(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    assert not (partial & full).any(), "a block is listed both as partial and as full"
    # torch's own reading of the BlockMask agrees with ours
    np.testing.assert_array_equal(partial | full, bm.to_dense().bool().numpy())
    # the query-side lists (what the backward pass walks) are the transposes of the key-side ones
    q_partial = decode(bm.q_num_blocks, bm.q_indices, nq)
    q_full = decode(bm.full_q_num_blocks, bm.full_q_indices, nq)
    np.testing.assert_array_equal(q_partial, partial.swapaxes(-1, -2))
    np.testing.assert_array_equal(q_full, full.swapaxes(-1, -2))

    hh = head if partial.shape[1] > 1 else 0
    partial = np.broadcast_to(partial[:, hh], (B, nq, nk))
    full = np.broadcast_to(full[:, hh], (B, nq, nk))
    t_any, t_all = block_truth(truth, bs)
    assert (t_all | ~full).all(), "a FULL block holds a masked entry"
    assert ((partial | full) | ~t_any).all(), "a skipped (EMPTY) block holds a kept entry"

    # What a flex kernel computes: full blocks keep everything, partial ones run the mask_mod
    # (call-local query index), the rest are dropped.
    b = torch.arange(B).view(-1, 1, 1, 1)
    h = torch.full((1, 1, 1, 1), head)
    q = torch.arange(Q).view(1, 1, -1, 1)
    kv = torch.arange(KV).view(1, 1, 1, -1)
    mod = torch.as_tensor(bm.mask_mod(b, h, q, kv)).expand(B, 1, Q, KV)[:, 0].numpy()
    effective = np.where(expand_blocks(full, bs, Q, KV), True, np.where(expand_blocks(partial, bs, Q, KV), mod, False))
    np.testing.assert_array_equal(effective, truth)
    return partial, full


# ---------------------------------------------------------------------------------------------
# strategies

seeds = st.integers(0, 2**32 - 1)
LEAVES = st.one_of(
    st.just(("full",)),
    st.just(("causal",)),
    st.tuples(st.just("window"), st.integers(1, 40)),
    st.tuples(st.just("chunked"), st.integers(1, 40)),
    st.tuples(st.just("prefix"), st.integers(0, 40)),
    st.tuples(st.just("prefix_t"), st.booleans(), seeds),
    st.tuples(st.just("pad"), st.booleans(), seeds),
    st.tuples(st.just("doc"), st.booleans(), st.booleans(), seeds),
    st.just(("custom",)),
)
TREES = st.recursive(
    LEAVES,
    lambda c: st.one_of(st.tuples(st.just("and"), c, c), st.tuples(st.just("or"), c, c), st.tuples(st.just("not"), c)),
    max_leaves=6,
)


@st.composite
def shapes(draw):
    B = draw(st.integers(1, 3))
    KV = draw(st.integers(1, 90))
    Q = draw(st.integers(1, KV))
    bs = draw(st.sampled_from([16, 32, 64]))
    return B, Q, KV, bs


# ---------------------------------------------------------------------------------------------
# property tests


@SETTINGS
@given(spec=TREES, shape=shapes())
def test_expression_tree_matches_truth_table(spec, shape):
    B, Q, KV, _ = shape
    m, truth = realize(spec, B, Q, KV)
    np.testing.assert_array_equal(dense(m, B, Q, KV), truth)


@SETTINGS
@given(spec=TREES, shape=shapes())
def test_block_mask_is_sound_for_expression_trees(spec, shape):
    B, Q, KV, bs = shape
    m, truth = realize(spec, B, Q, KV)
    check_block_mask(m.block_mask(Q, KV, batch=B, block_size=bs), truth, bs)


EXACT_LEAVES = st.one_of(
    st.just(("full",)),
    st.just(("causal",)),
    st.tuples(st.just("window"), st.integers(1, 70)),
    st.tuples(st.just("chunked"), st.integers(1, 70)),
    st.tuples(st.just("prefix"), st.integers(0, 70)),
    st.tuples(st.just("prefix_t"), st.booleans(), seeds),
    st.tuples(st.just("pad"), st.booleans(), seeds),
    st.tuples(st.just("doc"), st.booleans(), st.just(True), seeds),  # sorted ids: exact
    st.just(("custom",)),
)


@SETTINGS
@given(leaf=EXACT_LEAVES, negate=st.booleans(), shape=shapes())
def test_block_classification_is_exact_for_primitives(leaf, negate, shape):
    """For each primitive (and its negation) EMPTY/PARTIAL/FULL are exactly the truth's blocks."""
    B, Q, KV, bs = shape
    m, truth = realize(("not", leaf) if negate else leaf, B, Q, KV)
    partial, full = check_block_mask(m.block_mask(Q, KV, batch=B, block_size=bs), truth, bs)
    t_any, t_all = block_truth(truth, bs)
    np.testing.assert_array_equal(full, t_all)
    np.testing.assert_array_equal(partial | full, t_any)


def block_states(m: fm.Mask, B: int, Q: int, KV: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept = partial | full, full) block maps ``[B, nQ, nK]`` of ``m``'s BlockMask."""
    bm = m.block_mask(Q, KV, batch=B, block_size=bs)
    nq, nk = -(-Q // bs), -(-KV // bs)
    partial = decode(bm.kv_num_blocks, bm.kv_indices, nk)[:, 0]
    full = decode(bm.full_kv_num_blocks, bm.full_kv_indices, nk)[:, 0]
    return np.broadcast_to(partial | full, (B, nq, nk)), np.broadcast_to(full, (B, nq, nk))


@SETTINGS
@given(a=TREES, b=TREES, shape=shapes())
def test_combinators_keep_every_block_they_can(a, b, shape):
    """``&`` is exact on FULL and ``|`` on kept blocks; ``~`` swaps them; none loses information."""
    B, Q, KV, bs = shape
    (ma, _), (mb, _) = realize(a, B, Q, KV), realize(b, B, Q, KV)
    kept_a, full_a = block_states(ma, B, Q, KV, bs)
    kept_b, full_b = block_states(mb, B, Q, KV, bs)
    kept_and, full_and = block_states(ma & mb, B, Q, KV, bs)
    kept_or, full_or = block_states(ma | mb, B, Q, KV, bs)
    kept_not, full_not = block_states(~ma, B, Q, KV, bs)
    np.testing.assert_array_equal(full_and, full_a & full_b)
    np.testing.assert_array_equal(kept_or, kept_a | kept_b)
    assert (full_or >= (full_a | full_b)).all(), "`|` dropped a block that one side keeps whole"
    assert (kept_and <= (kept_a & kept_b)).all()
    np.testing.assert_array_equal(full_not, ~kept_a)
    np.testing.assert_array_equal(kept_not, ~full_a)


@pytest.mark.parametrize("Q, KV", [(37, 37), (13, 37), (24, 40)])
@pytest.mark.parametrize("bs", [4, 8])
@pytest.mark.parametrize("kind", ["window", "chunked", "prefix"])
def test_structured_classification_is_exact_for_every_size(kind, bs, Q, KV):
    """Every size from 1 to past KV, with small blocks: catches off-by-one block boundaries."""
    for size in range(0 if kind == "prefix" else 1, KV + 3):
        m, truth = realize((kind, size), 1, Q, KV)
        partial, full = check_block_mask(m.block_mask(Q, KV, block_size=bs), truth, bs)
        t_any, t_all = block_truth(truth, bs)
        np.testing.assert_array_equal(full, t_all, err_msg=f"{kind}({size})")
        np.testing.assert_array_equal(partial | full, t_any, err_msg=f"{kind}({size})")


@SETTINGS
@given(a=TREES, b=TREES, c=TREES, shape=shapes())
def test_identities_and_de_morgan(a, b, c, shape):
    B, Q, KV, _ = shape
    (ma, ta), (mb, _), (mc, _) = (realize(s, B, Q, KV) for s in (a, b, c))
    everything = np.ones((B, Q, KV), bool)

    def same(x, y):
        np.testing.assert_array_equal(dense(x, B, Q, KV), dense(y, B, Q, KV))

    np.testing.assert_array_equal(dense(ma & fm.full(), B, Q, KV), ta)
    np.testing.assert_array_equal(dense(ma | fm.full(), B, Q, KV), everything)
    np.testing.assert_array_equal(dense(ma | ~ma, B, Q, KV), everything)
    np.testing.assert_array_equal(dense(ma & ~ma, B, Q, KV), ~everything)
    np.testing.assert_array_equal(dense(~~ma, B, Q, KV), ta)
    same(ma & ma, ma)
    same(ma | ma, ma)
    same(~(ma & mb), ~ma | ~mb)
    same(~(ma | mb), ~ma & ~mb)
    same(ma & mb, mb & ma)
    same(ma | mb, mb | ma)
    same((ma & mb) & mc, ma & (mb & mc))
    same(ma & (mb | mc), (ma & mb) | (ma & mc))
    same(ma | (mb & mc), (ma | mb) & (ma | mc))


@SETTINGS
@given(a=TREES, shape=shapes())
def test_block_states_survive_double_negation_and_identity(a, shape):
    """``~~m`` and ``m & full()`` classify every block exactly as ``m`` does."""
    B, Q, KV, bs = shape
    m, _ = realize(a, B, Q, KV)

    def states(x):
        bm = x.block_mask(Q, KV, batch=B, block_size=bs)
        nk = bm.kv_indices.shape[-1]
        return decode(bm.kv_num_blocks, bm.kv_indices, nk), decode(bm.full_kv_num_blocks, bm.full_kv_indices, nk)

    for other in (~~m, m & fm.full(), fm.full() & m):
        for x, y in zip(states(m), states(other), strict=True):
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# hand-picked cases


@pytest.mark.parametrize(
    "expr, rows",
    [
        (lambda: fm.causal(), [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),
        (lambda: fm.sliding_window(2), [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),
        (lambda: fm.chunked(2), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]),
        (lambda: fm.prefix_lm(2), [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),
        (lambda: fm.padding(torch.tensor([3])), [[1, 1, 1, 0]] * 4),
        (lambda: fm.document(torch.tensor([[0, 0, 1, 1]])), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]),
        (lambda: ~fm.causal(), [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]),
    ],
)
def test_small_masks_by_hand(expr, rows):
    """The definitions of the issue, written out for N = 4."""
    np.testing.assert_array_equal(expr().to_dense(4, 4)[0, 0].int().numpy(), np.array(rows))


def test_queries_are_the_last_positions():
    # q_len 2 of kv_len 5: queries sit at absolute positions 3 and 4
    got = fm.causal().to_dense(2, 5)[0, 0].int().tolist()
    assert got == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    got = fm.sliding_window(2).to_dense(1, 5)[0, 0].int().tolist()
    assert got == [[0, 0, 0, 1, 1]]


def test_to_dense_batch_and_heads_defaults():
    ids = torch.tensor([[0, 0, 1], [0, 1, 1]])
    d = fm.document(ids).to_dense(3, 3)
    assert d.shape == (2, 1, 3, 3)  # batch from the ids
    assert fm.causal().to_dense(3, 3).shape == (1, 1, 3, 3)
    d = fm.causal().to_dense(2, 3, batch=2, heads=4)
    assert d.shape == (2, 4, 2, 3)
    assert d.all(dim=(0, 1)).eq(d[0, 0]).all() and d.any(dim=(0, 1)).eq(d[0, 0]).all()


def test_head_dependent_custom_mask(gen):
    """A custom mask of ``h``: dense and block level agree with the truth for every head."""
    H, Q, KV, bs = 3, 37, 50, 16

    def per_head(b, h, q_idx, kv_idx):
        return (kv_idx % (h + 2)) == 0

    m = fm.causal() & fm.mask(per_head)
    i, j = positions(Q, KV)
    truth = np.stack([(j <= i) & (j % (h + 2) == 0) for h in range(H)])  # [H, Q, KV]
    np.testing.assert_array_equal(m.to_dense(Q, KV, heads=H)[0].numpy(), truth)
    bm = m.block_mask(Q, KV, heads=H, block_size=bs)
    assert bm.kv_num_blocks.shape[:2] == (1, H)
    for h in range(H):
        check_block_mask(bm, truth[h][None], bs, head=h)


def test_block_mask_dims_follow_the_mask():
    assert fm.causal().block_mask(40, 40, block_size=16).kv_num_blocks.shape == (1, 1, 3)
    ids = torch.zeros(3, 40, dtype=torch.long)
    assert fm.document(ids).block_mask(40, 40, block_size=16).kv_num_blocks.shape == (3, 1, 3)
    # a batch-1 tensor broadcasts over a larger batch
    bm = (fm.causal() & fm.document(ids[:1])).block_mask(40, 40, batch=5, block_size=16)
    assert bm.kv_num_blocks.shape[0] in (1, 5)


@pytest.mark.parametrize("N, bs", [(96, 16), (100, 16), (75, 32)])
@pytest.mark.parametrize(
    "make",
    [
        lambda g, N: fm.causal(),
        lambda g, N: fm.sliding_window(20),
        lambda g, N: fm.causal() & fm.sliding_window(33),
        lambda g, N: fm.causal() & fm.chunked(24),
        lambda g, N: fm.prefix_lm(10),
        lambda g, N: fm.causal() & fm.document(torch.randint(0, 4, (2, N), generator=g).sort(-1).values),
        lambda g, N: fm.padding(torch.randint(0, N + 1, (2,), generator=g)),
    ],
)
def test_agrees_with_torch_create_block_mask(make, N, bs, gen):
    """Structural builder vs torch's (eager) create_block_mask on the same mask_mod."""
    m = make(gen, N)
    B = m.to_dense(N, N).shape[0]
    ours = m.block_mask(N, N, batch=B, block_size=bs)
    theirs = create_block_mask(m.mask_mod, B, 1, N, N, device="cpu", BLOCK_SIZE=bs, _compile=False)
    nk = -(-N // bs)
    o_part = decode(ours.kv_num_blocks, ours.kv_indices, nk)
    o_full = decode(ours.full_kv_num_blocks, ours.full_kv_indices, nk)
    t_part = decode(theirs.kv_num_blocks, theirs.kv_indices, nk)
    t_full = decode(theirs.full_kv_num_blocks, theirs.full_kv_indices, nk)
    shape = (B, 1, nk, nk)
    o_part, o_full, t_part, t_full = (np.broadcast_to(x, shape) for x in (o_part, o_full, t_part, t_full))
    np.testing.assert_array_equal(o_part | o_full, t_part | t_full)
    # torch pads a ragged last block with False, so it never calls it full; compare the rest
    inner = slice(None, nk - 1) if N % bs else slice(None)
    np.testing.assert_array_equal(o_full[..., inner, inner], t_full[..., inner, inner])
    # torch's dense evaluation of our mask_mod (vmap, as flex uses it) matches the dense path
    dense_torch = create_mask(m.mask_mod, B, 1, N, N, device="cpu")
    assert torch.equal(dense_torch, m.to_dense(N, N, batch=B))


def test_structural_builder_large_n_never_materialises_n_squared():
    """N = 131072: a dense N² map would be 17 GB; the structural one is 1024² small integers."""
    N, w = 1 << 17, 2048
    bm = (fm.causal() & fm.sliding_window(w)).block_mask(N, N)
    full = bm.full_kv_num_blocks.flatten()
    part = bm.kv_num_blocks.flatten()
    r = torch.arange(full.numel())
    # q block r (r >= 16): kv blocks r-15 .. r-1 full, block r-16 and the diagonal partial
    assert torch.equal(full, torch.clamp(r, max=w // 128 - 1).to(full.dtype))
    assert torch.equal(part, torch.where(r >= w // 128, 2, 1).to(part.dtype))


# ---------------------------------------------------------------------------------------------
# block masks run through torch's (eager) flex_attention


FLEX_CASES = {
    "causal": ("causal",),
    "window_or_prefix": ("and", ("causal",), ("or", ("window", 9), ("prefix", 5))),
    "doc_causal": ("and", ("causal",), ("doc", True, True, 11)),
    "padding_custom": ("and", ("pad", True, 12), ("custom",)),
    "not_chunked": ("not", ("chunked", 20)),
    "prefix_t_or_not_doc": ("or", ("prefix_t", True, 13), ("not", ("doc", False, False, 14))),
}


def run_eager_flex(q, k, v, bm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        return flex_attention(q, k, v, block_mask=bm, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("name", list(FLEX_CASES))
@pytest.mark.parametrize("Q, KV", [(45, 77), (33, 33)])
def test_block_mask_runs_in_eager_flex_attention(name, Q, KV, gen):
    B, Hq, Hkv, D = 2, 4, 2, 8
    m, truth = realize(FLEX_CASES[name], B, Q, KV)
    q = torch.randn(B, Hq, Q, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, KV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, KV, D, generator=gen, dtype=torch.float64)
    out = run_eager_flex(q, k, v, m.block_mask(Q, KV, batch=B, block_size=16))
    ref = ref_attention(q, k, v, keep=torch.from_numpy(truth.copy())[:, None])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_in_eager_flex_attention(gen):
    """Batch row 0 keeps no key at all; ``~causal()`` leaves the last query with no key."""
    B, H, Q, KV, D = 2, 2, 21, 40, 8
    m = fm.padding(torch.tensor([0, KV])) & ~fm.causal()
    i, j = positions(Q, KV)
    truth = np.stack([np.zeros((Q, KV), bool), j > i])
    q, k, v = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for n in (Q, KV, KV))
    out = run_eager_flex(q, k, v, m.block_mask(Q, KV, block_size=16))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :, -1], torch.zeros_like(out[1, :, -1]))
    torch.testing.assert_close(
        out, ref_attention(q, k, v, keep=torch.from_numpy(truth)[:, None]), rtol=1e-10, atol=1e-10
    )


# ---------------------------------------------------------------------------------------------
# repr and the BlockMask cache


def test_repr_reads_like_the_expression():
    ids = torch.zeros(2, 8, dtype=torch.long)
    m = fm.causal() & (fm.sliding_window(4) | fm.prefix_lm(2))
    assert repr(m) == "causal() & (sliding_window(4) | prefix_lm(2))"
    assert repr(fm.causal() | fm.sliding_window(4) & fm.chunked(3)) == "causal() | sliding_window(4) & chunked(3)"
    assert repr(~(fm.causal() & fm.full())) == "~(causal() & full())"
    assert repr(~fm.causal() | fm.document(ids)) == "~causal() | document(<ids (2, 8)>)"
    assert repr(fm.padding(torch.tensor([3, 4]))) == "padding(<lengths (2,)>)"
    assert repr(fm.mask(hash_rule)) == "mask(hash_rule)"


def test_structural_cache_reuses_block_masks():
    layout = Layout(1, 1, 300, 300, torch.device("cpu"))
    a = block_mask_for(fm.causal() & fm.sliding_window(64), layout)
    b = block_mask_for(fm.causal() & fm.sliding_window(64), layout)  # a new, equal expression
    c = block_mask_for(fm.causal() & fm.sliding_window(65), layout)
    assert a is b and a is not c


def test_cache_sees_in_place_updates_of_mask_tensors():
    """A document mask over a persistent ids buffer refilled in place must not reuse a stale map."""
    N, bs = 64, 16
    ids = torch.zeros(1, N, dtype=torch.long)
    m = fm.document(ids)
    layout = Layout(1, 1, N, N, torch.device("cpu"))
    first = block_mask_for(m, layout, bs)
    assert block_mask_for(m, layout, bs) is first  # unchanged tensors: cached
    ids[:, N // 2 :] = 1  # two documents now
    i, j = positions(N, N)
    idn = ids[0].numpy()
    check_block_mask(block_mask_for(m, layout, bs), (idn[i] == idn[j])[None], bs)


def test_block_mask_index_tensors_are_contiguous():
    """flex's GPU kernels read a BlockMask's index tensors as row-major: every one must be contiguous
    (a strided q-side order once gave wrong backward gradients on an H100)."""
    ids = torch.tensor([[0] * 100 + [1] * 200])
    scores = torch.randn(1, 2, 300)
    for mask in (fm.causal() & fm.sliding_window(50), fm.causal() & fm.document(ids), fm.topk_blocks(scores, 1)):
        bm = mask.block_mask(300, 300, heads=2, block_size=64)
        tensors = (
            bm.kv_num_blocks,
            bm.kv_indices,
            bm.full_kv_num_blocks,
            bm.full_kv_indices,
            bm.q_num_blocks,
            bm.q_indices,
            bm.full_q_num_blocks,
            bm.full_q_indices,
        )
        assert all(t.is_contiguous() for t in tensors), repr(mask)


@pytest.mark.parametrize("q_len", [700, 300])
def test_block_index_tensors_batched_and_one_by_one_agree(monkeypatch, q_len):
    """Small block maps are ordered in one batch, large ones one by one: both give the same BlockMask."""
    from flexmask.lowering import blocks

    scores = torch.randn(2, 4, 700)
    names = (
        "kv_num_blocks",
        "kv_indices",
        "full_kv_num_blocks",
        "full_kv_indices",
        "q_num_blocks",
        "q_indices",
        "full_q_num_blocks",
        "full_q_indices",
    )
    for mask in (fm.topk_blocks(scores, 2, block_size=64), fm.causal() & fm.sliding_window(100)):
        batched = mask.block_mask(q_len, 700, batch=2, heads=4, block_size=64)
        monkeypatch.setattr(blocks, "_BATCH_LIMIT", 0)
        single = mask.block_mask(q_len, 700, batch=2, heads=4, block_size=64)
        monkeypatch.undo()
        for name in names:
            assert torch.equal(getattr(batched, name), getattr(single, name)), (repr(mask), name)


@SETTINGS
@given(spec=TREES, shape=shapes(), tokens=st.booleans(), seed=seeds)
def test_dropping_an_implied_causal_factor_changes_nothing(spec, shape, tokens, seed):
    """``_essential()`` (what the planner lowers) drops ``fm.causal()`` beside a factor that implies it
    and nothing else: the dense masks agree, for content selections and any other tree."""
    B, Q, KV, _ = shape
    m, _ = realize(spec, B, Q, KV)
    s = torch.from_numpy(np.random.default_rng(seed).standard_normal((B, 1, KV)))
    sel = fm.topk(s, 5) if tokens else fm.topk_blocks(s, 1, block_size=8)
    causal = fm.causal()
    ids = torch.from_numpy(np.sort(np.random.default_rng(seed + 1).integers(0, 3, (B, KV)), axis=1))
    docs = fm.document(ids)
    packed = fm.topk(s, 5, among=fm.document(ids))  # the same ids tensor: implies `docs`
    for expr in (causal & sel, sel & causal, causal & (m & causal), (causal & sel) & m, m, causal & docs & packed):
        essential = expr._essential()
        np.testing.assert_array_equal(dense(essential, B, Q, KV), dense(expr, B, Q, KV))
    assert (causal & sel)._essential() is sel
    assert ((causal & docs) & packed)._essential() is packed  # how fm.hf meets packed sequences
    other = fm.document(ids.clone())  # equal ids, another tensor: not known to be implied
    assert (other & packed)._essential() is not packed
    valid = torch.from_numpy(np.random.default_rng(seed + 2).random((B, KV)) < 0.8)
    keys = fm.key_mask(valid)
    padded = fm.topk(s, 5, among=fm.document(ids) & fm.key_mask(valid))  # how fm.hf meets padding
    expr = causal & keys & padded
    np.testing.assert_array_equal(dense(expr._essential(), B, Q, KV), dense(expr, B, Q, KV))
    assert expr._essential() is padded
