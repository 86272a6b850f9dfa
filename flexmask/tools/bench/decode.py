"""The decoding section of ``bench dma`` (``--decode-lengths``): one query against ``K`` cached keys,
SDPA (the newest query sees every key) vs DMA token top-k, with the mask prebuilt and rebuilt.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import flexmask as fm

from .handwritten import make_scores
from .harness import Env, Note, first_call
from .report import Column, Report, Row, fmt, ratio

DECODE_COLUMNS = [
    Column("K", "K", "int"),
    Column("variant", "variant", "text"),
    Column("fwd_ms", "attention ms", "ms"),
    Column("fwd_x", "vs SDPA", "x"),
    Column("step_ms", "step ms (fresh mask)", "ms"),
    Column("step_x", "step vs SDPA", "x"),
    Column("first_call_s", "first call s", "s"),
]


def decode_rows(env: Env, args: argparse.Namespace, report: Report) -> None:
    """Decoding, Q = 1 against K cached keys: SDPA (the newest query sees every key) vs DMA token top-k."""
    hq, hkv = args.paper_heads
    rows = report.section(
        f"Decoding, Q=1, Hq={hq}, Hkv={hkv}",
        DECODE_COLUMNS,
        [
            "attention: the call with the mask prebuilt (scores unchanged); step: a fresh `fm.topk` mask every "
            "call (the selection over all K scores plus the attention), as when a new token arrives. No gradients."
        ],
    )
    for n in args.decode_lengths:
        _decode_length(env, args, n, rows, report)
        env.runner.cleanup()


def _decode_length(env: Env, args, n: int, rows: list[Row], report: Report) -> None:
    hq, hkv = args.paper_heads
    dev, dt, d = env.device, env.dtype, args.head_dim
    q = torch.randn(1, hq, 1, d, device=dev, dtype=dt)
    k = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
    v = torch.randn(1, hkv, n, d, device=dev, dtype=dt)
    s = make_scores("random", hkv, n, env.gen, dev).detach()
    mask, bias = fm.topk(s, args.window), fm.key_bias(s)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)

    def dma():
        return fm.attention(q, k, v, mask=mask, bias=bias)

    def dma_step():
        return fm.attention(q, k, v, mask=fm.topk(s, args.window), bias=fm.key_bias(s), options={"cache": False})

    ref: Row | None = None
    for title, fn, step in (("SDPA (all keys)", sdpa, None), (f"DMA token top-k {args.window}", dma, dma_step)):
        row: Row = {"K": n, "variant": title}
        label = f"decode K={n} {title}"
        with torch.no_grad():
            first = env.runner.run(f"{label} first call", lambda fn=fn: first_call(fn, dev))
            if isinstance(first, Note):
                row["fwd_ms"] = first
            else:
                row["first_call_s"] = first[0]
                row["fwd_ms"] = env.runner.run(label, lambda fn=fn: env.clock(fn))
                if step is not None:
                    row["step_ms"] = env.runner.run(f"{label} step", lambda step=step: env.clock(step))
        ref = ref or row
        row["fwd_x"] = ratio(ref.get("fwd_ms"), row.get("fwd_ms"))
        if "step_ms" in row:
            row["step_x"] = ratio(ref.get("fwd_ms"), row["step_ms"])
        rows.append(row)
        env.runner.log(f"{label}: {fmt(row.get('fwd_ms'), 'ms')} ms, step {fmt(row.get('step_ms'), 'ms')} ms")
        report.save()
