"""``bench decode``: one layer's decoding step — one new query against a KV cache of ``L`` keys —
for SDPA, flex causal, and DMA token and block selection (the selection recomputed from all ``L``
scores in every step, as when a token arrives; or, for token selection, carried on from the
previous query's kept keys), eager and replayed from a CUDA graph.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

import flexmask as fm

from ..errors import UsageError
from .dma import dma_selection
from .harness import Benchmark, Note, finish, make_env, meta
from .options import add_device_arguments, add_run_arguments, apply_presets, csv_choices, parse_lengths
from .report import Column, Report, Row, ratio

VARIANTS = ("sdpa", "flex-causal", "token", "token-step", "block")
TITLES = {
    "sdpa": "SDPA (all keys)",
    "flex-causal": "flexmask causal (flex)",
    "token": "DMA token top-w",
    "token-step": "DMA token top-w, kept keys carried",
    "block": "DMA block top-w/128",
}
COLUMNS = [
    Column("L", "L (cached keys)", "int"),
    Column("B", "batch", "int"),
    Column("variant", "variant", "text"),
    Column("eager_ms", "eager ms", "ms"),
    Column("eager_x", "eager vs SDPA eager", "x"),
    Column("graphed_ms", "CUDA graph ms", "ms"),
    Column("graphed_x", "graph vs SDPA graph", "x"),
]
NOTES = [
    "One decoding step of one attention layer: q [B, Hq, 1, D] against k, v [B, Hkv, L, D]. SDPA attends to "
    "every key (the last row of causal attention). DMA rows rebuild their selection from fresh per-key scores "
    "[B, Hkv, L] in every step (options={'cache': False}): one top-k over all L scores, then attention over the "
    "kept keys only (flexmask's gather plan). `x` columns: SDPA's time over the variant's (higher is faster).",
    "DMA token, kept keys carried: the previous query's kept keys are state beside the cache (as fm.hf keeps "
    "them on a static cache layer), and the step goes on from them: `sel.keep(t, previous=kept)`, O(w) instead "
    "of a top-k over all L scores, written back in place, then attention with `fm.topk(s, w, kept=kept)`.",
    "CUDA graph: the whole step (selection included) captured once and replayed; eager: Python and launches included.",
    "dynamo is reset before each (L, batch): the selection compiles for that shape, as in a decoding step over a "
    "static cache. A cache that grows by one key per step runs the dynamic-shape compilation instead (block "
    "selection at L=128k on an H200: 21.6 against 15.5 us).",
]
TINY = {
    "--lengths": parse_lengths("256,512"),
    "--batches": [1, 2],
    "--heads": 4,
    "--kv-heads": 2,
    "--head-dim": 16,
    "--window": 64,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_device_arguments(p, None)
    p.add_argument(
        "--lengths",
        type=parse_lengths,
        default=parse_lengths("16k,64k,128k"),
        help="cached keys L, comma-separated, 'k' = 1024 (default 16k,64k,128k)",
    )
    p.add_argument(
        "--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8], help="batch sizes (default 1,8)"
    )
    p.add_argument("--heads", type=int, default=16, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--window", type=int, default=2048, help="keys kept per query w (default 2048)")
    p.add_argument(
        "--variants",
        type=csv_choices(VARIANTS),
        default=list(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument("--no-graphs", action="store_true", help="eager timings only")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warmup (default 25 ms)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (default 100 ms)")
    add_run_arguments(p)
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke run (eager only)")


def _step(variant: str, q, k, v, s, window: int) -> Callable[[], torch.Tensor]:
    if variant == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    if variant == "flex-causal":
        return lambda: fm.attention(q, k, v, mask=fm.causal())
    if variant == "token-step":
        t = torch.full((1,), s.shape[-1] - 1, device=s.device)  # the query's position, a tensor as in generate()
        selection = fm.topk(s, window)
        held = selection.keep(s.shape[-1] - 2)  # the previous query's kept keys, rewritten in place each step
        mask = fm.topk(s, window, kept=held)

        def step() -> torch.Tensor:
            held.copy_(selection.keep(t, previous=held))
            return fm.attention(q, k, v, mask=mask, bias=fm.key_bias(s), q_offset=t)

        return step
    select = dma_selection(variant, window)
    return lambda: fm.attention(q, k, v, mask=select(s), bias=fm.key_bias(s), options={"cache": False})


def _graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); returns the replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    """``bench decode``: a layer's decoding step for SDPA, flex causal and DMA, eager and graphed."""
    if args.tiny:
        apply_presets(args, argv, TINY)
    if args.heads % args.kv_heads:
        raise UsageError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    args.dtype = "auto"
    env = make_env(args)
    if (
        not env.cuda
        and not args.tiny
        and max(args.lengths) * max(args.batches) * args.kv_heads * args.head_dim > 1 << 28
    ):
        raise UsageError("on CPU, bench decode runs the --tiny sizes (or give small --lengths/--batches)")
    graphs = env.cuda and not args.no_graphs
    config = (
        f"{str(env.dtype).replace('torch.', '')}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
        f"w={args.window} (block selection: {max(1, args.window // 128)} blocks of 128 + the query's own), "
        "key scores float32 [B, Hkv, L]"
    )
    timing = "triton.testing.do_bench median (CUDA events)" if env.cuda else "wall-clock loop, median (CPU smoke run)"
    report = Report("flexmask bench decode", meta(env, argv, "decode", config, timing=timing), args.out)
    rows = report.section(f"Decoding step, Hq={args.heads}, Hkv={args.kv_heads}", COLUMNS, NOTES)
    for L in args.lengths:
        for B in args.batches:
            torch._dynamo.reset()  # a fresh compile per shape (not the dynamic one a second shape triggers)
            _one(env, args, L, B, rows, graphs, report)
            env.runner.cleanup()
    return finish(report, env.runner)


