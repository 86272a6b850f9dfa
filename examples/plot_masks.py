"""Draw masks, attention probabilities and the masks a small DMA model used.

Run: ``python examples/plot_masks.py [OUT_DIR]`` (default ``out/plots``); it prints the files it wrote.
Needs matplotlib (``pip install -e '.[viz]'``). Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import flexmask as fm
from flexmask.viz import plot, plot_attention, plot_layers, record_masks


class TinyDMAModel(nn.Module):
    """Three Dynamic Mask Attention layers with residual connections: just enough to record."""

    def __init__(self, hidden: int = 64, heads: int = 4, keep_window: int = 12):
        super().__init__()
        self.layers = nn.ModuleList(
            fm.DynamicMaskAttention(hidden, num_heads=heads, num_kv_heads=2, keep_window=keep_window) for _ in range(3)
        )
        for layer in self.layers:  # A = 0 would make every layer a plain sliding window
            nn.init.normal_(layer.A, std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def main(out_dir: str = "out/plots") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    written = []

    def save(fig, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=120)
        written.append(path)

    # 1. a composed mask, token by token, one panel per head
    per_head = fm.mask(lambda b, h, q, kv: q - kv < 8 * (h + 1), name="window_per_head")
    sinks = fm.mask(lambda b, h, q, kv: kv < 2, name="sinks")
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([30, 20, 30]))[None]
    save(plot(fm.causal() & (per_head | sinks) & fm.document(ids), 80, 80, heads=4), "mask_heads.png")

    # 2. a long mask: drawn from its BlockMask (empty / partial / full blocks), never dense
    long = fm.sliding_window(8192) | (fm.chunked(1 << 16) & fm.causal())
    save(plot(long, 1 << 18, 1 << 18), "mask_blocks.svg")

    # 3. attention probabilities with a mask and a bias (GQA: 4 query heads over 2 key heads)
    q, k = torch.randn(1, 4, 40, 32), torch.randn(1, 2, 40, 32)
    save(
        plot_attention(q, k, mask=fm.causal() & fm.sliding_window(16), bias=fm.alibi(4), softcap=20.0), "attention.png"
    )

    # 4. what every DMA layer of a model kept for one 2048-token input: layers × heads, each cell the
    #    share of its 8×8 tokens kept (token level, pooled); titles give each head's sparsity
    model = TinyDMAModel(keep_window=128)
    with torch.no_grad(), record_masks() as rec:
        model(torch.randn(1, 2048, 64))
    for i, (call, sparsity) in enumerate(zip(rec, rec.sparsity(), strict=True)):
        print(f"layer {i}: {call.mask!r}, {call.picture.level} picture, sparsity per head {sparsity.round(1)}%")
    save(plot_layers(rec), "dma_layers.pdf")
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="out/plots", help="where to write (default out/plots)")
    for path in main(parser.parse_args().out_dir):
        print(f"wrote {path}")
