"""Train a Llama-style decoder with flexmask attention under FSDP2, optionally with the sequence split
over the ranks (context parallelism).

The model is the one of ``python -m flexmask bench model``: a ``LlamaForCausalLM`` built from a
transformers config (no download), with flexmask's causal attention (``--variant flexmask``) or
Dynamic Mask Attention (``fm.hf.to_dma``; ``dma-token``, ``dma-block``). Its weights are sharded
with ``torch.distributed.fsdp.fully_shard`` (each decoder layer, then the root). The sequences are
split one of two ways:

* ``--cp off`` (data parallel): each rank trains on ``--batch / world`` whole sequences;
* ``--cp contiguous`` or ``--cp balanced`` (context parallel): every rank holds a shard of
  ``N / world`` positions of each of the ``--batch`` sequences, and attention runs through
  ``flexmask.distributed.attention`` (registered as a transformers attention implementation).
  ``balanced`` evens out causal attention, whose work grows along the sequence; DMA keeps the same
  number of keys per query, so ``contiguous`` is already even for it (and one call per rank).

Each step prints the loss (the mean over every token of the global batch) and the tokens per second
of each rank (the tokens it holds, over the step time)::

    torchrun --nproc-per-node 2 examples/train_fsdp.py --tiny                  # CPU, gloo: seconds
    torchrun --nproc-per-node 2 examples/train_fsdp.py --tiny --cp balanced
    torchrun --nproc-per-node 2 examples/train_fsdp.py --length 131072 --cp balanced --variant flexmask
    torchrun --nproc-per-node 2 examples/train_fsdp.py --length 131072 --cp contiguous --variant dma-block

On CUDA the backend is NCCL, the weights compute in bf16 (``MixedPrecisionPolicy``, gradients reduced
in fp32) and each decoder layer is compiled (``--compile``); on CPU, gloo and fp32, nothing compiled.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import flexmask as fm
import flexmask.distributed as fmd

VARIANTS = ("flexmask", "dma-token", "dma-block")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
#: ``--tiny``: a CPU smoke run of seconds (options given explicitly still apply).
TINY = dict(
    layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=256, length=128,
    keep_window=32, block_size=16, steps=3,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS, default="dma-token", help="attention (default dma-token)")
    p.add_argument(
        "--cp",
        choices=["off", "contiguous", "balanced"],
        default="off",
        help="split each sequence over the ranks in this layout (default off: data parallel)",
    )
    p.add_argument("--length", type=int, default=8192, help="tokens per sequence N (default 8192)")
    p.add_argument(
        "--batch", type=int, default=None, help="sequences per step, whole group (default: world, or 1 with --cp)"
    )
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--keep-window", type=int, default=2048, help="DMA keys kept per query (default 2048)")
    p.add_argument("--block-size", type=int, default=128, help="DMA block selection's key block (default 128)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on with CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, N 128, 3 steps: a CPU smoke run")
    args = p.parse_args(argv)
    if args.tiny:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for name, value in TINY.items():
            if f"--{name.replace('_', '-')}" not in given:
                setattr(args, name, value)
    return args


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.float32):
    """The decoder of ``args`` from ``args.seed``, with the attention of ``args.variant``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.length,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if args.variant == "flexmask":
        return fm.hf.apply(model)
    selection = "token" if args.variant == "dma-token" else "block"
    fm.hf.to_dma(model, args.keep_window, selection=selection, block_size=args.block_size)
    with torch.no_grad():  # content-based selection from the start: random gates (as bench model)
        for module in model.modules():
            if hasattr(module, "dt_proj") and hasattr(module, "A"):
                module.A.normal_(0.0, 1.0)
                module.dt_proj.weight.normal_(0.0, module.dt_proj.in_features**-0.5)
    return model


