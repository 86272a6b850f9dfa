"""``bench dma``: Dynamic Mask Attention (``fm.topk`` token selection and ``fm.topk_blocks`` block
selection, with a per-key bias that receives gradients) side by side with SDPA causal, flex causal
and flex sliding window, plus the cost of building the mask when the scores change, peak memory,
the paper's head configuration and, with ``--decode-lengths``, decoding (:mod:`.decode`).

"fwd" is the forward of a training step (inputs require grad) and "fwd+bwd" adds
``torch.autograd.grad`` with a random output gradient, so both reuse one compiled graph. Target
sizes (32k, 64k) run first, so that a ``--budget`` cut keeps the numbers that matter most.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

import flexmask as fm

from ..errors import UsageError
from . import _internals
from .decode import decode_rows
from .handwritten import (
    causal_mod,
    flex_cpu_bytes,
    grad,
    handwritten_block_mask,
    handwritten_flex,
    make_scores,
    note_compile_mode,
    qkv,
    window_mod,
)
from .harness import (
    Benchmark,
    Env,
    Note,
    Skip,
    attention_meta,
    compiled_graphs,
    cpu_guard,
    finish,
    first_call,
    make_env,
    peak_mib,
    sync,
)
from .options import (
    add_common_arguments,
    apply_presets,
    check_heads,
    csv_choices,
    parse_length_or_off,
    parse_lengths,
    priority_order,
)
from .report import Column, Report, Row, fmt, number, percent, ratio

VARIANTS = ("sdpa", "flex-causal", "flex-window", "token", "token-flex", "block")  # table order
# SDPA first: the speedups' reference
RUN_ORDER = ("sdpa", "token", "token-flex", "block", "flex-window", "flex-causal")
DMA_VARIANTS = ("token", "token-flex", "block")
#: per-call options of a variant (the kernels that are not the default)
VARIANT_OPTIONS = {"token-flex": {"token_kernel": "flex"}}
SCORES = ("random", "clustered")

#: ``--quick``: fewer sizes, no paper configuration.
QUICK = {"--lengths": [32768, 65536], "--paper-length": 0}
#: ``--tiny``: a CPU smoke run of a few seconds.
TINY = {"--lengths": [256], "--heads": 2, "--kv-heads": 1, "--head-dim": 16, "--window": 128, "--paper-length": 256}

DMA_COLUMNS = [
    Column("N", "N", "int"),
    Column("variant", "variant", "text"),
    Column("scores", "scores", "text"),
    Column("fwd_ms", "fwd ms", "ms"),
    Column("train_ms", "fwd+bwd ms", "ms"),
    Column("fwd_x", "fwd vs SDPA", "x"),
    Column("train_x", "fwd+bwd vs SDPA", "x"),
    Column("build_ms", "mask build ms", "ms"),
    Column("build_pct", "build / fwd+bwd", "pct"),
    Column("step_ms", "step ms", "ms"),
    Column("step_x", "step vs SDPA", "x"),
    Column("peak_mib", "peak MiB", "mib"),
    Column("build_peak_mib", "build peak MiB", "mib"),
    Column("first_call_s", "first call s", "s"),
    Column("graphs", "graphs", "int"),
]

DMA_NOTES = [
    "fwd: forward of a training step; fwd+bwd: plus gradients of q, k, v (and of the key scores for DMA, "
    "through `fm.key_bias`), mask prebuilt. vs SDPA: SDPA causal time / this time (higher is faster).",
    "mask build: constructing the mask object + what `fm.attention` builds from it on fresh scores, its plan "
    f"without the cache (`{_internals.PLAN_NAME}`: the token key layout or the BlockMask) "
    "(what a training step pays when the scores change). step: fwd+bwd with a fresh mask every call and "
    "`options={'cache': False}` (build + attention, measured together). peak MiB: fwd+bwd, above the inputs. "
    "first call s: first fwd+bwd call incl. compilation (graphs: how many dynamo graphs it compiled).",
    "scores: random = i.i.d. normal per key (scattered selection, the hard case); clustered = a normalised "
    "random walk along the keys (a few hot regions).",
]

VARIANT_TITLES = {
    "sdpa": "SDPA causal",
    "flex-causal": "flex causal",
    "flex-window": "flex sliding window {w}",
    "token": "DMA token top-k {w}",
    "token-flex": "DMA token top-k {w}, flex over the key layout",
    "block": "DMA block top-k {kb}×{bs}",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``bench dma``."""
    add_common_arguments(p, "4096,8192,16384,32768,65536", 16, 8)
    p.add_argument(
        "--variants",
        type=csv_choices(VARIANTS),
        default=[v for v in VARIANTS if v not in VARIANT_OPTIONS],
        help=f"subset of {','.join(VARIANTS)} (default all but {','.join(VARIANT_OPTIONS)}, kernels fm.attention "
        "does not choose by default; "
        "sdpa is the speedup reference)",
    )
    p.add_argument("--scores", type=csv_choices(SCORES), default=list(SCORES), help="random,clustered (default both)")
    p.add_argument(
        "--paper-length",
        type=parse_length_or_off,
        default=32768,
        help="N of the paper configuration, 'k' = 1024 (default 32k; 0 skips it)",
    )
    p.add_argument(
        "--decode-lengths",
        type=lambda t: parse_lengths(t) if t not in ("", "0") else [],
        default=[],
        help="K values of a decoding section (Q=1, --paper-heads, no gradients), e.g. 4k,16k,64k (default: none)",
    )
    p.add_argument(
        "--paper-heads", type=_head_pair, default=(2, 1), help="Hq,Hkv of the paper configuration (default 2,1)"
    )


