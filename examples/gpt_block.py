"""A nanoGPT-style model that calls ``F.scaled_dot_product_attention``, given a sparse mask without editing it.

``fm.route_sdpa(mask=...)`` routes every SDPA call inside it through ``flexmask.attention``:
here each layer attends causally within a sliding window of 64 tokens plus the first 16 tokens
(attention sinks). The script checks the routed model against the same model fed an explicit dense
mask, takes a training step, and on CUDA runs the model under ``torch.compile``.

    python examples/gpt_block.py            # CPU: a few seconds
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import flexmask as fm
from flexmask import route_sdpa


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attn_mask)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 128, heads: int = 4, layers: int = 2, max_len: int = 1024):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.head(x)


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    T = 1024 if device == "cuda" else 256
    model = GPT(max_len=T).to(device)
    idx = torch.randint(0, 256, (2, T), device=device)

    mask = fm.causal() & (fm.sliding_window(64) | fm.prefix_lm(16))  # window + 16 sink tokens
    dense = mask.to_dense(T, T, device=device)  # [1, 1, T, T] bool, only to check the routed model
    print(f"mask: {mask}  (block sparsity {mask.block_mask(T, T, device=device).sparsity():.0f}%)")

    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        expected = model(idx, attn_mask=dense)  # plain SDPA with the dense mask
        with route_sdpa(mask=mask):
            routed = model(idx)  # the model's own is_causal=True call, plus the mask
    err = (routed.float() - expected.float()).abs().max().item()
    print(f"routed vs dense-masked SDPA: max |diff| = {err:.2e}")
    assert err < (5e-2 if device == "cuda" else 1e-4)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    with route_sdpa(mask=mask), torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1).float(), idx[:, 1:].flatten())
    loss.backward()
    opt.step()
    print(f"training step: loss {loss.item():.3f}")

    if device == "cuda":
        compiled = torch.compile(model.eval())
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            with route_sdpa(mask=mask):
                compiled(idx)  # compile
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = compiled(idx)
                torch.cuda.synchronize()
                took = (time.perf_counter() - start) * 1e3
            reference = model(idx, attn_mask=dense)
        err = (out.float() - reference.float()).abs().max().item()
        print(f"torch.compile: {took:.1f} ms per forward, max |diff| vs dense SDPA {err:.2e}")


if __name__ == "__main__":
    main()
