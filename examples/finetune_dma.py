"""Convert a (tiny) Llama to Dynamic Mask Attention and fine-tune it for a few steps.

``flexmask.hf.to_dma`` adds a zero-initialised gate ``A`` and a projection ``dt_proj`` to every
attention layer: at first the model is unchanged while sequences fit ``keep_window``, and it is
sliding-window attention beyond. Fine-tuning then learns which keys to keep. The task here is
synthetic associative recall: a sequence of (key, value) token pairs, then the keys again, and the
model must recall each key's value, which sits far outside a sliding window.

    python examples/finetune_dma.py              # CPU: seconds
    python examples/finetune_dma.py --steps 200  # long enough for the loss to fall
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from flexmask.hf import load_dma, to_dma


def recall_batch(batch: int, pairs: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[k1 v1 k2 v2 ... | k1 v1 k2 v2 ...]`` with the loss on the recalled values only."""
    half = vocab // 2
    keys = torch.stack([torch.randperm(half, generator=generator)[:pairs] for _ in range(batch)])
    values = torch.randint(half, vocab, (batch, pairs), generator=generator)
    context = torch.stack([keys, values], -1).flatten(1)  # [B, 2·pairs]
    order = torch.stack([torch.randperm(pairs, generator=generator) for _ in range(batch)])
    query = torch.stack([keys.gather(1, order), values.gather(1, order)], -1).flatten(1)
    ids = torch.cat([context, query], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 2 * pairs + 1 :: 2] = ids[:, 2 * pairs + 1 :: 2]  # predict each value after its key
    return ids, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=24, help="key/value pairs: sequences of 4 × pairs tokens")
    parser.add_argument("--keep-window", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = 128
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).to(device)
    generator = torch.Generator().manual_seed(0)
    ids, labels = recall_batch(args.batch, args.pairs, vocab, generator)
    ids, labels = ids.to(device), labels.to(device)

    model.eval()
    with torch.no_grad():
        before = model(ids[:, : args.keep_window]).logits
        to_dma(model, keep_window=args.keep_window)  # zero A: unchanged inside the window
        after = model(ids[:, : args.keep_window]).logits
    print(
        f"converted: {model.config.flexmask_dma}; max |logit change| inside the window "
        f"{(before - after).abs().max().item():.1e}; sequences of {ids.shape[1]} tokens"
    )

    model.train()
    new = [p for name, p in model.named_parameters() if name.endswith((".A", ".dt_proj.weight", ".dt_proj.bias"))]
    opt = torch.optim.AdamW(
        [
            {"params": new, "lr": 1e-2},  # the new DMA parameters learn faster
            {"params": [p for p in model.parameters() if all(p is not q for q in new)], "lr": 1e-3},
        ]
    )
    progress = tqdm(range(args.steps), desc="fine-tune DMA")
    for _ in progress:
        ids, labels = recall_batch(args.batch, args.pairs, vocab, generator)
        loss = model(ids.to(device), labels=labels.to(device)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        gate = model.model.layers[0].self_attn.A
        progress.set_postfix(loss=f"{loss.item():.3f}", A0=f"{gate.abs().mean().item():.3f}")

    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        loaded = load_dma(LlamaForCausalLM, path).to(device).eval()
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(ids.to(device)).logits, loaded(ids.to(device)).logits)
    print(f"save_pretrained / load_dma round trip gives the same logits: {same}")


if __name__ == "__main__":
    main()