def _head_pair(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Hq,Hkv such as 2,1, got {text!r}") from None


def dma_selection(variant: str, window: int, block_size: int = 128) -> Callable:
    """``scores -> mask`` of a DMA variant, as every benchmark names it: ``"token"``
    (``fm.topk(scores, window)``) or ``"block"`` (``fm.topk_blocks`` of ``window // block_size``
    blocks); :class:`Skip` for a flexmask without it."""
    name = "topk_blocks" if variant == "block" else "topk"
    fn = getattr(fm, name, None)
    if fn is None:
        raise Skip(f"unavailable: this flexmask has no fm.{name} (flexmask/dma.py)")
    if variant in ("token", "token-flex"):
        return lambda s: fn(s, window)
    k_blocks = max(1, window // block_size)
    return lambda s: fn(s, k_blocks, block_size=block_size)


def _title(variant: str, window: int) -> str:
    return VARIANT_TITLES[variant].format(w=window, kb=max(1, window // 128), bs=128)


def _dma_row(env: Env, args, inputs, n: int, hq: int, hkv: int, variant: str, scores: str | None) -> Row:
    runner, dev = env.runner, env.device
    q, k, v, grad_out = inputs
    gqa = hq != hkv
    row: Row = {
        "N": n,
        "Hq": hq,
        "Hkv": hkv,
        "variant": _title(variant, args.window),
        "key": variant,
        "scores": scores or "-",
    }
    label = f"dma N={n} Hq={hq} {variant}{' ' + scores if scores else ''}"
    extras: dict[str, Callable] = {}

    def setup():
        if variant == "sdpa":

            def fwd():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

            return fwd, lambda: grad(fwd(), (q, k, v), grad_out)
        if variant in ("flex-causal", "flex-window"):
            mod = causal_mod if variant == "flex-causal" else window_mod(args.window)
            bm = handwritten_block_mask(mod, n, dev)
            flex = handwritten_flex(dev)
            if not env.cuda:
                qd, kd, vd = q.detach(), k.detach(), v.detach()

                def fwd_cpu():
                    with torch.no_grad():
                        return flex(qd, kd, vd, block_mask=bm, enable_gqa=gqa)

                return fwd_cpu, None

            def fwd():
                return flex(q, k, v, block_mask=bm, enable_gqa=gqa)

            return fwd, lambda: grad(fwd(), (q, k, v), grad_out)
        make_mask = dma_selection(variant, args.window)
        s = make_scores(scores, hkv, n, env.gen, dev)
        mask, bias = make_mask(s), fm.key_bias(s)
        layout = _internals.make_layout(1, hq, n, n, dev, hkv)

        options = VARIANT_OPTIONS.get(variant, {})

        def fwd():
            return fm.attention(q, k, v, mask=mask, bias=bias, options=options)

        def build():  # what fm.attention builds for a fresh mask: the token layout, or the BlockMask
            return _internals.fresh_mask_build(make_mask(s), fm.key_bias(s), layout, q, v, options)

        extras["build"] = build
        # new scores every step: the cache (keyed by the scores' tensor and version) must not serve it
        extras["step"] = lambda: grad(
            fm.attention(q, k, v, mask=make_mask(s), bias=fm.key_bias(s), options={**options, "cache": False}),
            (q, k, v, s),
            grad_out,
        )
        return fwd, lambda: grad(fwd(), (q, k, v, s), grad_out)

    fns = runner.run(f"{label} setup", setup)
    if isinstance(fns, Note):
        row["fwd_ms"] = fns
        return row
    fwd, train = fns
    first = runner.run(f"{label} first call", lambda: first_call(train or fwd, dev))
    if isinstance(first, Note):
        row["first_call_s"] = row["graphs"] = Note("-")
        if train is None:
            row["fwd_ms"] = first
            return row
        row["train_ms"] = first
        # the forward alone may work (an out-of-memory or error in backward); nothing else is tried
        row["fwd_ms"] = runner.run(f"{label} fwd", lambda: env.clock(fwd))
        return row
    row["first_call_s"], row["graphs"], _ = first
    row["fwd_ms"] = runner.run(f"{label} fwd", lambda: env.clock(fwd))
    if train is None:
        row["train_ms"] = Note("skipped (CPU: flex_attention has no backward)")
        row["peak_mib"] = Note("-")
    else:
        row["train_ms"] = runner.run(f"{label} fwd+bwd", lambda: env.clock(train))
        row["peak_mib"] = runner.run(f"{label} memory", lambda: peak_mib(train, dev))
    if "build" in extras:
        build, step = extras["build"], extras["step"]
        row["build_ms"] = runner.run(f"{label} mask build", lambda: env.clock(build))
        row["build_peak_mib"] = runner.run(f"{label} mask build memory", lambda: peak_mib(build, dev))
        row["build_pct"] = percent(row["build_ms"], row["train_ms"])

        def timed_step():
            if env.cuda:  # new scores must not recompile: a recompiling step would take minutes to time
                step()  # warm: a first fresh mask may compile something once
                sync(dev)
                before = compiled_graphs()
                step()
                step()
                sync(dev)
                recompiled = compiled_graphs() - before
                if recompiled:
                    raise RuntimeError(f"new masks recompile ({recompiled} graphs in 2 steps); not timed")
            return env.clock(step)

        row["step_ms"] = runner.run(f"{label} step (fresh mask)", timed_step)
    return row


def _fill_speedups(rows: list[Row], sdpa: Row | None) -> None:
    for r in rows:
        for key, ref in (("fwd_x", "fwd_ms"), ("train_x", "train_ms"), ("step_x", "train_ms")):
            own = "step_ms" if key == "step_x" else ref
            if own not in r:
                continue
            r[key] = ratio(sdpa.get(ref), r.get(own)) if sdpa is not None else Note("-")


def _dma_config(
    env: Env,
    args,
    n: int,
    hq: int,
    hkv: int,
    rows: list[Row],
    report: Report,
    variants: list[str],
    sdpa_rows: dict[tuple[int, int, int], Row],
) -> None:
    runner = env.runner
    if not variants:
        return
    inputs = runner.run(f"dma N={n} Hq={hq} inputs", lambda: qkv(env, n, hq, hkv, args.head_dim))
    for variant in sorted(variants, key=RUN_ORDER.index):
        for scores in args.scores if variant in DMA_VARIANTS else (None,):
            if isinstance(inputs, Note):
                row = {
                    "N": n,
                    "Hq": hq,
                    "Hkv": hkv,
                    "key": variant,
                    "scores": scores or "-",
                    "fwd_ms": inputs,
                    "variant": _title(variant, args.window),
                }
            else:
                row = _dma_row(env, args, inputs, n, hq, hkv, variant, scores)
            rows.append(row)
            if variant == "sdpa":
                sdpa_rows[n, hq, hkv] = row
            _fill_speedups([row], sdpa_rows.get((n, hq, hkv)))
            runner.log(
                f"dma N={n} Hq={hq}/{hkv} {row['variant']} {row['scores']}: fwd {fmt(row.get('fwd_ms'), 'ms')} ms, "
                f"fwd+bwd {fmt(row.get('train_ms'), 'ms')} ms ({fmt(row.get('train_x'), 'x')} SDPA), "
                f"build {fmt(row.get('build_ms'), 'ms')} ms, step {fmt(row.get('step_ms'), 'ms')} ms, "
                f"first call {fmt(row.get('first_call_s'), 's')} s"
            )
            runner.cleanup()
            report.save()
    del inputs
    runner.cleanup()


def _dma_targets(report: Report, rows: list[Row], hq: int) -> None:
    def find(n, key, scores="random"):
        return next(
            (r for r in rows if r["N"] == n and r["key"] == key and r["Hq"] == hq and r["scores"] == scores), None
        )

    # the targets of the project's "token-level DMA that pays off" issue (kernel, Hq 16 / Hkv 8)
    checks = [
        ("token", 32768, "train_x", 3.5, "token top-k fwd+bwd"),
        ("token", 65536, "train_x", 7.0, "token top-k fwd+bwd"),
        ("token", 32768, "fwd_x", 4.0, "token top-k fwd"),
        ("block", 32768, "train_x", 4.5, "block top-k fwd+bwd"),
        ("block", 65536, "train_x", 9.0, "block top-k fwd+bwd"),
    ]
    for scores in SCORES:
        for key, n, col, target, what in checks:
            r = find(n, key, scores)
            if r is None:
                continue
            x = number(r.get(col))
            verdict = "n/a" if x is None else ("met" if x >= target else "MISSED")
            report.targets.append(
                f"N={n}, {scores} scores: {what} vs SDPA causal {fmt(r.get(col), 'x')} (target ≥ {target:g}x): "
                f"{verdict}"
            )
        for key in DMA_VARIANTS:
            r = find(32768, key, scores)
            if r is None:
                continue
            x = number(r.get("build_pct"))
            verdict = "n/a" if x is None else ("met" if x <= 5 else "MISSED")
            report.targets.append(
                f"N=32768, {scores} scores: {key} mask build = {fmt(r.get('build_pct'), 'pct')} of fwd+bwd "
                f"(target ≤ 5%): {verdict}"
            )


def _check(args) -> None:
    check_heads(args)
    if len(args.paper_heads) != 2 or args.paper_heads[0] % args.paper_heads[1]:
        raise UsageError(f"--paper-heads must be Hq,Hkv with Hq a multiple of Hkv, got {args.paper_heads}")


def _cpu_needs(args) -> list[tuple[float, str]]:
    """The dense steps of a CPU run: eager flex_attention of the flex baselines (SDPA on CPU and
    flexmask's reference backend work in chunks)."""
    if not set(args.variants) & {"flex-causal", "flex-window"}:
        return []
    configs = [(n, args.heads) for n in args.lengths]
    if args.paper_length:
        configs.append((args.paper_length, args.paper_heads[0]))
    return [
        (flex_cpu_bytes(h, n), f"eager flex_attention (the flex baselines) at N={n}, {h} heads") for n, h in configs
    ]


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    """``bench dma``: DMA token and block selection vs SDPA causal and flex causal/window."""
    if args.quick:
        apply_presets(args, argv, QUICK)
    if args.tiny:
        apply_presets(args, argv, TINY)
    _check(args)
    env = make_env(args)
    cpu_guard(env.device, _cpu_needs(args))
    runner = env.runner
    dtype = str(env.dtype).replace("torch.", "")
    config = (
        f"{dtype}, B=1, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, w={args.window}, block selection "
        f"k={max(1, args.window // 128)} blocks of 128, key scores float32 [B, Hkv, N] requiring grad; "
        f"paper config: Hq={args.paper_heads[0]}, Hkv={args.paper_heads[1]}, N={args.paper_length or 'off'}"
    )
    report = Report("flexmask bench dma", attention_meta(args, env, argv, "dma", config), args.out)
    if not (hasattr(fm, "topk") and hasattr(fm, "topk_blocks")) and set(args.variants) & set(DMA_VARIANTS):
        runner.log("note: flexmask has no fm.topk / fm.topk_blocks yet (flexmask/dma.py); DMA rows are skipped")
    main_rows = report.section(f"Attention, Hq={args.heads}, Hkv={args.kv_heads}", DMA_COLUMNS, DMA_NOTES)
    paper_rows: list[Row] = []
    hq, hkv = args.paper_heads
    if args.paper_length:
        paper_rows = report.section(
            f"Paper configuration, Hq={hq}, Hkv={hkv}, N={args.paper_length}",
            DMA_COLUMNS,
            [
                "Same columns as above; the paper (arXiv 2508.02124) times batch 1, 2 query heads, 1 KV head, "
                "d 128, w 2048 on an RTX 4090 against a dense-mask SDPA."
            ],
        )
    # Run order (a --budget cut drops the end): SDPA and DMA at the target sizes, the flex baselines
    # there, the paper configuration, the other sizes.
    lengths = priority_order(args.lengths, (32768, 65536))
    targets = [n for n in lengths if n in (32768, 65536)]
    first = [v for v in args.variants if v in ("sdpa", *DMA_VARIANTS)]
    later = [v for v in args.variants if v not in first]
    main = (args.heads, args.kv_heads, main_rows)
    plan = [(n, *main, first) for n in targets] + [(n, *main, later) for n in targets]
    if args.paper_length:
        plan.append((args.paper_length, hq, hkv, paper_rows, args.variants))
    plan += [(n, *main, args.variants) for n in lengths if n not in targets]
    sdpa_rows: dict[tuple[int, int, int], Row] = {}
    for n, hq_, hkv_, rows, variants in plan:
        _dma_config(env, args, n, hq_, hkv_, rows, report, variants, sdpa_rows)
    order = {v: i for i, v in enumerate(VARIANTS)}
    for rows in (main_rows, paper_rows):
        rows.sort(key=lambda r: (r["N"], order[r["key"]], r["scores"]))
    if args.decode_lengths:
        decode_rows(env, args, report)
    _dma_targets(report, main_rows, args.heads)
    note_compile_mode(report)
    return finish(report, runner)


BENCHMARK = Benchmark(
    name="dma",
    help="Dynamic Mask Attention vs SDPA and flex",
    description=(
        "DMA token/block selection vs SDPA causal, flex causal, flex window. --quick: lengths 32k,64k and no paper "
        "configuration. Without CUDA: sizes whose dense N² tensors (the eager flex_attention baselines) would not "
        "fit in free memory are refused with exit status 2, the defaults included; --tiny is a CPU smoke run of a "
        "few seconds."
    ),
    add_arguments=add_arguments,
    run=run,
)
