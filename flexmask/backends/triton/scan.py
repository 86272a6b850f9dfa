"""A long integer ``cumsum`` over few rows in two Triton launches.

PyTorch scans a row of 32k elements with one thread block (about 50 µs for ``[8, 32768]`` on an
H200); scanning chunks of 1024 and adding each chunk's carry uses the whole GPU but takes half a
dozen small kernels (copies, the scan, the carries, the sum). Here one launch sums each chunk and a
second scans each chunk and adds the sum of the chunks before it, read from the first's totals.
Integers only (exact in any order); the wavelet levels of the token selection's build take it
(:func:`flexmask._compat.cumsum` under ``torch.compile`` with torch < 2.13).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

CHUNK = 1024
"""Elements per program."""

if triton is not None:

    @triton.jit
    def _totals(X, TOT, N, M, CHUNK: tl.constexpr):
        m, r = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs = m * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(X + r * N + offs, mask=offs < N, other=0).to(tl.int64)
        tl.store(TOT + r * M + m, tl.sum(x, 0))

    @triton.jit
    def _scan(X, TOT, Y, N, M, CHUNK: tl.constexpr, MP: tl.constexpr):
        m, r = tl.program_id(0), tl.program_id(1).to(tl.int64)
        before = tl.arange(0, MP)
        carry = tl.sum(tl.load(TOT + r * M + before, mask=before < m, other=0), 0)
        offs = m * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(X + r * N + offs, mask=offs < N, other=0).to(tl.int64)
        y = tl.cumsum(x, 0) + carry
        tl.store(Y + r * N + offs, y.to(Y.dtype.element_ty), mask=offs < N)


def row_cumsum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch.cumsum(x, -1, dtype=dtype)`` of an integer (or bool) tensor, contiguous, in ``dtype``
    (an integer dtype); ``x`` on a device Triton runs on."""
    n = x.shape[-1]
    rows = x.reshape(-1, n).contiguous()
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    r, m = rows.shape[0], triton.cdiv(n, CHUNK)
    totals = torch.empty(r, m, dtype=torch.int64, device=x.device)
    out = torch.empty(r, n, dtype=dtype, device=x.device)
    if out.numel():
        _totals[(m, r)](rows, totals, n, m, CHUNK=CHUNK)
        _scan[(m, r)](rows, totals, out, n, m, CHUNK=CHUNK, MP=triton.next_power_of_2(m))
    return out.view(x.shape)
