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


def compile_for_sm90(kernels: list[tuple[Callable, dict[str, str], dict]], options: dict | None = None) -> None:
    """Compile each ``(kernel, signature, constexprs)`` (Triton or Gluon) for sm_90 and check it gave a
    cubin that fits in an H100's shared memory (227 KiB a block).

    ``signature`` types the kernel's runtime arguments (``"*bf16"``, ``"i32"``, ...) by name, in any
    order; ``constexprs`` gives its compile-time ones; ``options`` the launch's (``num_warps``, ...).
    Pointer arguments are taken as 16-byte aligned, as the launcher specialises them when they are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, signature, constexprs in kernels:
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        signature = {name: signature[name] for name in kernel.arg_names}  # in the kernel's order
        aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
        source = ASTSource
        if type(kernel).__name__ == "GluonJITFunction":
            from triton.experimental.gluon._runtime import GluonASTSource as source
        binary = triton.compile(
            source(kernel, signature, constexprs, aligned), target=GPUTarget("cuda", 90, 32), options=options or {}
        )
        assert binary.asm["cubin"] and binary.metadata.shared <= 227 * 1024
