"""The two-launch integer row scan (:mod:`flexmask.backends.triton.scan`) without a GPU: exact in
Triton's interpreter (run with ``TRITON_INTERPRET=1``) against ``torch.cumsum``; compiles for sm_90."""

from __future__ import annotations

import pytest
import torch

from flexmask.backends.triton import scan

from ._triton import compile_for_sm90, compiled, interpreted


@interpreted
@pytest.mark.parametrize("shape", [(3, 1), (2, 1023), (5, 1024), (4, 3001), (2, 3, 2049)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_row_cumsum_matches_torch(shape, dtype):
    g = torch.Generator().manual_seed(shape[-1])
    for x in (torch.randint(-5, 6, shape, generator=g), torch.rand(shape, generator=g) < 0.5):
        got = scan.row_cumsum(x, dtype)
        assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
        assert torch.equal(got, torch.cumsum(x, -1, dtype=dtype))
    strided = torch.randint(0, 2, (shape[-1], 3), generator=g).t()  # rows that are not contiguous
    assert torch.equal(scan.row_cumsum(strided, dtype), torch.cumsum(strided, -1, dtype=dtype))


@compiled
def test_scan_kernels_compile_for_a_gpu():
    sizes = {"N": "i32", "M": "i32"}
    compile_for_sm90(
        [
            (scan._totals, {"X": "*i64", "TOT": "*i64", **sizes}, {"CHUNK": scan.CHUNK}),
            (scan._scan, {"X": "*i8", "TOT": "*i64", "Y": "*i32", **sizes}, {"CHUNK": scan.CHUNK, "MP": 32}),
        ]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [2049, 32768, 131071])
def test_row_cumsum_on_gpu_matches_torch(n):
    g = torch.Generator().manual_seed(n)
    x = (torch.rand(8, n, generator=g) < 0.5).cuda()
    for dtype in (torch.int64, torch.int32):
        assert torch.equal(scan.row_cumsum(x, dtype), torch.cumsum(x, -1, dtype=dtype))
    from flexmask._compat import _unfused_cumsum  # the op the compiled build calls on torch < 2.13

    assert torch.equal(_unfused_cumsum(1 - x.long(), -1, torch.int64), torch.cumsum(1 - x.long(), -1))
