"""flexmask: sparse and structured attention in a few lines, on FlexAttention.

Example:
    >>> import torch, flexmask as fm
    >>> q = k = v = torch.randn(1, 4, 64, 32)
    >>> mask = fm.causal() & (fm.sliding_window(16) | fm.prefix_lm(8))
    >>> fm.attention(q, k, v, mask=mask, bias=fm.alibi(4)).shape
    torch.Size([1, 4, 64, 32])
"""

from .attention import attention
from .bias import Bias, alibi, head_bias, key_bias, relative_bias, tensor_bias
from .dma import DynamicMaskAttention, dynamic_bias, topk, topk_blocks
from .masks import Mask, causal, chunked, document, full, mask, padding, prefix_lm, sliding_window
from .plot import plot, record_masks

__version__ = "0.1.0"


def __getattr__(name: str):
    # `fm.hf` without importing transformers at `import flexmask`
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'flexmask' has no attribute {name!r}")

__all__ = [
    "Bias",
    "DynamicMaskAttention",
    "Mask",
    "alibi",
    "attention",
    "causal",
    "chunked",
    "document",
    "dynamic_bias",
    "full",
    "head_bias",
    "key_bias",
    "mask",
    "padding",
    "plot",
    "prefix_lm",
    "record_masks",
    "relative_bias",
    "sliding_window",
    "tensor_bias",
    "topk",
    "topk_blocks",
]
