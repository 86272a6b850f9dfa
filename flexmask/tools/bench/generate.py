"""``bench generate``: ``model.generate()`` of the Llama-style decoder of ``bench model`` with a
static KV cache and transformers' compiled decoding step, for SDPA, flexmask causal and DMA.

For each prompt length, each variant gets a fresh model from the same seed (DMA with random gates
``A``, as in ``bench model``) and the same prompt. One untimed ``generate`` warms up (and compiles);
then ``generate`` with one new token (the prefill) and with ``--new-tokens`` are timed, and the
decoding rate is ``(new_tokens - 1) / (t_all - t_prefill)``. Without CUDA the default sizes are
refused; ``--tiny`` runs in seconds on CPU (nothing compiled there unless ``--compile on``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..errors import UsageError
from . import model as model_bench
from .harness import Benchmark, Note, finish, make_env, meta, sync, versions
from .options import apply_presets, csv_choices, parse_lengths, positive_int
from .report import Column, Report, Row, fmt, ratio

VARIANTS = ("sdpa", "flexmask", "dma-token", "dma-block")
TITLES = {"sdpa": "SDPA", "flexmask": "flexmask causal", "dma-token": "DMA token", "dma-block": "DMA block"}
COLUMNS = [
    Column("N", "prompt", "int"),
    Column("variant", "variant", "text"),
    Column("prefill_s", "prefill s", "s"),
    Column("decode_tok_s", "decode tokens/s", "int"),
    Column("speedup", "vs SDPA", "x"),
    Column("same_tokens", "tokens = SDPA's", "text"),
]
TINY = {
    **model_bench.TINY,
    "--lengths": [96],
    "--new-tokens": 6,
    "--keep-window": 32,
    "--block-size": 16,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_bench.add_arguments(p)
    for action in p._actions:  # the model's options, with this command's defaults and variants
        if action.dest == "lengths":
            action.default = parse_lengths("16k,64k")
            action.help = "prompt lengths, 'k' = 1024 (default 16k,64k)"
        elif action.dest == "variants":
            action.type = csv_choices(VARIANTS)
            action.default = list(VARIANTS)
            action.help = f"subset of {','.join(VARIANTS)} (default all; sdpa is the reference)"
        elif action.dest == "steps":
            action.default = 3
            action.help = "timed generate() calls of each length, prefill and full (medians; default 3)"
        elif action.dest == "warmup":
            action.default = 1
            action.help = "untimed generate() calls before them, the first compiling the decoding step (default 1)"
    p.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated (default 128)")


def _measure(env, args, config, n: int, variant: str, compiled: bool) -> tuple[Row, torch.Tensor]:
    key = {"sdpa": "sdpa-eager", "flexmask": "flexmask"}.get(variant, variant)
    model = model_bench._model(env, args, config, key).eval()
    # token 0 is the pad token: a prompt holding it would read as padded (generate() masks pad tokens)
    prompt = torch.randint(1, args.vocab, (args.batch, n), generator=torch.Generator().manual_seed(args.seed + n))
    prompt = prompt.to(env.device)
    settings: dict = dict(
        do_sample=False, pad_token_id=0, cache_implementation="static", attention_mask=torch.ones_like(prompt)
    )
    if compiled:
        from transformers import CompileConfig

        settings["compile_config"] = CompileConfig()
    else:
        settings["disable_compile"] = True

    def generate(tokens: int) -> tuple[float, torch.Tensor]:
        sync(env.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **settings)
        sync(env.device)
        return time.perf_counter() - t0, out

    for _ in range(args.warmup):  # the first compiles the decoding step
        generate(args.new_tokens)
    prefill = statistics.median(generate(1)[0] for _ in range(args.steps))
    runs = [generate(args.new_tokens) for _ in range(args.steps)]
    total, out = statistics.median(t for t, _ in runs), runs[-1][1]
    if total <= prefill:  # timing noise larger than the decoding itself (tiny CPU runs): no rate to report
        rate: float | Note = Note(f"n/a (generate({args.new_tokens}) took no longer than the prefill)")
    else:
        rate = (args.new_tokens - 1) / (total - prefill)
    return {"prefill_s": prefill, "decode_tok_s": rate}, out[:, n:].cpu()


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    """``bench generate``: decoding tokens/s with a static cache, SDPA vs flexmask causal vs DMA."""
    if args.tiny:
        apply_presets(args, argv, TINY)
    env = make_env(args)
    model_bench._check(args, env.device)
    try:
        import transformers
    except ImportError:
        raise UsageError("bench generate needs transformers: pip install 'transformers>=5.4,<6'") from None
    compiled = args.compile == "on" or (args.compile == "auto" and env.cuda)
    lengths = sorted(dict.fromkeys(args.lengths))
    config = model_bench._config(args, max(lengths) + args.new_tokens)
    config.use_cache = True
    summary = (
        f"Llama-style decoder: {args.layers} layers, hidden {args.hidden}, Hq={args.heads}, Hkv={args.kv_heads}, "
        f"D={args.head_dim}, {str(env.dtype).replace('torch.', '')}, batch {args.batch}, {args.new_tokens} new "
        f"tokens, greedy, static cache; DMA keep_window {args.keep_window} (random gates)"
    )
    timing = (
        "wall clock of model.generate, device synchronised: prefill = generate(1 token); decode tokens/s = "
        f"(new tokens - 1) / (generate({args.new_tokens}) - prefill); each time the median of {args.steps} calls, "
        f"after {args.warmup} untimed generate({args.new_tokens})"
    )
    info = meta(
        env,
        argv,
        "generate",
        summary,
        timing=timing,
        software=versions(f"transformers {transformers.__version__}"),
        compile="transformers' compiled decoding step (default CompileConfig)" if compiled else "not compiled",
    )
    report = Report("flexmask bench generate", info, args.out)
    rows = report.section(
        f"generate(), static cache, batch {args.batch}",
        COLUMNS,
        [
            "vs SDPA: decoding tokens/s over SDPA's (higher is faster). tokens = SDPA's: whether greedy decoding "
            "produced SDPA's tokens (expected for flexmask causal; DMA's random gates change the model)."
        ],
    )
    for n in lengths:
        reference: tuple[Row, torch.Tensor] | None = None
        for variant in [v for v in VARIANTS if v in args.variants]:
            row: Row = {"N": n, "variant": TITLES[variant] + (" compiled" if compiled else ""), "key": variant}
            result = env.runner.run(
                f"generate N={n} {variant}", lambda n=n, v=variant: _measure(env, args, config, n, v, compiled)
            )
            if isinstance(result, Note):
                row["decode_tok_s"] = Note("OOM") if result == "error: out of memory" else result
                tokens = None
            else:
                values, tokens = result
                row.update(values)
            model_bench._free(env, compiled)
            if variant == "sdpa" and tokens is not None:
                reference = (row, tokens)
            if reference is not None and tokens is not None:
                row["speedup"] = ratio(row.get("decode_tok_s"), reference[0].get("decode_tok_s"))
                row["same_tokens"] = "yes" if torch.equal(tokens, reference[1]) else "no"
            rows.append(row)
            env.runner.log(f"generate N={n} {row['variant']}: {fmt(row.get('decode_tok_s'), 'int')} tokens/s")
            report.save()
    return finish(report, env.runner)


BENCHMARK = Benchmark(
    name="generate",
    help="generate() with a static cache and a compiled decoding step: SDPA vs flexmask causal vs DMA",
    description=(
        "model.generate() of the Llama-style decoder of `bench model` with transformers' static cache and compiled "
        "decoding step: prefill time and decoding tokens/s for SDPA, flexmask causal, DMA token and block. Without "
        "CUDA the default sizes are refused with exit status 2; --tiny is a CPU smoke run of seconds."
    ),
    add_arguments=add_arguments,
    run=run,
)