def _one(env, args, L: int, B: int, rows: list[Row], graphs: bool, report: Report) -> None:
    dev, dt, d = env.device, env.dtype, args.head_dim
    q = torch.randn(B, args.heads, 1, d, device=dev, dtype=dt)
    k = torch.randn(B, args.kv_heads, L, d, device=dev, dtype=dt)
    v = torch.randn(B, args.kv_heads, L, d, device=dev, dtype=dt)
    s = torch.randn(B, args.kv_heads, L, generator=env.gen).to(dev)
    sdpa: Row | None = None
    for variant in args.variants:
        row: Row = {"L": L, "B": B, "variant": TITLES[variant], "key": variant}
        label = f"decode L={L} B={B} {variant}"
        fn = _step(variant, q, k, v, s, args.window)
        with torch.no_grad():
            row["eager_ms"] = env.runner.run(label, lambda fn=fn: env.clock(fn))
            if graphs:
                replay = env.runner.run(f"{label} capture", lambda fn=fn: _graphed(fn, dev))
                row["graphed_ms"] = (
                    replay
                    if isinstance(replay, Note)
                    else env.runner.run(f"{label} graph", lambda r=replay: env.clock(r))
                )
        if variant == "sdpa":
            sdpa = row
        if sdpa is not None:
            row["eager_x"] = ratio(sdpa.get("eager_ms"), row.get("eager_ms"))
            row["graphed_x"] = ratio(sdpa.get("graphed_ms"), row.get("graphed_ms"))
        rows.append(row)
        env.runner.log(f"{label}: eager {row.get('eager_ms')}, graphed {row.get('graphed_ms')}")
        report.save()


BENCHMARK = Benchmark(
    name="decode",
    help="one layer's decoding step: SDPA, flex causal, DMA token/block (eager and CUDA-graphed)",
    description=(
        "One query against a KV cache of L keys, per layer: SDPA, flexmask causal, and DMA token and block selection "
        "with the selection rebuilt from all L scores every step; eager and replayed from a CUDA graph. Without "
        "CUDA it runs only small sizes (--tiny)."
    ),
    add_arguments=add_arguments,
    run=run,
)
