"""Bad input fails at flexmask's boundary with a ValueError/TypeError that names the argument."""

from __future__ import annotations

import pytest
import torch

import flexmask as fm

B, HQ, HKV, Q, KV, D = 2, 4, 2, 6, 10, 8


def qkv(**changes):
    """Valid float32 q, k, v, with some replaced."""
    t = {
        "q": torch.randn(B, HQ, Q, D),
        "k": torch.randn(B, HKV, KV, D),
        "v": torch.randn(B, HKV, KV, D),
    }
    t.update(changes)
    return t["q"], t["k"], t["v"]


def attend(mask=None, bias=None, **changes):
    q, k, v = qkv(**changes)
    return fm.attention(q, k, v, mask=mask, bias=bias)


ids = torch.zeros(B, KV, dtype=torch.long)

CASES = {
    # q, k, v
    "q_not_tensor": (lambda: attend(q=[[1.0]]), TypeError, r"q must be a torch\.Tensor, got list"),
    "k_not_tensor": (lambda: attend(k=None), TypeError, r"k must be a torch\.Tensor, got NoneType"),
    "q_3d": (lambda: attend(q=torch.randn(HQ, Q, D)), ValueError, r"q must be 4-D .*got shape \(4, 6, 8\)"),
    "v_5d": (lambda: attend(v=torch.randn(1, B, HKV, KV, D)), ValueError, r"v must be 4-D"),
    "q_int": (lambda: attend(q=torch.ones(B, HQ, Q, D, dtype=torch.long)), TypeError, r"q must be a floating"),
    "q_empty": (lambda: attend(q=torch.randn(B, HQ, 0, D)), ValueError, r"q must have no empty dimension"),
    "head_dims": (lambda: attend(k=torch.randn(B, HKV, KV, D + 1)), ValueError, r"q and k must share head_dim"),
    "gqa_ratio": (
        lambda: attend(k=torch.randn(B, 3, KV, D), v=torch.randn(B, 3, KV, D)),
        ValueError,
        r"query heads \(4\) must be a multiple of the key/value heads \(3\)",
    ),
    "kv_heads_differ": (lambda: attend(v=torch.randn(B, 1, KV, D)), ValueError, r"k and v must have the same heads"),
    "kv_len_differ": (lambda: attend(v=torch.randn(B, HKV, KV + 1, D)), ValueError, r"k and v must have the same"),
    "batch": (lambda: attend(k=torch.randn(B + 1, HKV, KV, D)), ValueError, r"batch size"),
    "dtype": (
        lambda: attend(v=torch.randn(B, HKV, KV, D, dtype=torch.float64)),
        TypeError,
        r"share a dtype.*float32.*float64",
    ),
    "device": (lambda: attend(k=torch.randn(B, HKV, KV, D, device="meta")), ValueError, r"k is on the meta device"),
    "q_longer_than_kv": (lambda: attend(q=torch.randn(B, HQ, KV + 1, D)), ValueError, r"q_len must be <= kv_len"),
    # other arguments of attention
    "mask_is_function": (lambda: attend(mask=lambda b, h, q, kv: kv <= q), TypeError, r"mask must be a flexmask mask"),
    "bias_is_tensor": (lambda: attend(bias=torch.zeros(HQ)), TypeError, r"bias must be a flexmask bias"),
    "scale_nan": (lambda: fm.attention(*qkv(), scale=float("nan")), ValueError, r"scale must be a finite number"),
    "scale_str": (lambda: fm.attention(*qkv(), scale="1"), ValueError, r"scale"),
    "softcap_zero": (lambda: fm.attention(*qkv(), softcap=0.0), ValueError, r"softcap must be a positive"),
    "softcap_negative": (lambda: fm.attention(*qkv(), softcap=-3), ValueError, r"softcap"),
    "softcap_inf": (lambda: fm.attention(*qkv(), softcap=float("inf")), ValueError, r"softcap.*finite"),
    "backend_unknown": (lambda: fm.attention(*qkv(), backend="triton"), ValueError, r"backend must be"),
    # sizes <= 0
    "window_0": (lambda: fm.sliding_window(0), ValueError, r"size must be a positive int, got 0"),
    "window_float": (lambda: fm.sliding_window(2.5), TypeError, r"size must be an int"),
    "window_bool": (lambda: fm.sliding_window(True), TypeError, r"size must be an int"),
    "chunked_negative": (lambda: fm.chunked(-1), ValueError, r"size must be a positive int, got -1"),
    "prefix_negative": (lambda: fm.prefix_lm(-2), ValueError, r"length must be >= 0, got -2"),
    "prefix_float": (lambda: fm.prefix_lm(2.0), TypeError, r"length must be an int"),
    "block_size_0": (lambda: fm.causal().block_mask(8, 8, block_size=0), ValueError, r"block_size must be a positive"),
    "block_size_float": (
        lambda: fm.causal().block_mask(8, 8, block_size=64.0),
        TypeError,
        r"block_size must be an int",
    ),
    "q_len_0": (lambda: fm.causal().to_dense(0, 8), ValueError, r"q_len must be a positive int, got 0"),
    "kv_len_negative": (lambda: fm.causal().block_mask(4, -8), ValueError, r"kv_len must be a positive int"),
    "to_dense_q_gt_kv": (lambda: fm.causal().to_dense(9, 8), ValueError, r"q_len=9 is larger than kv_len=8"),
    "block_mask_q_gt_kv": (lambda: fm.causal().block_mask(9, 8), ValueError, r"q_len=9 is larger than kv_len=8"),
    "heads_0": (lambda: fm.causal().to_dense(4, 4, heads=0), ValueError, r"heads must be a positive int"),
    "batch_0": (lambda: fm.causal().block_mask(4, 4, batch=0), ValueError, r"batch must be a positive int"),
    "alibi_0": (lambda: fm.alibi(0), ValueError, r"alibi num_heads must be a positive int, got 0"),
    # document ids
    "ids_not_tensor": (lambda: fm.document([[0, 1]]), TypeError, r"document ids must be an int tensor.*got list"),
    "ids_float": (
        lambda: fm.document(torch.zeros(1, 4)),
        ValueError,
        r"document ids must be an integer tensor.*float32",
    ),
    "ids_bool": (lambda: fm.document(torch.zeros(1, 4, dtype=torch.bool)), ValueError, r"document ids.*bool"),
    "ids_1d": (lambda: fm.document(torch.zeros(4, dtype=torch.long)), ValueError, r"document ids.*shape \(4,\)"),
    "ids_empty": (
        lambda: fm.document(torch.zeros(1, 0, dtype=torch.long)),
        ValueError,
        r"document ids must not be empty",
    ),
    "ids_length": (
        lambda: attend(mask=fm.document(torch.zeros(B, Q, dtype=torch.long))),
        ValueError,
        r"document ids have length 6 but the keys have length kv_len=10",
    ),
    "ids_batch": (
        lambda: attend(mask=fm.causal() & fm.document(torch.zeros(3, KV, dtype=torch.long))),
        ValueError,
        r"document ids have batch size 3, but the inputs have batch 2",
    ),
    "ids_length_to_dense": (lambda: fm.document(ids).to_dense(KV + 1, KV + 1), ValueError, r"document ids have length"),
    # lengths
    "lengths_not_tensor": (lambda: fm.padding([3, 4]), TypeError, r"lengths must be an int tensor"),
    "lengths_2d": (
        lambda: fm.padding(torch.ones(2, 1, dtype=torch.long)),
        ValueError,
        r"lengths must be an integer.*\[batch\]",
    ),
    "lengths_float": (lambda: fm.padding(torch.ones(2)), ValueError, r"lengths must be an integer tensor.*float32"),
    "lengths_negative": (lambda: fm.padding(torch.tensor([3, -1])), ValueError, r"lengths must be >= 0.*-1"),
    "lengths_empty": (lambda: fm.padding(torch.tensor([], dtype=torch.long)), ValueError, r"lengths must not be empty"),
    "lengths_batch": (
        lambda: attend(mask=fm.padding(torch.tensor([1, 2, 3]))),
        ValueError,
        r"padding lengths have batch size 3, but the inputs have batch 2",
    ),
    # key masks
    "key_mask_not_tensor": (lambda: fm.key_mask([[True, False]]), TypeError, r"key mask valid must be a bool tensor"),
    "key_mask_not_bool": (
        lambda: fm.key_mask(torch.ones(2, KV, dtype=torch.long)),
        ValueError,
        r"key mask valid must be a non-empty bool tensor.*int64",
    ),
    "key_mask_1d": (lambda: fm.key_mask(torch.ones(KV, dtype=torch.bool)), ValueError, r"\[batch, kv_len\].*\(10,\)"),
    "key_mask_length": (
        lambda: attend(mask=fm.key_mask(torch.ones(B, KV + 1, dtype=torch.bool))),
        ValueError,
        r"key mask has shape \(2, 11\), expected \[2 or 1, 10\]",
    ),
    "among_two_key_masks": (
        lambda: fm.topk(
            torch.randn(B, HKV, KV),
            3,
            among=fm.key_mask(torch.ones(B, KV, dtype=torch.bool)) & fm.key_mask(torch.ones(B, KV, dtype=torch.bool)),
        ),
        ValueError,
        r"among may hold at most one document, one padding and one key mask",
    ),
    "among_other_mask": (
        lambda: fm.topk(torch.randn(B, HKV, KV), 3, among=fm.sliding_window(4)),
        ValueError,
        r"among must be built from fm.padding\(...\), fm.document\(...\), fm.key_mask\(...\)",
    ),
    "prefix_lengths_batch": (
        lambda: attend(mask=fm.prefix_lm(torch.tensor([1, 2, 3]))),
        ValueError,
        r"prefix_lm lengths have batch size 3",
    ),
    "prefix_lengths_negative": (lambda: fm.prefix_lm(torch.tensor([-1])), ValueError, r"length must be >= 0"),
    "masks_disagree_on_batch": (
        lambda: (fm.document(torch.zeros(2, 4, dtype=torch.long)) & fm.padding(torch.tensor([1, 2, 3]))).to_dense(4, 4),
        ValueError,
        r"different batch sizes: \[2, 3\]",
    ),
    # custom masks
    "custom_not_callable": (lambda: fm.mask(3), TypeError, r"fm\.mask expects a function"),
    "custom_not_bool_dense": (
        lambda: fm.mask(lambda b, h, q, kv: (kv <= q).int()).to_dense(4, 4),
        TypeError,
        r"must return a bool tensor",
    ),
    "custom_not_bool_attention": (
        lambda: attend(mask=fm.mask(lambda b, h, q, kv: (kv <= q).int())),
        TypeError,
        r"must return a bool tensor",
    ),
    # biases that do not fit
    "tensor_bias_not_broadcastable": (
        lambda: attend(bias=fm.tensor_bias(torch.zeros(B, HQ, Q, KV + 1))),
        ValueError,
        r"tensor_bias has shape \(2, 4, 6, 11\), which does not broadcast",
    ),
    "tensor_bias_wrong_q": (
        lambda: attend(bias=fm.tensor_bias(torch.zeros(KV, KV))),
        ValueError,
        r"tensor_bias has shape \(10, 10\)",
    ),
    "tensor_bias_wrong_heads": (
        lambda: attend(bias=fm.tensor_bias(torch.zeros(HKV, Q, KV))),
        ValueError,
        r"tensor_bias has shape",
    ),
    "tensor_bias_5d": (lambda: fm.tensor_bias(torch.zeros(1, B, HQ, Q, KV)), ValueError, r"tensor_bias expects"),
    "tensor_bias_int": (
        lambda: fm.tensor_bias(torch.zeros(Q, KV, dtype=torch.long)),
        ValueError,
        r"tensor_bias.*int64",
    ),
    "tensor_bias_not_tensor": (lambda: fm.tensor_bias(1.0), TypeError, r"tensor_bias expects a tensor"),
    "key_bias_length": (
        lambda: attend(bias=fm.key_bias(torch.zeros(B, HQ, KV - 1))),
        ValueError,
        r"key_bias has shape \(2, 4, 9\), expected \[2 or 1, H, 10\]",
    ),
    "key_bias_heads": (
        lambda: attend(bias=fm.key_bias(torch.zeros(B, 3, KV))),
        ValueError,
        r"key_bias has shape \(2, 3, 10\)",
    ),
    "key_bias_batch": (
        lambda: attend(bias=fm.key_bias(torch.zeros(3, HQ, KV))),
        ValueError,
        r"key_bias has shape \(3, 4, 10\)",
    ),
    "key_bias_2d": (lambda: fm.key_bias(torch.zeros(HQ, KV)), ValueError, r"key_bias must be a floating tensor"),
    "head_bias_heads": (
        lambda: attend(bias=fm.head_bias(torch.zeros(HKV))),
        ValueError,
        r"head_bias table has shape \(2,\), expected \[4\]",
    ),
    "head_bias_int": (lambda: fm.head_bias(torch.zeros(HQ, dtype=torch.long)), ValueError, r"head_bias table.*int64"),
    "head_bias_list": (lambda: fm.head_bias([0.0] * HQ), TypeError, r"head_bias table must be a tensor"),
    "head_bias_device": (
        lambda: fm.head_bias(torch.zeros(HQ, device="meta")),
        ValueError,
        r"head_bias table is on the meta device",
    ),
    "alibi_heads": (lambda: attend(bias=fm.alibi(HKV)), ValueError, r"alibi was made for 2 heads, but q has 4 heads"),
    "relative_heads": (
        lambda: attend(bias=fm.relative_bias(torch.zeros(HKV, 8))),
        ValueError,
        r"relative_bias table has 2 heads",
    ),
    "relative_buckets": (
        lambda: fm.relative_bias(torch.zeros(HQ, 1)),
        ValueError,
        r"relative_bias table needs at least",
    ),
    "relative_max_distance": (
        lambda: fm.relative_bias(torch.zeros(HQ, 16), max_distance=8),
        ValueError,
        r"max_distance must be an int in \(8, 2\*\*31\), got 8",
    ),
    "sum_checks_every_part": (
        lambda: attend(bias=fm.alibi(HQ) + fm.key_bias(torch.zeros(B, HQ, KV + 1))),
        ValueError,
        r"key_bias has shape",
    ),
    # algebra with non-masks / non-biases
    "mask_and_int": (lambda: fm.causal() & 1, TypeError, r"`&` combines flexmask masks; got int"),
    "int_or_mask": (lambda: 1 | fm.causal(), TypeError, r"`\|` combines flexmask masks; got int"),
    "mask_or_function": (lambda: fm.causal() | (lambda b, h, q, kv: kv < 3), TypeError, r"fm\.mask\(fn\)"),
    "bias_plus_number": (lambda: fm.alibi(HQ) + 1.0, TypeError, r"`\+` combines flexmask biases; got float"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_rejected_at_the_boundary(name):
    fn, exc, match = CASES[name]
    with pytest.raises(exc, match=match):
        fn()


# ---------------------------------------------------------------------------------------------
# masks and biases have no truth value


def test_bool_of_a_mask_explains_the_operators():
    with pytest.raises(TypeError, match=r"no truth value.*`&`.*`\|`"):
        bool(fm.causal())


def test_python_and_or_not_on_masks_raise():
    a, b = fm.causal(), fm.sliding_window(4)
    with pytest.raises(TypeError, match=r"`&` \(and\)"):
        a and b  # noqa: B018
    with pytest.raises(TypeError, match=r"`\|` \(or\)"):
        a or b  # noqa: B018
    with pytest.raises(TypeError, match=r"`~` \(not\)"):
        not a  # noqa: B018
    with pytest.raises(TypeError, match=r"`&`"):
        if fm.document(torch.zeros(1, 4, dtype=torch.long)):
            pass


def test_bool_of_a_bias_raises():
    with pytest.raises(TypeError, match=r"bias has no truth value.*`\+`"):
        bool(fm.alibi(2))


# ---------------------------------------------------------------------------------------------
# compiled flex on CPU is forward only


def test_flex_backend_on_cpu_refuses_grad_inputs():
    q, k, v = qkv()
    q.requires_grad_()
    with pytest.raises(ValueError, match=r"backend='flex' on cpu runs forward only.*backend='reference'"):
        fm.attention(q, k, v, mask=fm.causal(), backend="flex")


def test_flex_backend_on_cpu_refuses_learnable_bias():
    table = torch.nn.Parameter(torch.zeros(HQ))
    with pytest.raises(ValueError, match=r"backend='flex' on cpu runs forward only"):
        fm.attention(*qkv(), bias=fm.head_bias(table), backend="flex")


def test_checks_run_before_any_work_on_valid_looking_layouts():
    """Errors name the argument even when only the mask's tensor is off (no deep torch error)."""
    q, k, v = qkv()
    for mask in (fm.document(torch.zeros(B, KV + 2, dtype=torch.long)), fm.padding(torch.tensor([1, 2, 3, 4]))):
        with pytest.raises(ValueError, match=r"(document ids|padding lengths)"):
            fm.attention(q, k, v, mask=mask, backend="flex")
        with pytest.raises(ValueError, match=r"(document ids|padding lengths)"):
            fm.attention(q, k, v, mask=mask, backend="reference")


def test_custom_mask_function_of_the_wrong_arity_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"\(b, h, q_idx, kv_idx\).*signature \(b, h, i\)"):
        fm.mask(lambda b, h, i: i > 0)
    with pytest.raises(TypeError, match="signature"):
        fm.mask(lambda b, h, i, j, extra: i >= j)
    for ok in (lambda *a: a[2] >= a[3], lambda b, h, i, j, extra=1: i >= j, torch.ge):
        fm.mask(ok)  # variadic, defaulted and unreadable signatures pass
