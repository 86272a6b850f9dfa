"""``bench cp``: one attention layer's training step (forward and backward) over a sequence split
across 1, 2, … GPUs with :func:`flexmask.distributed.attention`, against the same layer on one GPU
(:func:`flexmask.attention`).

Each (length, variant, GPU count) runs in fresh processes (one per GPU, NCCL; gloo on CPU), so a
configuration that runs out of memory reads ``OOM`` and the rest go on. Every rank draws its own
shard of ``q``, ``k``, ``v`` and of DMA's scores; the mask is rebuilt in every step (DMA's scores
change every training step). A step's time is the slowest rank's wall-clock time from a barrier to
the end of its backward, median over ``--iters`` steps after ``--warmup`` steps; peak memory is the
largest rank's ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import flexmask as fm

from ..errors import UsageError
from .dma import dma_selection
from .harness import Benchmark, Note, finish, make_env, meta, out_of_memory, short_error
from .options import add_run_arguments, apply_presets, csv_choices, parse_lengths, positive_int
from .report import Column, Report, Row, ratio

VARIANTS = ("causal", "dma-block", "dma-token")
TITLES = {"causal": "flexmask causal", "dma-block": "DMA block top-w/128", "dma-token": "DMA token top-w"}
COLUMNS = [
    Column("N", "N", "int"),
    Column("variant", "attention", "text"),
    Column("gpus", "GPUs", "int"),
    Column("ms", "step ms", "ms"),
    Column("tok_gpu", "tokens/s per GPU", "int"),
    Column("speedup", "throughput vs 1 GPU", "x"),
    Column("peak_gib", "peak GiB per GPU", "gib"),
]
NOTES = [
    "One layer, forward and backward (gradients to q, k, v and DMA's scores), batch 1. 1 GPU: fm.attention on "
    "the whole sequence; more: flexmask.distributed.attention on each rank's shard (K/V and scores all-gathered, "
    "their gradients reduce-scattered). Throughput vs 1 GPU: the 1-GPU step time over this one (the same "
    "sequence, so the ideal is the GPU count).",
]
TINY = {
    "--lengths": parse_lengths("256,512"),
    "--heads": 4,
    "--kv-heads": 2,
    "--head-dim": 16,
    "--window": 64,
    "--iters": 3,
    "--warmup": 1,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("64k,128k"), help="default 64k,128k")
    p.add_argument(
        "--gpus",
        type=lambda t: [positive_int(x) for x in t.split(",")],
        default=[1, 2],
        help="GPU (process) counts to compare, comma-separated (default 1,2; on CPU, gloo processes)",
    )
    p.add_argument(
        "--variants", type=csv_choices(VARIANTS), default=["causal", "dma-block"], help="default causal,dma-block"
    )
    p.add_argument("--layout", choices=["balanced", "contiguous"], default="balanced", help="shard layout")
    p.add_argument("--heads", type=positive_int, default=16, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="key/value heads (default 8)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dimension (default 128)")
    p.add_argument("--window", type=positive_int, default=2048, help="DMA keys kept per query w (default 2048)")
    p.add_argument("--iters", type=positive_int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    add_run_arguments(p, cell_timeout=900.0)
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke run (gloo processes)")


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    """``bench cp``: a layer's fwd+bwd on 1 vs several GPUs."""
    if args.tiny:
        apply_presets(args, argv, TINY)
    if args.heads % args.kv_heads:
        raise UsageError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    args.dtype = "auto"
    env = make_env(args)
    if not env.cuda and not args.tiny and max(args.lengths) > 4096:
        raise UsageError("on CPU, bench cp runs the --tiny sizes (or give --lengths of at most 4k)")
    config = (
        f"{str(env.dtype).replace('torch.', '')}, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
        f"w={args.window}, layout {args.layout!r}, batch 1"
    )
    timing = "slowest rank's wall clock per step (barrier to end of backward), median"
    report = Report("flexmask bench cp", meta(env, argv, "cp", config, timing=timing), args.out)
    rows = report.section("One attention layer, forward + backward", COLUMNS, NOTES)
    available = torch.cuda.device_count() if env.cuda else os.cpu_count() or 1
    for n in args.lengths:
        for variant in args.variants:
            one: Row | None = None
            for world in sorted(set(args.gpus)):
                row: Row = {"N": n, "variant": TITLES[variant], "gpus": world}
                parts = world * (2 if args.layout == "balanced" else 1)
                if world > available:
                    row["ms"] = Note(f"skipped ({available} {'GPUs' if env.cuda else 'CPUs'})")
                elif world > 1 and n % parts:
                    row["ms"] = Note(f"skipped (N not a multiple of {parts})")
                else:
                    spec = dict(vars(args), n=n, variant=variant, cuda=env.cuda, dtype=str(env.dtype))
                    result = _spawn(spec, world) if not env.runner.over_budget() else Note("skipped (time budget)")
                    if isinstance(result, Note):
                        row["ms"] = result
                    elif "error" in result:
                        row["ms"] = Note(result["error"])
                        env.runner.errors += 1
                    else:
                        row["ms"] = result["ms"]
                        row["tok_gpu"] = n / world / result["ms"] * 1e3
                        row["peak_gib"] = result.get("peak_gib", Note("-"))
                if world == 1:
                    one = row
                row["speedup"] = ratio(one.get("ms"), row.get("ms")) if one is not None else Note("-")
                rows.append(row)
                env.runner.log(f"cp N={n} {variant} x{world}: {row.get('ms')}")
                report.save()
    return finish(report, env.runner)


