"""Kernels behind :func:`flexmask.attention`.

* :mod:`.flex` runs ``torch.nn.attention.flex_attention`` compiled by ``torch.compile`` (fused GPU
  kernels; on CPU, compiled forward only).
* :mod:`.reference` is an exact PyTorch implementation that chunks over queries: it runs anywhere,
  trains on CPU (where flex has no backward) and bounds memory.
* :mod:`.dma_layout` runs token-level DMA (``fm.topk``) through a key layout that skips work.
* :mod:`.key_bias` computes a per-key bias's gradient in closed form instead of flex's atomics,
  with :mod:`.key_mass` (a Triton kernel) for one of its terms.
"""
