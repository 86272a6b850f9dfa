"""Mask and bias expressions read from text, without running code.

``flexmask plot EXPR`` and the docs' gallery take a mask as text, such as
``"causal() & (sliding_window(128) | prefix_lm(16))"``. :func:`parse` builds the object that the
expression gives in Python, but it never evaluates the text: it reads it with :mod:`ast`, checks
every node against a whitelist, and builds the result itself. Text from anywhere can neither run
code, nor touch files, nor exhaust memory. It accepts:

* flexmask's mask and bias constructors, bare or as ``fm.<name>`` (see :data:`CONSTRUCTORS`), with
  positional and keyword arguments. ``fm.mask`` is not among them: it takes a function;
* ``&``, ``|`` and ``~`` on masks, ``+`` on biases;
* numbers (``int`` and ``float``, at most :data:`MAX_MAGNITUDE` in size), ``True``, ``False``,
  ``None``, lists and tuples. ``+ - * / //`` and unary ``-`` work on numbers and tensors as in
  Python, ``**`` on numbers, ``&``, ``|``, ``~`` on ints and tensors, and ``+`` and ``*`` on lists
  (``[0] * 20 + [1] * 12``);
* the tensor constructors of :data:`TENSOR_CONSTRUCTORS` as ``torch.<name>(...)`` with such
  arguments, with ``dtype=torch.long`` (or another name of :data:`DTYPES`) and ``requires_grad=``.

No tensor, list or operator result may hold more than :data:`MAX_ELEMENTS` elements, and one
expression builds at most :data:`MAX_TOTAL_ELEMENTS` in all. Any other construct (another name,
attribute access, strings, subscripts, lambdas, comprehensions, ...) raises
:class:`ExpressionError` before anything is built.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

import torch

import flexmask
from flexmask import Bias, Mask

from .errors import UsageError

#: flexmask's constructors an expression may call, bare (``causal()``) or as ``fm.causal()``.
CONSTRUCTORS = (
    "causal",
    "sliding_window",
    "chunked",
    "prefix_lm",
    "document",
    "padding",
    "key_mask",
    "full",
    "topk",
    "topk_blocks",
    "alibi",
    "key_bias",
    "head_bias",
    "relative_bias",
    "tensor_bias",
)
#: torch's tensor constructors an expression may call, as ``torch.<name>(...)``.
TENSOR_CONSTRUCTORS = ("tensor", "arange", "zeros", "ones", "full", "rand", "randn", "randint")
#: The dtypes a tensor constructor's ``dtype=`` may name, as ``torch.<name>``.
_DTYPE_NAMES = "bool uint8 int8 int16 short int32 int int64 long float16 half bfloat16 float32 float float64 double"
DTYPES = {name: getattr(torch, name) for name in _DTYPE_NAMES.split()}
#: Most elements of one tensor, list or tuple an expression builds (``torch.ones(2**24)`` is the most).
MAX_ELEMENTS = 1 << 24
#: Most elements (tensors' and lists') one expression builds in all.
MAX_TOTAL_ELEMENTS = 1 << 26
#: Largest magnitude of a number in an expression (every such int is exact as a float).
MAX_MAGNITUDE = 1 << 53
#: Deepest nesting of an expression's syntax tree.
MAX_DEPTH = 200
#: Longest expression text.
MAX_CHARS = 100_000

ALLOWED = (
    "allowed: flexmask constructors (causal(), fm.sliding_window(64), document(ids), alibi(8), ...), "
    "& | ~ on masks, + on biases, numbers, True/False/None, lists, tuples, keyword arguments, "
    "+ - * / // on numbers and tensors (** on numbers, + * on lists), and "
    "torch.tensor/arange/zeros/ones/full/rand/randn/randint with such arguments (dtype=torch.long, ...)"
)

_BINARY = {
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Pow: "**",
}
_OTHER_BINARY = {ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>", ast.BitXor: "^"}
_UNARY = {ast.Invert: "~", ast.USub: "-", ast.UAdd: "+"}
_REFUSED = {
    ast.Lambda: "a lambda",
    ast.Subscript: "a subscript",
    ast.JoinedStr: "an f-string",
    ast.FormattedValue: "an f-string",
    ast.NamedExpr: "an assignment expression (:=)",
    ast.Starred: "`*` unpacking",
    ast.Compare: "a comparison",
    ast.BoolOp: "`and`/`or` (combine masks with & and |)",
    ast.IfExp: "a conditional expression",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "a slice",
}


class ExpressionError(UsageError):
    """An expression :func:`parse` refuses or cannot build; its message is one line.

    Examples:
        >>> from flexmask.tools.expr import ExpressionError, parse
        >>> try:
        ...     parse("open('x')")
        ... except ExpressionError as e:
        ...     print(str(e).split(";")[0])
        refused this call: `open` at column 1
    """


def parse(text: str) -> Mask | Bias | torch.Tensor:
    """The mask, bias or tensor that the expression ``text`` gives in Python, built without ``eval``.

    ``text`` may use flexmask's mask and bias constructors (bare or as ``fm.<name>``), their
    operators, numbers, lists, tuples and a few tensor constructors with literal arguments; the
    module docstring lists what is allowed. Anything else raises :class:`ExpressionError` before
    anything is built, so ``parse`` is safe on text from anywhere.

    Args:
        text: one Python expression, e.g. ``"fm.causal() & fm.sliding_window(64)"``.

    Returns:
        A :class:`flexmask.Mask`, a :class:`flexmask.Bias` or a ``torch.Tensor``.

    Raises:
        ExpressionError: a construct that is not allowed, an argument a constructor rejects, or
            sizes past :data:`MAX_ELEMENTS`; the message says which, in one line.

    Examples:
        >>> from flexmask.tools.expr import parse
        >>> parse("causal() & (fm.sliding_window(4) | document(torch.tensor([[0, 0, 1, 1]])))")
        causal() & (sliding_window(4) | document(<ids (1, 4)>))
    """
    if not isinstance(text, str):
        raise TypeError(f"parse takes the expression as a str, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"refused an expression of {len(text)} characters (at most {MAX_CHARS})")
    source = text.strip()
    if not source:
        raise ExpressionError(f"empty expression; {ALLOWED}")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"not a Python expression: {e.msg} (column {e.offset}); {ALLOWED}") from None
    except (RecursionError, MemoryError):  # the parser's own limits on nesting
        raise ExpressionError(f"refused an expression nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as e:  # null bytes
        raise ExpressionError(f"not a Python expression: {e}") from None
    _check_depth(tree)
    builder = _Builder(source)
    builder.check(tree.body)
    value = builder.build(tree.body)
    if not isinstance(value, (Mask, Bias, torch.Tensor)):
        raise ExpressionError(f"the expression gives {_kind(value)}, not a mask, a bias or a tensor")
    return value


def _check_depth(tree: ast.AST) -> None:
    """Refuse trees deeper than :data:`MAX_DEPTH` without recursing (checking and building recurse)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ExpressionError(f"refused an expression nested too deeply (at most {MAX_DEPTH} levels)")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _kind(x: Any) -> str:
    if isinstance(x, Mask):
        return "a mask"
    if isinstance(x, Bias):
        return "a bias"
    if isinstance(x, torch.Tensor):
        return "a tensor"
    if isinstance(x, bool):
        return "a bool"
    if isinstance(x, int):
        return "an int"
    if isinstance(x, float):
        return "a float"
    if x is None:
        return "None"
    return f"a {type(x).__name__}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float))  # bool included, as in Python


