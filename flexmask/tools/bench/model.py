"""``bench model``: training steps of a Llama-style decoder (transformers, built from a config: no
download) with SDPA, flexmask's causal attention and Dynamic Mask Attention.

For each length N, each variant trains in a fresh model built from the same seed: the same weights
and tokens, so SDPA and flexmask causal give the same loss. A step is ``zero_grad``, the forward
with ``labels`` (so the loss is the model's own), and ``backward``; no optimizer step. The variants:

* SDPA eager, and SDPA under ``torch.compile`` (both are shown);
* flexmask causal: ``fm.hf.apply(model)``, compiled;
* DMA token and DMA block: ``fm.hf.to_dma(model, keep_window, selection=...)``, compiled, with the
  gates ``A`` drawn from ``normal(0, 1)`` and ``dt_proj`` from ``normal(0, 1/fan_in)`` so that the
  selection depends on the content (with ``A = 0`` it would be a sliding window).

"Compiled" compiles each decoder layer (``layer.compile()``, as FSDP training does; default
``--compile-scope layers``) or the whole model (``model``). Under a whole-model compile transformers
builds its mask function inside the traced forward, where it cannot be read: flexmask then
evaluates it at every (query, key) pair to build each layer's BlockMask (``O(N²)`` work, no
``N²`` memory), and SDPA gets an explicit ``N × N`` mask.

Memory is freed between variants (and dynamo reset); a variant that runs out of memory reads
``OOM`` and the run goes on. Without CUDA the default sizes are refused (exit status 2); ``--tiny``
(2 layers, hidden 64, N 64 and 128, nothing compiled) runs in seconds on CPU.
"""

from __future__ import annotations

import argparse
import gc
import math
import time

import torch

import flexmask as fm

from ..errors import UsageError
from . import harness
from .harness import (
    Benchmark,
    Env,
    Note,
    Timing,
    finish,
    make_env,
    meta,
    sync,
    versions,
)
from .options import (
    add_device_arguments,
    add_run_arguments,
    apply_presets,
    csv_choices,
    parse_lengths,
    positive_int,
)
from .report import Column, Report, Row, fmt, ratio

VARIANTS = ("sdpa-eager", "sdpa-compiled", "flexmask", "dma-token", "dma-block")
DMA_SELECTION = {"dma-token": "token", "dma-block": "block"}

#: ``--tiny``: a CPU smoke run of a few seconds.
TINY = {
    "--layers": 2,
    "--hidden": 64,
    "--heads": 4,
    "--kv-heads": 2,
    "--head-dim": 16,
    "--intermediate": 128,
    "--vocab": 256,
    "--lengths": [64, 128],
    "--keep-window": 32,
    "--block-size": 16,
    "--steps": 2,
    "--warmup": 1,
}
#: Most floating-point operations of one training step a CPU run accepts (about a second, not minutes).
CPU_MAX_STEP_FLOPS = 1e11

