"""The one cache: lowered masks, captured CUDA graphs and compiled functions, and their keys.

A lowered mask (a BlockMask, a token layout) is kept for reuse when a later call has the same
**key**: the expression's structure (its types and plain values, custom functions by identity),
for every tensor the expression holds (scores, document ids, lengths, tables, and tensors a custom
mask function closes over) its identity, version counter, storage and layout, plus the call's
shapes, device and options. So:

* in-place changes made through normal tensor operations (``copy_``, ``fill_``, index assignment,
  optimizer steps) bump the version counter, and the next call rebuilds;
* writes that bypass the version counter (``tensor.data[...] = ...``, a numpy view of the storage,
  DLPack) are **not** seen: rebuild the expression or call :func:`clear` after such writes;
* inference tensors (made under ``torch.inference_mode``) have no version counter: expressions
  holding them are lowered anew on every call, never cached;
* an entry dies with any tensor of its key (weak references: a training step's scores take what
  was lowered from them along when they go), unless the lowered value itself reads that tensor
  (a document mask's ``mask_mod`` reads its ids); at most :data:`SIZE` entries are kept, least
  recently used first out.

Inside ``torch.compile`` nothing is cached: the lowering is traced into the graph.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .._compat import tensor_version

SIZE = 64
"""Most lowered masks kept at once."""

_lowered: OrderedDict = OrderedDict()  # key -> (weak refs of the key's tensors, value)
_graphs: OrderedDict = OrderedDict()  # (builder, shapes...) -> captured graph (see .graphs)
_compiled: dict = {}  # (function, options) -> its torch.compile'd version
_constants: dict = {}  # (value, device) -> a one-element tensor
_flags: dict = {}  # facts learned about kernels, e.g. configurations that need smaller tiles


def clear() -> None:
    """Drop every cached lowered mask and captured CUDA graph (compiled kernels stay compiled).

    Examples:
        >>> import flexmask as fm
        >>> fm.clear_cache()
    """
    _lowered.clear()
    _graphs.clear()
    _flags.clear()


def expression_key(expr: Any) -> tuple[Hashable, list[torch.Tensor]] | None:
    """``(structure, tensors)`` of a mask or bias expression, or ``None`` if it cannot be keyed.

    The structure is hashable and names each tensor by its place in ``tensors``. Expressions expose
    their constructor data with ``_cache_fields()``; custom functions are keyed by identity, with the
    tensors they close over.
    """
    tensors: list[torch.Tensor] = []
    try:
        return _encode(expr, tensors), tensors
    except _Unkeyable:
        return None


def _encode(value: Any, tensors: list[torch.Tensor]) -> Hashable:
    # a module-level function, not a closure over `tensors`: a recursive closure is a reference
    # cycle that would keep the tensors alive (and their cache entries with them) until a gc pass
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", len(tensors) - 1)
    if isinstance(value, (tuple, list)):
        return tuple(_encode(v, tensors) for v in value)
    if hasattr(value, "_cache_fields"):
        return (type(value).__qualname__, *(_encode(v, tensors) for v in value._cache_fields()))
    if callable(value):
        captured = [c.cell_contents for c in (getattr(value, "__closure__", None) or ()) if _filled(c)]
        defaults = getattr(value, "__defaults__", None) or ()
        extra = tuple(_encode(v, tensors) for v in (*captured, *defaults) if isinstance(v, torch.Tensor))
        return ("fn", value, extra)
    raise _Unkeyable


class _Unkeyable(Exception):
    pass


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def _stamp(t: torch.Tensor) -> tuple | None:
    version = tensor_version(t)
    if version is None:
        return None
    return (id(t), version, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def lowered(exprs: tuple, context: Hashable, build: Callable[[], Any], *, enabled: bool = True) -> Any:
    """``build()``, or the value an earlier call built for the same key (see the module docstring).

    Args:
        exprs: the expressions (masks, biases) the value depends on.
        context: everything else it depends on (layout, options, block size, what is built).
        build: computes the value.
        enabled: ``False`` to build without caching (the ``cache`` option).
    """
    if not enabled or torch.compiler.is_compiling():
        return build()
    keyed = expression_key(exprs)
    if keyed is None:
        return build()
    structure, tensors = keyed
    stamps = []
    for t in tensors:
        stamp = _stamp(t)
        if stamp is None:  # an inference tensor: no version counter to follow
            return build()
        stamps.append(stamp)
    key = (structure, tuple(stamps), context)
    hit = _lowered.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors, strict=True)):
        _lowered.move_to_end(key)
        return hit[1]
    value = build()
    refs = tuple(weakref.ref(t, lambda _, key=key, store=_lowered: store.pop(key, None)) for t in tensors)
    _lowered[key] = (refs, value)
    while len(_lowered) > SIZE:
        _lowered.popitem(last=False)
    return value


def graph_store() -> OrderedDict:
    """The store of captured CUDA graphs (used by :class:`flexmask.lowering.graphs.CudaGraphed`)."""
    return _graphs


def compiled(fn: Callable, **compile_kwargs: Any) -> Callable:
    """``torch.compile(fn, **compile_kwargs)``, made once per function and arguments."""
    key = (fn, tuple(sorted(compile_kwargs.items())))
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, **compile_kwargs)
    return _compiled[key]


def compiled_on_cuda(fn: Callable, dynamic: bool | None = False) -> Callable:
    """``fn``, run through ``torch.compile`` when its first argument is a CUDA tensor: a few fused
    kernels instead of hundreds of small launches. Eager on other devices and inside an outer
    ``torch.compile``, which traces it anyway."""

    def run(*args):
        if not args[0].is_cuda or torch.compiler.is_compiling():
            return fn(*args)
        return compiled(fn, dynamic=dynamic)(*args)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def constant(value: float, device: torch.device) -> torch.Tensor:
    """A one-element float32 tensor of ``value`` on ``device``, made once (no host-to-device copy per call)."""
    if torch.compiler.is_compiling():
        return torch.full((1,), value, device=device)
    key = (value, torch.device(device))
    if key not in _constants:
        _constants[key] = torch.full((1,), value, device=device)
    return _constants[key]


def flag(kind: str, name: Hashable = None) -> bool:
    """Whether :func:`set_flag` recorded ``name`` under ``kind`` (facts learned about kernels at run
    time); with ``name=None``, whether anything is recorded under ``kind``."""
    names = _flags.get(kind)
    return bool(names) if name is None else names is not None and name in names


def set_flag(kind: str, name: Hashable = None) -> None:
    _flags.setdefault(kind, set()).add(name)