def _spawn(spec: dict, world: int) -> dict:
    """Run :func:`_worker` on ``world`` fresh processes; the slowest rank's time and the largest peak."""
    ctx = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, world, port, spec, tmp)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + (spec["cell_timeout"] or 900.0)
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.is_alive() for p in procs):  # a rank that failed alone leaves the others waiting
            for p in procs:
                p.kill()
            return {"error": f"error: timed out after {spec['cell_timeout'] or 900.0:g} s"}
        results = []
        for r, p in enumerate(procs):
            path = Path(tmp) / f"rank{r}.json"
            if not path.exists():
                return {"error": f"error: rank {r} exited with {p.exitcode} and no result"}
            results.append(json.loads(path.read_text()))
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        return {"error": errors[0]}
    out = {"ms": max(r["ms"] for r in results)}
    if spec["cuda"]:
        out["peak_gib"] = max(r["peak_gib"] for r in results)
    return out


def _worker(rank: int, world: int, port: int, spec: dict, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = spec["cuda"]
    if cuda:
        torch.cuda.set_device(rank)
    # a rank that fails alone (out of memory) leaves the others in a collective: give up after 5 minutes
    timeout = datetime.timedelta(seconds=300)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        result = _measure(rank, world, spec)
    except Exception as e:  # noqa: BLE001 - the cell says what went wrong
        result = {"error": "OOM" if out_of_memory(e) else f"error: {short_error(e)}"}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _measure(rank: int, world: int, spec: dict) -> dict:
    import flexmask.distributed as fmd

    device = torch.device("cuda", rank) if spec["cuda"] else torch.device("cpu")
    dtype = getattr(torch, spec["dtype"].replace("torch.", ""))
    gen = torch.Generator(device).manual_seed(spec["seed"] * 1000 + rank)
    n, hq, hkv, d = spec["n"] // world, spec["heads"], spec["kv_heads"], spec["head_dim"]

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt).requires_grad_()

    q, k, v, s = randn(1, hq, n, d), randn(1, hkv, n, d), randn(1, hkv, n, d), randn(1, hkv, n, dt=torch.float32)
    grad = torch.randn(1, hq, n, d, generator=gen, device=device, dtype=dtype)

    dma = spec["variant"] != "causal"
    select = dma_selection(spec["variant"].removeprefix("dma-"), spec["window"]) if dma else None

    def step() -> None:
        mask, bias = (select(s), fm.key_bias(s)) if dma else (fm.causal(), None)
        if world == 1:
            out = fm.attention(q, k, v, mask=mask, bias=bias)
        else:
            out = fmd.attention(q, k, v, mask=mask, bias=bias, layout=spec["layout"])
        out.backward(grad)

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["iters"]):
        if spec["cuda"]:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if spec["cuda"]:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    result = {"ms": statistics.median(times)}
    if spec["cuda"]:
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


BENCHMARK = Benchmark(
    name="cp",
    help="context parallelism: one attention layer's fwd+bwd on 1 vs 2+ GPUs",
    description=(
        "One attention layer's forward and backward over a sequence split across GPUs with "
        "flexmask.distributed.attention (flexmask causal, DMA block and token), against fm.attention on one GPU: "
        "step time, tokens/s per GPU, throughput vs one GPU and peak memory. Each configuration runs in fresh "
        "processes; without CUDA only small sizes run (--tiny: gloo processes on CPU)."
    ),
    add_arguments=add_arguments,
    run=run,
)