COLUMNS = [
    Column("N", "N", "int"),
    Column("variant", "variant", "text"),
    Column("step_ms", "step ms", "ms"),
    Column("tokens_s", "tokens/s", "int"),
    Column("speedup", "vs SDPA eager", "x"),
    Column("peak_gib", "peak GiB", "gib"),
    Column("first_step_s", "first step s", "s"),
    Column("loss", "loss", "text"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``bench model``."""
    add_device_arguments(p, "model")
    p.add_argument(
        "--lengths",
        type=parse_lengths,
        default=parse_lengths("8k,32k,64k"),
        help="comma-separated sequence lengths, 'k' = 1024 (default 8k,32k,64k)",
    )
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per step (default 1)")
    p.add_argument("--layers", type=positive_int, default=8, help="decoder layers (default 8)")
    p.add_argument("--hidden", type=positive_int, default=2048, help="hidden size (default 2048)")
    p.add_argument("--heads", type=positive_int, default=16, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dimension (default 128)")
    p.add_argument("--intermediate", type=positive_int, default=5632, help="MLP intermediate size (default 5632)")
    p.add_argument("--vocab", type=positive_int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument(
        "--keep-window",
        type=positive_int,
        default=2048,
        help="DMA keys kept per query, fm.hf.to_dma's keep_window (default 2048)",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=128,
        help="DMA block selection's key block (default 128; at most --keep-window)",
    )
    p.add_argument(
        "--variants",
        type=csv_choices(VARIANTS),
        default=list(VARIANTS),
        help=f"subset of {','.join(VARIANTS)} (default all; sdpa-eager is the speedup reference)",
    )
    p.add_argument("--steps", type=positive_int, default=5, help="timed training steps (median; default 5)")
    p.add_argument(
        "--warmup",
        type=positive_int,
        default=2,
        help="untimed steps before them, the first including compilation (default 2)",
    )
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the compiled variants (auto: on with CUDA, off on CPU)",
    )
    p.add_argument(
        "--compile-scope",
        choices=["layers", "model"],
        default="layers",
        help="compile each decoder layer (default) or the whole model (transformers' mask function is then traced "
        "and cannot be read)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="2 layers, hidden 64, 4/2 heads of 16, vocab 256, N 64,128, keep window 32, blocks of 16, "
        "2 steps: a CPU smoke run of seconds (options given explicitly still apply)",
    )
    add_run_arguments(p, cell_timeout=900.0)


def _parameters(args) -> int:
    attn = args.hidden * args.head_dim * (2 * args.heads + 2 * args.kv_heads)
    mlp = 3 * args.hidden * args.intermediate
    return args.layers * (attn + mlp + 2 * args.hidden) + 2 * args.vocab * args.hidden + args.hidden


def _step_flops(args, n: int) -> float:
    """Forward + backward of one step: 6 per parameter and token, plus the causal attention scores."""
    tokens = args.batch * n
    return 6.0 * _parameters(args) * tokens + 6.0 * args.layers * args.batch * args.heads * args.head_dim * n * n


def _step_bytes(args, n: int) -> float:
    """A rough fp32 footprint: weights and gradients, about 30 hidden-sized activations per layer and
    token, and the logits (with the loss's copies)."""
    tokens = args.batch * n
    return 8.0 * _parameters(args) + 4.0 * tokens * (30 * args.layers * args.hidden + 3 * args.vocab)


def _check(args, device: torch.device) -> None:
    if args.heads % args.kv_heads:
        raise UsageError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if "dma-block" in args.variants and args.keep_window < args.block_size:
        raise UsageError(
            f"DMA block selection keeps --keep-window // --block-size blocks: --keep-window {args.keep_window} is "
            f"smaller than --block-size {args.block_size}"
        )
    if device.type == "cuda":
        return
    n = max(args.lengths)
    flops, need, free = _step_flops(args, n), _step_bytes(args, n), harness.available_memory()
    if flops > CPU_MAX_STEP_FLOPS or need > free / 2:
        raise UsageError(
            f"no CUDA device, and one training step at N={n} of this model is about "
            f"{flops / 1e12:.1f} TFLOP and {need / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free); on CPU add --tiny "
            "for a smoke run (seconds) or give small sizes (--layers, --hidden, --lengths, ...)"
        )


def _config(args, n_max: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=n_max,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        use_cache=False,
    )


def _title(variant: str, args, compiled: bool) -> str:
    names = {
        "sdpa-eager": "SDPA",
        "sdpa-compiled": "SDPA",
        "flexmask": "flexmask causal",
        "dma-token": f"DMA token top-{args.keep_window}",
        "dma-block": f"DMA block top-{args.keep_window // args.block_size}×{args.block_size}",
    }
    if variant == "sdpa-eager":
        return "SDPA eager"
    return f"{names[variant]} {'compiled' if compiled else '(not compiled: --compile off)'}"


def _model(env: Env, args, config, variant: str) -> torch.nn.Module:
    """A fresh model of ``config`` from ``--seed``, set up for ``variant``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(env.device):
        model = LlamaForCausalLM(config)
    model = model.to(env.dtype).train()
    if variant in ("sdpa-eager", "sdpa-compiled"):
        model.set_attn_implementation("sdpa")
    elif variant == "flexmask":
        fm.hf.apply(model)
    else:
        fm.hf.to_dma(model, args.keep_window, selection=DMA_SELECTION[variant], block_size=args.block_size)
        with torch.no_grad():  # content-based selection: random gates and projections
            for module in model.modules():
                if hasattr(module, "dt_proj") and hasattr(module, "A"):
                    module.A.normal_(0.0, 1.0)
                    module.dt_proj.weight.normal_(0.0, module.dt_proj.in_features**-0.5)
    return model


def _measure(env: Env, args, config, n: int, variant: str, compiled: bool) -> Row:
    """One variant at one length: first step (with compilation), warm-up, timed steps, peak memory."""
    dev = env.device
    model = _model(env, args, config, variant)
    run_model = _compiled(model, args.compile_scope) if compiled else model
    tokens = torch.Generator().manual_seed(args.seed + n)  # the same tokens for every variant at this N
    ids = torch.randint(0, args.vocab, (args.batch, n), generator=tokens).to(dev)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = run_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach()

    t0 = time.perf_counter()
    loss = float(step())
    sync(dev)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    sync(dev)
    if env.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    timing = Timing.of(times)
    peak: float | Note = torch.cuda.max_memory_allocated(dev) / 2**30 if env.cuda else Note("n/a (CPU)")
    return {
        "step_ms": timing,
        "tokens_s": args.batch * n / (timing.median / 1e3),
        "peak_gib": peak,
        "first_step_s": first_s,
        "loss": f"{loss:.4f}" if math.isfinite(loss) else str(loss),
    }


def _compiled(model: torch.nn.Module, scope: str) -> torch.nn.Module:
    """``model`` with each decoder layer compiled (``"layers"``), or ``torch.compile(model)`` (``"model"``)."""
    if scope == "model":
        return torch.compile(model)
    for layer in model.model.layers:
        layer.compile()
    return model


def _free(env: Env, compiled: bool) -> None:
    gc.collect()
    if compiled:
        torch._dynamo.reset()  # the next variant compiles from scratch, and this one's graphs are freed
    if env.cuda:
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    """``bench model``: training steps of a Llama-style decoder, SDPA vs flexmask causal vs DMA."""
    if args.tiny:
        apply_presets(args, argv, TINY)
    env = make_env(args)
    _check(args, env.device)
    try:
        import transformers
    except ImportError:
        raise UsageError("bench model needs transformers: pip install 'transformers>=5.4,<6'") from None
    compile_on = args.compile == "on" or (args.compile == "auto" and env.cuda)
    runner = env.runner
    lengths = sorted(dict.fromkeys(args.lengths))
    config = _config(args, max(lengths))
    dtype = str(env.dtype).replace("torch.", "")
    summary = (
        f"Llama-style decoder from a transformers LlamaConfig: {args.layers} layers, hidden {args.hidden}, "
        f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, intermediate {args.intermediate}, "
        f"vocab {args.vocab} "
        f"({_parameters(args) / 1e6:.1f} M parameters), {dtype}, batch {args.batch}; DMA keep_window "
        f"{args.keep_window}, block selection {args.keep_window // args.block_size} blocks of {args.block_size}"
    )
    timing = (
        f"median of {args.steps} training steps after {args.warmup} untimed ones (the first, with compilation, is "
        "'first step s'); step = zero_grad + forward with labels (loss) + backward, no optimizer step, "
        "device synchronised around each; "
        + (
            "peak = torch.cuda.max_memory_allocated over the timed steps (weights, gradients, activations)"
            if env.cuda
            else "memory not measured"
        )
    )
    extra: dict[str, str] = {
        "compile": (
            "each decoder layer compiled (layer.compile(), default options)"
            if args.compile_scope == "layers"
            else "torch.compile(model) (default options)"
        )
        + " for the compiled variants; dynamo reset between variants"
        if compile_on
        else "nothing compiled (--compile off)"
    }
    if not env.cuda:
        extra["smoke"] = "CPU smoke run: flexmask uses its reference backend; the numbers say nothing about GPU speed"
    info = meta(
        env,
        argv,
        "model",
        summary,
        timing=timing,
        software=versions(f"transformers {transformers.__version__}"),
        **extra,
    )
    report = Report("flexmask bench model", info, args.out)
    rows = report.section(
        f"Training step, {args.layers} layers, hidden {args.hidden}, Hq={args.heads}, Hkv={args.kv_heads}, "
        f"batch {args.batch}",
        COLUMNS,
        [
            "step ms: one training step (forward with the loss, backward); tokens/s = batch · N / step; vs SDPA "
            "eager: SDPA eager's step / this step (higher is faster); loss: of the first step (the same weights "
            "and tokens for every variant: SDPA and flexmask causal agree; DMA's random gates change it).",
            "With --compile-scope model, transformers builds an explicit mask for SDPA under torch.compile (a masked "
            "kernel, slower than eager), and flexmask evaluates transformers' mask function at every (query, key) "
            "pair. OOM: the variant ran out of memory at that N.",
        ],
    )
    for n in lengths:
        reference: Row | None = None
        for variant in [v for v in VARIANTS if v in args.variants]:
            compiled = compile_on and variant != "sdpa-eager"
            row: Row = {"N": n, "variant": _title(variant, args, compiled), "key": variant, "compiled": compiled}
            result = runner.run(
                f"model N={n} {variant}", lambda n=n, v=variant, c=compiled: _measure(env, args, config, n, v, c)
            )
            if isinstance(result, Note):
                row["step_ms"] = Note("OOM") if result == "error: out of memory" else result
            else:
                row.update(result)
            _free(env, compiled)
            if variant == "sdpa-eager":
                reference = row
            if reference is not None and "tokens_s" in row:
                row["speedup"] = ratio(reference.get("step_ms"), row["step_ms"])
            rows.append(row)
            runner.log(
                f"model N={n} {row['variant']}: step {fmt(row.get('step_ms'), 'ms')} ms, "
                f"{fmt(row.get('tokens_s'), 'int')} tokens/s, peak {fmt(row.get('peak_gib'), 'gib')} GiB, "
                f"first step {fmt(row.get('first_step_s'), 's')} s"
            )
            report.save()
    return finish(report, runner)


BENCHMARK = Benchmark(
    name="model",
    help="training steps of a Llama-style decoder: SDPA vs flexmask causal vs DMA",
    description=(
        "Training steps (forward, loss, backward) of a Llama-style decoder built from a transformers config (no "
        "download): SDPA eager and compiled, flexmask causal (fm.hf.apply), DMA token and block (fm.hf.to_dma with "
        "random gates), each in a fresh model from the same seed; step time, tokens/s, peak memory; out of memory "
        "reads OOM. Without CUDA the default sizes are refused with exit status 2; --tiny is a CPU smoke run of "
        "seconds."
    ),
    add_arguments=add_arguments,
    run=run,
)