class _Builder:
    """Checks a parsed expression against the whitelist, then builds it."""

    def __init__(self, text: str):
        self.text = text
        self.elements = 0

    # -- errors ------------------------------------------------------------------------------------
    def snippet(self, node: ast.AST) -> str:
        segment = ast.get_source_segment(self.text, node) or type(node).__name__
        segment = " ".join(segment.split())
        return segment if len(segment) <= 60 else segment[:57] + "..."

    def refuse(self, what: str, node: ast.AST) -> ExpressionError:
        column = getattr(node, "col_offset", 0) + 1
        return ExpressionError(f"refused {what}: `{self.snippet(node)}` at column {column}; {ALLOWED}")

    def fail(self, message: str, node: ast.AST) -> ExpressionError:
        return ExpressionError(f"in `{self.snippet(node)}`: {' '.join(message.split())}")

    # -- the whitelist -------------------------------------------------------------------------------
    def check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant):
            self._check_constant(node)
        elif isinstance(node, (ast.List, ast.Tuple)):
            for item in node.elts:
                self.check(item)
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY:
                raise self.refuse("`not` (negate a mask with ~)", node)
            self.check(node.operand)
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise self.refuse(f"the operator `{_OTHER_BINARY.get(type(node.op), '?')}`", node)
            self.check(node.left)
            self.check(node.right)
        elif isinstance(node, ast.Call):
            module, _ = self._callee(node.func)
            for arg in node.args:
                self.check(arg)
            for kw in node.keywords:
                if kw.arg is None:
                    raise self.refuse("`**` unpacking", kw.value)
                if module == "torch" and kw.arg == "dtype" and isinstance(kw.value, ast.Attribute):
                    self._dtype(kw.value)
                else:
                    self.check(kw.value)
        elif isinstance(node, ast.Name):
            if node.id in CONSTRUCTORS:
                raise self.refuse(f"a constructor without a call (write {node.id}(...))", node)
            raise self.refuse("this name", node)
        elif isinstance(node, ast.Attribute):
            raise self.refuse("attribute access", node)
        else:
            raise self.refuse(_REFUSED.get(type(node), f"a {type(node).__name__} node"), node)

    def _check_constant(self, node: ast.Constant) -> None:
        value = node.value
        if value is None or isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            if not (math.isfinite(value) and abs(value) <= MAX_MAGNITUDE):
                raise self.refuse(f"a number out of range (at most 2**53 = {MAX_MAGNITUDE} in magnitude)", node)
            return
        what = {str: "a string", bytes: "bytes", complex: "a complex number"}.get(type(value), f"`{value!r}`")
        raise self.refuse(what, node)

    def _callee(self, func: ast.AST) -> tuple[str, str]:
        """``("fm", name)`` or ``("torch", name)`` for an allowed call target, else refuse."""
        if isinstance(func, ast.Name):
            if func.id in CONSTRUCTORS:
                return "fm", func.id
            if func.id == "mask":
                raise self.refuse("fm.mask, which takes a function (write the mask with the other constructors)", func)
            raise self.refuse("this call", func)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            owner, name = func.value.id, func.attr
            if owner == "fm" and name in CONSTRUCTORS:
                return "fm", name
            if owner == "torch" and name in TENSOR_CONSTRUCTORS:
                return "torch", name
            if owner == "fm" and name == "mask":
                raise self.refuse("fm.mask, which takes a function (write the mask with the other constructors)", func)
        raise self.refuse("this call", func)

    def _dtype(self, node: ast.Attribute) -> torch.dtype:
        if isinstance(node.value, ast.Name) and node.value.id == "torch" and node.attr in DTYPES:
            return DTYPES[node.attr]
        raise self.refuse("this dtype (use torch.long, torch.bool, torch.float32, ...)", node)

    # -- building (after check) ----------------------------------------------------------------------
    def build(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            self.charge(len(node.elts), node)
            items = [self.build(item) for item in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.UnaryOp):
            return self._unary(node, self.build(node.operand))
        if isinstance(node, ast.BinOp):
            return self._binary(node, self.build(node.left), self.build(node.right))
        if isinstance(node, ast.Call):
            return self._call(node)
        raise self.refuse(f"a {type(node).__name__} node", node)  # check() has refused it already

    def charge(self, n: int, node: ast.AST, what: str = "") -> None:
        """Count ``n`` new elements against the limits (before making them)."""
        if n > MAX_ELEMENTS:
            raise self.fail(f"{what or 'the result'} would hold {n} elements; at most {MAX_ELEMENTS} (2**24)", node)
        self.elements += n
        if self.elements > MAX_TOTAL_ELEMENTS:
            raise self.fail(f"the expression builds more than {MAX_TOTAL_ELEMENTS} (2**26) elements in all", node)

    def _number(self, value: Any, node: ast.AST) -> int | float:
        if not isinstance(value, (int, float)):  # (-8) ** 0.5 is complex
            raise self.fail(f"gives {_kind(value)}, not a real number", node)
        if not (math.isfinite(value) and abs(value) <= MAX_MAGNITUDE):
            raise self.fail(f"gives a number out of range (at most 2**53 = {MAX_MAGNITUDE} in magnitude)", node)
        return value

    def _unary(self, node: ast.UnaryOp, x: Any) -> Any:
        op = _UNARY[type(node.op)]
        if op == "~":
            if isinstance(x, torch.Tensor):
                self.charge(x.numel(), node)
            if isinstance(x, (Mask, torch.Tensor)) or _is_int(x):
                return self._compute(node, lambda: ~x)
            raise self.fail(f"`~` negates masks, ints and tensors, got {_kind(x)}", node)
        if _is_number(x):
            return self._number(self._compute(node, lambda: -x if op == "-" else +x), node)
        if isinstance(x, torch.Tensor):
            self.charge(x.numel(), node)
            return self._compute(node, lambda: -x if op == "-" else +x)
        raise self.fail(f"unary `{op}` applies to numbers and tensors, got {_kind(x)}", node)

    def _binary(self, node: ast.BinOp, a: Any, b: Any) -> Any:
        op = _BINARY[type(node.op)]
        fn = _OPERATORS[op]
        if op in ("&", "|") and isinstance(a, Mask) and isinstance(b, Mask):
            return self._compute(node, lambda: fn(a, b))
        if op == "+" and isinstance(a, Bias) and isinstance(b, Bias):
            return self._compute(node, lambda: a + b)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if all(isinstance(x, torch.Tensor) or _is_number(x) for x in (a, b)) and op != "**":
                shapes = [x.shape if isinstance(x, torch.Tensor) else () for x in (a, b)]
                shape = self._compute(node, lambda: torch.broadcast_shapes(*shapes))
                self.charge(math.prod(shape), node)
                return self._compute(node, lambda: fn(a, b))
        elif _is_number(a) and _is_number(b):
            if op in ("&", "|") and not (isinstance(a, int) and isinstance(b, int)):
                raise self.fail(f"`{op}` combines masks or ints, got {_kind(a)} and {_kind(b)}", node)
            if op == "**":
                base, exponent = abs(a), abs(b)
                if base > 1 and exponent > 1 and exponent * math.log2(base) > 60:
                    raise self.fail(f"gives a number out of range (at most 2**53 = {MAX_MAGNITUDE} in magnitude)", node)
            return self._number(self._compute(node, lambda: fn(a, b)), node)
        elif op == "+" and type(a) is type(b) and isinstance(a, (list, tuple)):
            self.charge(len(a) + len(b), node)
            return a + b
        elif op == "*" and (isinstance(a, (list, tuple)) and _is_int(b) or _is_int(a) and isinstance(b, (list, tuple))):
            seq, times = (a, b) if isinstance(a, (list, tuple)) else (b, a)
            self.charge(len(seq) * max(times, 0), node)
            return seq * times
        raise self.fail(
            f"`{op}` does not apply to {_kind(a)} and {_kind(b)} (& and | combine masks, + adds biases; numbers, "
            "lists and tensors take + - * as in Python)",
            node,
        )

    def _compute(self, node: ast.AST, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ExpressionError:
            raise
        except Exception as e:  # noqa: BLE001 - a flexmask or torch error becomes one line naming the expression
            lines = str(e).strip().splitlines()
            raise self.fail(f"{type(e).__name__}: {lines[0] if lines else ''}", node) from e

    def _call(self, node: ast.Call) -> Any:
        module, name = self._callee(node.func)
        args = [self.build(arg) for arg in node.args]
        kwargs = {}
        for kw in node.keywords:
            if module == "torch" and kw.arg == "dtype" and isinstance(kw.value, ast.Attribute):
                kwargs[kw.arg] = self._dtype(kw.value)
            else:
                kwargs[kw.arg] = self.build(kw.value)
        if module == "fm":
            fn = getattr(flexmask, name)
            return self._compute(node, lambda: fn(*args, **kwargs))
        return self._tensor_constructor(node, name, args, kwargs)

    # -- tensor constructors: the size is known, and checked, before the tensor is made ----------------
    def _tensor_constructor(self, node: ast.Call, name: str, args: list, kwargs: dict) -> torch.Tensor:
        bad = sorted(set(kwargs) - {"dtype", "requires_grad"})
        if bad:
            raise self.fail(f"torch.{name} takes only dtype= and requires_grad= here, got {bad[0]}=", node)
        count = self._compute(node, lambda: _element_count(name, args))
        self.charge(count, node, f"torch.{name}(...)")
        return self._compute(node, lambda: getattr(torch, name)(*args, **kwargs))


def _element_count(name: str, args: list) -> int:
    """How many elements ``torch.<name>(*args)`` makes (``TypeError``/``ValueError`` for bad arguments)."""
    if name == "tensor":
        if len(args) != 1:
            raise TypeError(f"torch.tensor takes one data argument, got {len(args)}")
        return _leaves(args[0], {})
    if name == "arange":
        if not 1 <= len(args) <= 3 or not all(_is_number(a) for a in args):
            raise TypeError("torch.arange takes end, or start, end[, step], as numbers")
        start, end, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) == 3 else 1)
        if step == 0:
            raise ValueError("torch.arange step must be nonzero")
        return max(0, math.ceil((end - start) / step))
    if name == "full":
        if len(args) != 2:
            raise TypeError("torch.full takes a size (list or tuple) and a fill value")
        return _size(name, args[0])
    if name == "randint":
        if len(args) not in (2, 3):
            raise TypeError("torch.randint takes high, size or low, high, size")
        return _size(name, args[-1])
    return _size(name, args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args)


def _size(name: str, size: Any) -> int:
    if not isinstance(size, (list, tuple)) or not all(_is_int(s) for s in size):
        raise TypeError(f"torch.{name} needs its size as ints, got {size!r:.60}")
    if any(s < 0 for s in size):
        raise ValueError(f"torch.{name} sizes must be non-negative, got {tuple(size)}")
    return math.prod(size)


def _leaves(data: Any, seen: dict[int, tuple[Any, int]]) -> int:
    """Elements of nested lists/tuples; a list repeated by ``*`` is counted (not walked) again."""
    if isinstance(data, torch.Tensor):
        return data.numel()
    if not isinstance(data, (list, tuple)):
        return 1
    if id(data) not in seen:
        seen[id(data)] = (data, sum(_leaves(item, seen) for item in data))
    return seen[id(data)][1]


_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "&": operator.and_,
    "|": operator.or_,
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "**": operator.pow,
}
