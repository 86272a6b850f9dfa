"""Test helpers for flexmask's Triton kernels without a GPU: Triton's interpreter (run with
``TRITON_INTERPRET=1``) for exactness, and compilation for sm_90 (the interpreter accepts programs
the compiler refuses)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest

_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

interpreted = pytest.mark.skipif(not (_TRITON and _INTERPRETING), reason="needs Triton and TRITON_INTERPRET=1")
"""Marks a test that runs kernels in Triton's interpreter."""

compiled = pytest.mark.skipif(
    not _TRITON or _INTERPRETING, reason="needs Triton, and kernels are not compiled with TRITON_INTERPRET=1"
)
"""Marks a test that compiles kernels (see :func:`compile_for_sm90`)."""


def compile_for_sm90(kernels: list[tuple[Callable, dict[str, str], dict]]) -> None:
    """Compile each ``(kernel, signature, constexprs)`` for sm_90 and check it gave a cubin.

    ``signature`` types the kernel's runtime arguments (``"*bf16"``, ``"i32"``, ...) by name, in any
    order; ``constexprs`` gives its compile-time ones."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, signature, constexprs in kernels:
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        signature = {name: signature[name] for name in kernel.arg_names}  # in the kernel's order
        binary = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert binary.asm["cubin"]
