"""Kernels behind :func:`flexmask.attention`.

* :mod:`.flex` runs ``torch.nn.attention.flex_attention`` compiled by ``torch.compile`` (fused GPU
  kernels; on CPU, compiled forward only).
* :mod:`.reference` is an exact PyTorch implementation that chunks over queries: it runs anywhere,
  trains on CPU (where flex has no backward) and bounds memory.
"""