def enable_context_parallel(model, layout: fmd.ShardLayout):
    """Split ``model``'s sequences over the ranks (context parallelism): every attention layer runs
    :func:`flexmask.distributed.attention` on this rank's shard; DMA gathers every key's score."""
    return fm.hf.apply(model, sequence_sharding=fmd.SequenceSharding(layout))  # keeps to_dma's settings


def shard_model(model, mesh, mp_policy=None):
    """FSDP2: each decoder layer a unit, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


def global_batch(args: argparse.Namespace, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[batch, N]`` of ``step`` (the same on every rank) and their next-token labels."""
    g = torch.Generator().manual_seed(args.seed * 1000 + step)
    ids = torch.randint(0, args.vocab, (batch, args.length), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)  # shifted before any split
    return ids, labels


def rank_batch(ids, labels, cp: str, rank: int, world: int):
    """This rank's ``(ids, labels, position_ids)``: rows (data parallel) or shards (``cp`` layout)."""
    if cp == "off":
        rows = ids.shape[0] // world
        part = slice(rank * rows, (rank + 1) * rows)
        return ids[part], labels[part], None
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return tuple(fmd.shard(t, 1, layout=cp) for t in (ids, labels, positions))


def rank_loss(model, ids, labels, positions, total_tokens: int, world: int) -> torch.Tensor:
    """This rank's loss: the cross-entropy summed over its tokens, over ``total_tokens / world``.

    FSDP averages the gradients of the ranks, so this gives the gradient of the mean over every
    token of the global batch (and the ranks' losses average to it).
    """
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    logits = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))  # bf16: in fp32
    ce = F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")
    return ce * world / total_tokens


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = DTYPES.get(args.dtype, torch.bfloat16 if cuda else torch.float32)
    batch = args.batch or (1 if args.cp != "off" else world)
    parts = world * (2 if args.cp == "balanced" else 1)
    if args.cp == "off" and batch % world:
        raise SystemExit(f"--batch {batch} must be a multiple of the {world} ranks (data parallel)")
    if args.cp != "off" and args.length % parts:
        raise SystemExit(f"--length {args.length} must be a multiple of {parts} for --cp {args.cp}")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = dtype == torch.bfloat16
    model = build_model(args, device, torch.float32 if bf16 else dtype)  # bf16: compute through the policy
    if args.cp != "off":
        enable_context_parallel(model, args.cp)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    shard_model(model, init_device_mesh(device.type, (world,)), policy)
    if args.compile == "on" or (args.compile == "auto" and cuda):
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{args.variant}, {params / 1e6:.1f} M parameters (FSDP2 over {world} ranks), N={args.length}, "
            f"batch {batch}, " + ("data parallel" if args.cp == "off" else f"context parallel ({args.cp})")
        )
    times = []
    for step in range(args.steps):
        ids, labels = global_batch(args, step, batch)
        total = int((labels != -100).sum())
        mine = rank_batch(ids, labels, args.cp, rank, world)
        ids, labels, positions = (None if t is None else t.to(device) for t in mine)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = rank_loss(model, ids, labels, positions, total, world)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        times.append(seconds)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean = mean.item() / world
        tokens = ids.numel()  # this rank's tokens
        peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        print(
            f"rank {rank} step {step}: loss {mean:.4f}, {seconds * 1e3:.0f} ms, {tokens / seconds:,.0f} tokens/s{peak}"
            + ("" if math.isfinite(mean) else " (loss not finite)"),
            flush=True,
        )
    timed = sorted(times[2:] if len(times) > 2 else times)  # the first steps compile and warm up
    median = timed[len(timed) // 2]
    print(
        f"rank {rank} summary: median step {median * 1e3:.0f} ms (steps {args.steps - len(timed)}..{args.steps - 1}), "
        f"{tokens / median:,.0f} tokens/s per rank ({tokens} tokens per rank and step){peak}",
        flush=True,
    )
    # Free what holds the process group (the FSDP modules, their mesh) before destroying it, so that
    # gloo's worker threads end now and not while Python shuts down (an abort at exit, ~1 run in 8).
    del model, opt, loss
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
