"""``flexmask.tools.expr.parse``: every accepted expression gives what Python gives, and nothing else
runs.

The truth for an accepted expression is Python's own ``eval`` of the same trusted text (with the
same random seed), compared by ``repr`` and by the dense mask (or the attention output, for a bias)
at small lengths. Hostile expressions must raise ``ExpressionError`` with a one-line message, before
anything runs: no file appears, no process starts, nothing is saved.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexmask as fm
from flexmask.tools import expr
from flexmask.tools.errors import UsageError
from flexmask.tools.expr import MAX_ELEMENTS, ExpressionError, parse

NAMESPACE = {"fm": fm, "torch": torch, **{name: getattr(fm, name) for name in expr.CONSTRUCTORS}}


def python(text: str):
    """What Python gives for ``text`` (trusted test input only)."""
    return eval(text, {"__builtins__": {}}, dict(NAMESPACE))  # noqa: S307


def both(text: str):
    """``(parse(text), eval(text))`` from the same random state."""
    torch.manual_seed(0)
    ours = parse(text)
    torch.manual_seed(0)
    theirs = python(text)
    return ours, theirs


Q = torch.randn(1, 4, 16, 8, generator=torch.Generator().manual_seed(1))


def assert_same(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    if isinstance(ours, torch.Tensor):
        assert ours.dtype == theirs.dtype and ours.requires_grad == theirs.requires_grad
        assert torch.equal(ours, theirs)
        return
    assert repr(ours) == repr(theirs)
    if isinstance(ours, fm.Mask):
        for q_len, kv_len in ((16, 16), (8, 16), (1, 16)):
            assert torch.equal(ours.to_dense(q_len, kv_len), theirs.to_dense(q_len, kv_len))
    else:  # a bias (the examples are made for 4 heads and 16 keys)
        out_ours = fm.attention(Q, Q, Q, mask=fm.causal(), bias=ours)
        out_theirs = fm.attention(Q, Q, Q, mask=fm.causal(), bias=theirs)
        assert torch.equal(out_ours, out_theirs)


ACCEPTED = [
    # masks, bare and as fm.<name>, with the algebra
    "causal()",
    "fm.causal()",
    "full()",
    "sliding_window(4)",
    "fm.sliding_window(size=4)",
    "chunked(5) & causal()",
    "prefix_lm(3)",
    "prefix_lm(torch.tensor([3]))",
    "~causal()",
    "~~causal()",
    "causal() & (sliding_window(3) | prefix_lm(2))",
    "causal() | chunked(4) & ~sliding_window(2)",
    "fm.causal() & fm.document(torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3]]))",
    "document(torch.tensor([[0] * 5 + [1] * 7 + [2] * 4]))",
    "causal() & document(torch.tensor([[0] * 5 + [1] * 7 + [2] * 4], dtype=torch.long))",
    "document(torch.zeros(1, 16, dtype=torch.long))",
    "padding(torch.tensor([10]))",
    "causal() & padding(torch.tensor([12, 7]))",
    "causal() & key_mask(torch.tensor([[False] * 4 + [True] * 12]))",
    "fm.topk(torch.randn(1, 1, 16), 3, among=key_mask(torch.tensor([[False, True] * 8])))",
    "sliding_window(2 * 3 + 1)",
    "sliding_window(2 ** 3)",
    "chunked(17 // 4)",
    "sliding_window(-(-5))",
    "sliding_window(+5)",
    "sliding_window(10 - 3)",
    # content masks
    "topk(torch.randn(1, 2, 16), 4)",
    "fm.topk(torch.randn(1, 1, 16), k=3, among=document(torch.tensor([[0] * 8 + [1] * 8])))",
    "topk_blocks(torch.randn(1, 2, 16), 1, block_size=4)",
    "causal() & topk(torch.rand(1, 4, 16), 5)",
    "topk(-torch.ones(1, 1, 16), 3)",
    # biases (4 heads, 16 keys)
    "alibi(4)",
    "fm.alibi(4) + key_bias(torch.randn(1, 4, 16))",
    "head_bias(torch.tensor([0.5, -1.0, 2.0, 0.0]))",
    "relative_bias(torch.randn(4, 8), max_distance=16)",
    "relative_bias(torch.zeros(4, 8), max_distance=16, bidirectional=True)",
    "tensor_bias(torch.randn(1, 4, 16, 16))",
    "tensor_bias(torch.full((16, 16), -0.5)) + alibi(4)",
    "key_bias(torch.randn(1, 1, 16, requires_grad=True))",
    "key_bias(torch.randn(1, 4, 16) * 2.5 - 1)",
    # tensors
    "torch.ones(3, 4, dtype=torch.bool)",
    "torch.zeros((2, 3))",
    "torch.zeros([2, 3], dtype=torch.float64)",
    "torch.arange(10)",
    "torch.arange(2, 11, 3)",
    "torch.arange(0.0, 1.0, 0.25)",
    "torch.arange(10, 0, -2)",
    "torch.full((2, 2), 7, dtype=torch.int32)",
    "torch.randint(5, (2, 3))",
    "torch.randint(2, 9, (4,), dtype=torch.int16)",
    "torch.randn(2, 3)",
    "torch.rand(4)",
    "torch.tensor(3.5)",
    "torch.tensor([[True, False], [False, True]])",
    "torch.tensor([1, 2, 3], dtype=torch.half)",
    "torch.tensor((1, 2) + (3,))",
    "torch.tensor([[0] * 3] * 2)",
    "~torch.ones(2, 2, dtype=torch.bool)",
    "torch.ones(2, 2, dtype=torch.bool) & torch.zeros(2, 2, dtype=torch.bool)",
    "torch.arange(4) | 1",
    "-torch.arange(3)",
    "torch.arange(6) // 2 + 1",
    "torch.arange(6) / 2",
    "torch.ones(3, 1) + torch.ones(1, 4)",
    "2 * torch.ones(2)",
    "torch.ones(2, dtype=torch.uint8)",
    "torch.ones(2, dtype=torch.bfloat16)",
    "torch.ones(2, dtype=torch.int8)",
    "torch.zeros(0)",
    # whitespace and layout
    "  causal()  ",
    "(causal()\n  & sliding_window(3))",
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepted_forms_give_what_python_gives(text):
    ours, theirs = both(text)
    assert isinstance(ours, (fm.Mask, fm.Bias, torch.Tensor))
    assert_same(ours, theirs)


def test_document_ids_from_a_tensor():
    """``document(torch.tensor(...))`` crashed with a PyTorch INTERNAL ASSERT under ``eval`` without builtins."""
    mask = parse("causal() & document(torch.tensor([[0, 0, 1, 1]]))")
    assert mask.to_dense(4, 4)[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_the_gallery_forms():
    for text in (
        "causal() & document(torch.tensor([[0] * 20 + [1] * 28 + [2] * 16]))",
        "document(torch.tensor([[0] * 20 + [1] * 28 + [2] * 16]))",
        "causal() & padding(torch.tensor([48]))",
        "sliding_window(4096) | (chunked(16384) & causal())",
        "~causal()",
    ):
        ours, theirs = both(text)
        assert repr(ours) == repr(theirs)


# ---------------------------------------------------------------------------------------------
# generated expressions

LEAVES = [
    "causal()",
    "full()",
    "sliding_window(3)",
    "fm.sliding_window(7)",
    "chunked(4)",
    "prefix_lm(5)",
    "document(torch.tensor([[0] * 6 + [1] * 10]))",
    "padding(torch.tensor([11]))",
    "topk(torch.tensor([[[" + ", ".join(f"{(7 * i) % 11}.0" for i in range(16)) + "]]]), 3)",
]


def mask_trees():
    return st.recursive(
        st.sampled_from(LEAVES),
        lambda inner: st.one_of(
            st.builds(lambda a, b: f"({a}) & ({b})", inner, inner),
            st.builds(lambda a, b: f"{a} | {b}", inner, inner),
            st.builds(lambda a, b: f"{a} & {b}", inner, inner),
            st.builds(lambda a: f"~({a})", inner),
            st.builds(lambda a: f"~{a}", inner),
        ),
        max_leaves=8,
    )


@settings(max_examples=60, deadline=None)
@given(mask_trees())
def test_generated_mask_expressions(text):
    ours, theirs = both(text)
    assert_same(ours, theirs)


def number_trees():
    """Numbers and operators whose every intermediate value stays far below 2**53 (at most 6 leaves,
    each at most 9**2 = 81 in magnitude, or 0.5): where Python gives a value, parse must give it."""
    leaf = st.integers(-9, 9).map(str) | st.sampled_from(["2.5", "0.5", "True"])
    power = st.builds(lambda a, e: f"({a}) ** {e}", leaf, st.integers(0, 2))
    return st.recursive(
        leaf | power,
        lambda inner: st.one_of(
            st.builds(lambda a, b, op: f"({a} {op} {b})", inner, inner, st.sampled_from(["+", "-", "*", "//", "/"])),
            st.builds(lambda a: f"-{a}", inner),
        ),
        max_leaves=6,
    )


@settings(max_examples=150, deadline=None)
@given(number_trees())
def test_generated_numbers_match_python(text):
    """``sliding_window(<numbers>)`` is what Python gives, or refused exactly when Python fails."""
    call = f"sliding_window({text})"
    try:
        theirs = python(call)
    except Exception:  # noqa: BLE001 - a zero division, a float or non-positive size
        with pytest.raises(ExpressionError):
            parse(call)
        return
    assert repr(parse(call)) == repr(theirs)


# ---------------------------------------------------------------------------------------------
# refused


HOSTILE = [
    "torch.os.system('touch pwned')",
    "fm.plot.__globals__['__builtins__']['open']('pwned', 'w')",
    "fm.plot.__globals__",
    "(lambda: 1)()",
    "lambda b, h, q, kv: q >= kv",
    "mask(lambda b, h, q, kv: q >= kv)",
    "fm.mask(lambda b, h, q, kv: q >= kv, name='x')",
    "torch.save(torch.ones(1), 'pwned.pt')",
    "__import__('os').system('touch pwned')",
    "().__class__.__bases__",
    "().__class__.__bases__[0].__subclasses__()",
    "fm.causal.__code__",
    "causal().__class__",
    "getattr(fm, 'causal')()",
    "open('pwned', 'w')",
    "print('x')",
    "eval('1')",
    "exec('import os')",
    "f'{causal()}'",
    "f'x'",
    "'causal()'",
    "b'x'",
    "(x := causal())",
    "sliding_window(*[3])",
    "sliding_window(**{'size': 3})",
    "[*[1]]",
    "torch.ones(10**9)",
    "torch.randn(10**12)",
    "torch.zeros(2**12, 2**13)",
    "torch.full((2**13, 2**13), 1.0)",
    "torch.randint(0, 2, (2**25,))",
    "torch.arange(10**12)",
    "torch.arange(0, 1, 1e-9)",
    "[0] * 10**9",
    "[[0] * 4096] * 8192",
    "torch.tensor([[0] * 4096] * 8192)",
    "torch.ones(2**24, 1) + torch.ones(1, 2**24)",
    "torch.ones(2**23) + torch.ones(2**23) + torch.ones(2**23) + torch.ones(2**23) + torch.ones(2**23)",
    "9 ** 9 ** 9",
    "2 ** 10000",
    "10 ** 16",
    "1e309",
    "1j",
    "...",
    "None",
    "3",
    "[causal()]",
    "(causal(), causal())",
    "causal",
    "fm",
    "torch",
    "torch.long",
    "torch.ones(2, dtype=torch.os)",
    "torch.ones(2, dtype=int)",
    "torch.ones(2, device='cuda')",
    "torch.ones(2, out=None)",
    "torch.tensor([1, 2])[0]",
    "causal()[0]",
    "causal() and sliding_window(3)",
    "causal() or sliding_window(3)",
    "not causal()",
    "causal() if 1 else full()",
    "[c for c in (causal(),)]",
    "(c for c in (causal(),))",
    "{causal(): 1}",
    "{causal()}",
    "causal() == causal()",
    "causal() @ causal()",
    "causal() % 2",
    "causal() << 1",
    "causal() ^ causal()",
    "causal() & 1",
    "causal() + causal()",
    "alibi(4) & causal()",
    "-causal()",
    "~1.5",
    "1.5 & 1",
    "[1] + (2,)",
    "[1] * 2.0",
    "torch.ones(2) + [1, 2]",
    "torch.ones(2) ** 2",
    "(-8) ** 0.5",
    "1 / 0",
    "sliding_window(0)",
    "sliding_window(-1)",
    "sliding_window(2.5)",
    "document([[0, 1]])",
    "alibi(causal())",
    "torch.tensor(causal())",
    "torch.zeros(-1)",
    "torch.zeros(2.5)",
    "torch.arange()",
    "torch.arange(0, 10, 0)",
    "torch.full(3, 1)",
    "torch.randint(3)",
    "torch.tensor()",
    "causal(",
    "causal() causal()",
    "",
    "   ",
    "import os",
    "causal(); import os",
    "\x00",
    "yield causal()",
    "await causal()",
    "sliding_window(x)",
    "topk(torch.randn(1, 1, 8), 2, among=causal)",
]


@pytest.fixture
def no_side_effects(tmp_path, monkeypatch):
    """Run in an empty folder with the doors that run things or write files replaced by alarms."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def alarm(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return called

    monkeypatch.setattr(os, "system", alarm("os.system"))
    monkeypatch.setattr(subprocess, "Popen", alarm("subprocess.Popen"))
    monkeypatch.setattr(torch, "save", alarm("torch.save"))
    yield calls
    assert calls == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_expressions_are_refused(text, no_side_effects):
    t0 = time.perf_counter()
    with pytest.raises(ExpressionError) as info:
        parse(text)
    assert time.perf_counter() - t0 < 5.0  # refused, not attempted
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 700
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "text, words",
    [
        ("open('x')", ["refused this call: `open`", "allowed:"]),
        ("torch.os.system('x')", ["refused this call: `torch.os.system`"]),
        ("fm.causal.__code__", ["refused attribute access: `fm.causal.__code__`"]),
        ("lambda: 1", ["refused a lambda"]),
        ("fm.mask(1)", ["fm.mask, which takes a function"]),
        ("causal()[0]", ["refused a subscript"]),
        ("f'x'", ["refused an f-string"]),
        ("(x := 1)", ["refused an assignment expression"]),
        ("causal(*[1])", ["refused `*` unpacking"]),
        ("'a'", ["refused a string"]),
        ("causal() and causal()", ["combine masks with & and |"]),
        ("causal", ["write causal(...)"]),
        ("torch.ones(10**9)", ["torch.ones(...) would hold 1000000000 elements", f"at most {MAX_ELEMENTS}"]),
        ("sliding_window(-1)", ["in `sliding_window(-1)`: ValueError"]),
        ("causal() & 1", ["`&` does not apply to a mask and an int"]),
        ("[causal()]", ["gives a list, not a mask, a bias or a tensor"]),
        ("causal(", ["not a Python expression"]),
        ("10 ** 16", ["out of range"]),
    ],
)
def test_messages_say_what_was_refused(text, words):
    with pytest.raises(ExpressionError) as info:
        parse(text)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "(" * 10_000 + "causal()" + ")" * 10_000,
        "~" * 10_000 + "causal()",
        "-" * 10_000 + "1",
        " & ".join(["causal()"] * 5_000),
        " | ".join(["sliding_window(1)"] * 5_000),
        "+".join(["1"] * 10_000),
        "[" * 10_000 + "]" * 10_000,
        "sliding_window(" * 5_000 + "1" + ")" * 5_000,
        "a" + ".b" * 10_000,
        "causal() & " * 20_000 + "causal()",  # too long
        "causal() & " * 300 + "causal()",  # too deep for flexmask (MAX_DEPTH), not for Python's parser
        "sliding_window(1 + " * 150 + "1" + ")" * 150,
    ],
)
def test_deep_nesting_is_refused_cleanly(text):
    with pytest.raises(ExpressionError) as info:
        parse(text)
    assert "\n" not in str(info.value)


def test_nesting_within_the_limit_works():
    text = "causal() " + "& (causal() " * 40 + ")" * 40
    assert isinstance(parse(text), fm.Mask)


def test_not_a_string():
    with pytest.raises(TypeError):
        parse(b"causal()")  # type: ignore[arg-type]


def test_monkeypatched_constructors_are_looked_up_at_parse_time(monkeypatch):
    """Names resolve through the flexmask module (as Python's ``fm.causal`` would), never a copy."""
    monkeypatch.setattr(fm, "causal", lambda: fm.full())
    assert repr(parse("causal()")) == "full()"
