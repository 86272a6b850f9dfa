"""``bench masks``: building the ``BlockMask`` of ``causal & sliding_window(w)`` and of
``causal & document(ids)`` with flexmask's structural builder vs torch's compiled and eager
``create_block_mask`` (time, first call, peak memory), then ``flexmask.attention`` vs hand-written
compiled FlexAttention for the same masks (the overhead of flexmask's layer, forward and
forward + backward).

Target sizes run first (N = 65536, then the attention overhead, then the other lengths), so that a
``--budget`` cut keeps the numbers that matter most.
"""

from __future__ import annotations

import argparse

import torch

import flexmask as fm

from . import _internals
from .handwritten import (
    compiled_create_block_mask,
    document_mod,
    flex_cpu_bytes,
    grad,
    handwritten_block_mask,
    handwritten_flex,
    note_compile_mode,
    qkv,
    random_document_ids,
    window_mod,
)
from .harness import (
    Benchmark,
    Env,
    Note,
    Skip,
    attention_meta,
    cpu_guard,
    finish,
    first_call,
    make_env,
    peak_mib,
)
from .options import (
    add_common_arguments,
    apply_presets,
    check_heads,
    csv_choices,
    priority_order,
)
from .report import Column, Report, Row, fmt, number, ratio

BUILDERS = ("flexmask", "torch-compiled", "torch-compiled-h1", "torch-eager")
BUILDER_TITLES = {
    "flexmask": "flexmask structural (heads={h})",
    "torch-compiled": "torch compiled create_block_mask (H={h})",
    "torch-compiled-h1": "torch compiled create_block_mask (H=1)",
    "torch-eager": "torch eager create_block_mask (H={h})",
}
MASKS = ("window", "document")

#: ``--quick``: fewer sizes.
QUICK = {"--lengths": [16384, 65536]}
#: ``--tiny``: a CPU smoke run of a few seconds.
TINY = {"--lengths": [256], "--heads": 2, "--kv-heads": 1, "--head-dim": 16, "--window": 64, "--attn-length": 256}

BUILD_COLUMNS = [
    Column("mask", "mask", "text"),
    Column("N", "N", "int"),
    Column("builder", "builder", "text"),
    Column("shape", "BlockMask B×H", "text"),
    Column("time_ms", "time ms", "ms"),
    Column("first_call_s", "first call s", "s"),
    Column("graphs", "graphs compiled", "int"),
    Column("peak_mib", "peak MiB", "mib"),
    Column("flexmask_faster", "flexmask faster by", "x"),
]

OVERHEAD_COLUMNS = [
    Column("mask", "mask", "text"),
    Column("pass", "pass", "text"),
    Column("hand_ms", "hand-written flex ms", "ms"),
    Column("flexmask_ms", "fm.attention ms", "ms"),
    Column("overhead_pct", "overhead", "signed_pct"),
    Column("spread_pct", "run-to-run spread", "pct"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``bench masks``."""
    add_common_arguments(p, "4096,16384,65536,131072", 16, 8)
    p.add_argument("--masks", type=csv_choices(MASKS), default=list(MASKS), help="window,document (default both)")
    p.add_argument(
        "--builders",
        type=csv_choices(BUILDERS),
        default=list(BUILDERS),
        help=f"subset of {','.join(BUILDERS)} (default all)",
    )
    p.add_argument(
        "--eager-cap-gb",
        type=float,
        default=8.0,
        help="skip eager create_block_mask when B·H·N² bytes exceed this many GB (default 8)",
    )
    p.add_argument(
        "--attn-length",
        type=int,
        default=16384,
        help="N of the attention-overhead comparison (default 16384; 0 skips it)",
    )


def _mask_exprs(kind: str, window: int, ids: torch.Tensor):
    if kind == "window":
        return f"causal & sliding_window({window})", fm.causal() & fm.sliding_window(window), window_mod(window)
    return "causal & document(ids)", fm.causal() & fm.document(ids), document_mod(ids)


def _block_shape(bm) -> str:
    return "×".join(str(s) for s in bm.kv_num_blocks.shape[:2])


def _eager_runs(args, n: int, heads: int) -> bool:
    return heads * n * n / 1e9 <= args.eager_cap_gb


def _build_row(env: Env, args, kind: str, n: int, builder: str, ids: torch.Tensor) -> Row:
    runner, dev = env.runner, env.device
    name, mask, mod = _mask_exprs(kind, args.window, ids)
    heads = 1 if builder == "torch-compiled-h1" else args.heads
    row: Row = {"mask": name, "N": n, "builder": BUILDER_TITLES[builder].format(h=args.heads), "key": builder}

    def setup():
        if builder == "flexmask":
            layout = _internals.make_layout(1, args.heads, n, n, dev)
            return lambda: _internals.build_block_mask_uncached(mask, layout)
        if builder in ("torch-compiled", "torch-compiled-h1"):
            if not env.cuda:
                raise Skip("CPU: compiled create_block_mask is a CUDA benchmark")
            return lambda: compiled_create_block_mask(mod, 1, heads, n, n, device=dev)
        if not _eager_runs(args, n, heads):
            raise Skip(f"B·H·N² = {heads * n * n / 1e9:.1f} GB > --eager-cap-gb {args.eager_cap_gb:g}")
        from torch.nn.attention.flex_attention import create_block_mask

        return lambda: create_block_mask(mod, 1, heads, n, n, device=dev)

    fn = runner.run(f"{name} N={n} {builder} setup", setup)
    if isinstance(fn, Note):
        row["time_ms"] = fn
        for key in ("shape", "first_call_s", "graphs", "peak_mib"):
            row[key] = Note("-")
        return row
    first = runner.run(f"{name} N={n} {builder} first call", lambda: first_call(fn, dev, _block_shape))
    if isinstance(first, Note):  # the same failure would repeat: report it once, measure nothing more
        row["time_ms"] = first
        for key in ("shape", "first_call_s", "graphs", "peak_mib"):
            row[key] = Note("-")
        return row
    row["first_call_s"], row["graphs"], row["shape"] = first
    row["time_ms"] = runner.run(f"{name} N={n} {builder} time", lambda: env.clock(fn))
    row["peak_mib"] = runner.run(f"{name} N={n} {builder} memory", lambda: peak_mib(fn, dev))
    return row


def _overhead_rows(env: Env, args, kind: str, ids: torch.Tensor) -> list[Row]:
    runner, dev, n = env.runner, env.device, args.attn_length
    name, mask, mod = _mask_exprs(kind, args.window, ids)
    rows = [{"mask": name, "pass": p} for p in ("fwd", "fwd+bwd")]

    def setup():
        q, k, v, grad_out = qkv(env, n, args.heads, args.kv_heads, args.head_dim)
        gqa = args.heads != args.kv_heads
        flex = handwritten_flex(dev)
        hand_bm = handwritten_block_mask(mod, n, dev)
        if env.cuda:

            def hand_fwd():
                return flex(q, k, v, block_mask=hand_bm, enable_gqa=gqa)
        else:
            qd, kd, vd = q.detach(), k.detach(), v.detach()

            def hand_fwd():
                with torch.no_grad():
                    return flex(qd, kd, vd, block_mask=hand_bm, enable_gqa=gqa)

        def fm_fwd():
            return fm.attention(q, k, v, mask=mask)

        def hand_train():
            if not env.cuda:
                raise Skip("CPU: flex_attention has no backward")
            return grad(hand_fwd(), (q, k, v), grad_out)

        def fm_train():
            return grad(fm_fwd(), (q, k, v), grad_out)

        return (hand_fwd, fm_fwd), (hand_train, fm_train)

    fns = runner.run(f"overhead {name} setup", setup)
    for pair, row in enumerate(rows):
        if isinstance(fns, Note):
            row["hand_ms"] = row["flexmask_ms"] = fns
            continue
        hand, ours = fns[pair]
        failed: dict[str, Note] = {}
        for label, fn in (("hand", hand), ("flexmask", ours)):
            res = runner.run(f"overhead {name} {row['pass']} {label} first call", lambda fn=fn: first_call(fn, dev))
            row[f"{label}_first_call_s"] = res if isinstance(res, Note) else res[0]
            if isinstance(res, Note):
                failed[label] = res
        # A B A B: each variant timed twice; the spread says how much of a difference is noise.
        times: dict[str, list] = {"hand": [], "flexmask": []}
        for _ in range(2):
            for label, fn in (("hand", hand), ("flexmask", ours)):
                if label in failed:
                    times[label].append(failed[label])
                    continue
                times[label].append(runner.run(f"overhead {name} {row['pass']} {label}", lambda fn=fn: env.clock(fn)))
        for label in ("hand", "flexmask"):
            got = [number(t) for t in times[label]]
            key = "hand_ms" if label == "hand" else "flexmask_ms"
            if all(g is not None for g in got):
                row[key] = sum(got) / len(got)
                row[f"{label}_repeats_ms"] = got
            else:
                row[key] = next(t for t in times[label] if isinstance(t, Note))
        hand_ms, ours_ms = number(row["hand_ms"]), number(row["flexmask_ms"])
        if not env.cuda:
            row["overhead_pct"] = Note("n/a (CPU smoke run)")
        elif hand_ms is not None and ours_ms is not None:
            row["overhead_pct"] = 100.0 * (ours_ms - hand_ms) / hand_ms
        else:
            row["overhead_pct"] = Note("-")
        spreads = [
            abs(r[0] - r[1]) / min(r) * 100.0
            for r in (row.get("hand_repeats_ms"), row.get("flexmask_repeats_ms"))
            if r and min(r) > 0
        ]
        row["spread_pct"] = max(spreads) if spreads else Note("-")
        runner.cleanup()
    return rows


def _cpu_needs(args) -> list[tuple[float, str]]:
    """The dense steps of a CPU run: torch's eager builder (about 12 bytes per B·H·N² entry) and the
    hand-written eager flex_attention of the overhead comparison."""
    needs = []
    if "torch-eager" in args.builders:
        for n in args.lengths:
            if _eager_runs(args, n, args.heads):
                needs.append((12.0 * args.heads * n * n, f"torch's eager create_block_mask at N={n}, H={args.heads}"))
    if args.attn_length > 0:
        n = args.attn_length
        needs.append((flex_cpu_bytes(args.heads, n), f"eager flex_attention at --attn-length {n}, {args.heads} heads"))
    return needs


def run(args: argparse.Namespace, argv: list[str]) -> Report:
    """``bench masks``: BlockMask building, then flexmask's attention overhead over hand-written flex."""
    if args.quick:
        apply_presets(args, argv, QUICK)
    if args.tiny:
        apply_presets(args, argv, TINY)
    check_heads(args)
    env = make_env(args)
    cpu_guard(env.device, _cpu_needs(args))
    runner = env.runner
    lengths = priority_order(args.lengths, (65536,))
    builders = [b for b in args.builders if b in BUILDERS]
    config = (
        f"B=1, heads={args.heads}, window={args.window}, documents: 8–32 of random lengths, block 128; "
        f"attention: {str(env.dtype).replace('torch.', '')}, B=1, Hq={args.heads}, Hkv={args.kv_heads}, "
        f"D={args.head_dim}, N={args.attn_length}; eager create_block_mask skipped when B·H·N² > "
        f"{args.eager_cap_gb:g} GB"
    )
    report = Report("flexmask bench masks", attention_meta(args, env, argv, "masks", config), args.out)
    build_rows = report.section(
        f"Building the BlockMask (H={args.heads})",
        BUILD_COLUMNS,
        [
            f"time: a fresh build per call (flexmask: `{_internals.BUILD_NAME}`, no cache); "
            "first call s: the first call at that size, including any compilation (graphs compiled > 0); "
            "flexmask faster by: this builder's time / flexmask's.",
            f"flexmask builds with heads={args.heads}, but these masks do not depend on the head, so its "
            "BlockMask broadcasts (H=1); torch's is built for the H it is given (H=1 rows are the like-for-like "
            "comparison).",
        ],
    )
    overhead_rows = report.section(
        f"fm.attention vs hand-written FlexAttention (N={args.attn_length}, Hq={args.heads}, Hkv={args.kv_heads}, "
        f"D={args.head_dim})",
        OVERHEAD_COLUMNS,
        [
            "hand-written: `torch.compile(flex_attention)` with a hand-written mask_mod and a BlockMask from "
            "torch's compiled create_block_mask (B, H broadcast); flexmask: `fm.attention(q, k, v, mask=...)` "
            "(BlockMask cached after the first call). Each is timed twice in A B A B order and averaged; "
            "spread = the larger difference between a variant's two timings.",
        ],
    )
    ids_by_n: dict[int, torch.Tensor] = {}

    def ids_for(n: int) -> torch.Tensor:
        if n not in ids_by_n:
            ids_by_n[n] = random_document_ids(n, env.gen, env.device)
        return ids_by_n[n]

    def build(n: int) -> None:
        for kind in args.masks:
            ids = ids_for(n)
            rows = []
            for builder in builders:
                row = _build_row(env, args, kind, n, builder, ids)
                rows.append(row)
                build_rows.append(row)
                runner.log(
                    f"masks {row['mask']} N={n} {builder}: "
                    f"{fmt(row.get('time_ms'), 'ms')} ms, first call {fmt(row.get('first_call_s'), 's')} s, "
                    f"peak {fmt(row.get('peak_mib'), 'mib')} MiB"
                )
                runner.cleanup()
                report.save()
            ours = next((r for r in rows if r["key"] == "flexmask"), None)
            for r in rows:
                r["flexmask_faster"] = Note("-") if ours is None or r is ours else ratio(r["time_ms"], ours["time_ms"])

    def overhead() -> None:
        for kind in args.masks:
            rows = _overhead_rows(env, args, kind, ids_for(args.attn_length))
            overhead_rows.extend(rows)
            for r in rows:
                runner.log(
                    f"overhead {r['mask']} {r['pass']}: hand {fmt(r.get('hand_ms'), 'ms')} ms, "
                    f"flexmask {fmt(r.get('flexmask_ms'), 'ms')} ms, {fmt(r.get('overhead_pct'), 'signed_pct')}"
                )
            report.save()

    # Run order (a --budget cut drops the end): the target size, the attention overhead, the other sizes.
    targets = [n for n in lengths if n == 65536]
    for n in targets:
        build(n)
    if args.attn_length > 0:
        overhead()
    for n in lengths:
        if n not in targets:
            build(n)
    build_rows.sort(key=lambda r: (r["mask"], r["N"], BUILDERS.index(r["key"])))
    _targets(report, build_rows, overhead_rows)
    note_compile_mode(report)
    return finish(report, runner)


def _targets(report: Report, build_rows: list[Row], overhead_rows: list[Row]) -> None:
    for r in build_rows:
        if r["N"] == 65536 and r["key"] in ("torch-compiled", "torch-compiled-h1"):
            x = number(r["flexmask_faster"])
            verdict = "n/a" if x is None else ("met" if x >= 10 else "MISSED")
            report.targets.append(
                f"{r['mask']}, N=65536: flexmask vs {r['builder']}: "
                f"{fmt(r['flexmask_faster'], 'x')} (target ≥ 10x): {verdict}"
            )
    for r in build_rows:
        if r["N"] == 65536 and r["key"] == "flexmask":
            torch_row = next(
                (t for t in build_rows if t["N"] == 65536 and t["mask"] == r["mask"] and t["key"] == "torch-compiled"),
                {},
            )
            report.targets.append(
                f"{r['mask']}, N=65536: flexmask peak memory {fmt(r.get('peak_mib'), 'mib')} MiB, torch compiled "
                f"{fmt(torch_row.get('peak_mib'), 'mib')} MiB (target: O((N/128)²) = 262144 block pairs, "
                "no N² tensor)"
            )
    for r in overhead_rows:
        x = number(r.get("overhead_pct"))
        if x is not None:
            verdict = "met" if x <= 5 else "MISSED"
            report.targets.append(
                f"{r['mask']} {r['pass']}: fm.attention overhead {x:+.1f}% (target ≤ 5%; run-to-run spread "
                f"{fmt(r.get('spread_pct'), 'pct')}): {verdict}"
            )


BENCHMARK = Benchmark(
    name="masks",
    help="BlockMask building vs torch's create_block_mask; fm.attention overhead",
    description=(
        "BlockMask building (flexmask structural vs torch compiled/eager create_block_mask) and fm.attention vs "
        "hand-written flex. --quick: lengths 16k,64k. Without CUDA: sizes whose dense N² tensors (torch's eager "
        "create_block_mask, eager flex_attention) would not fit in free memory are refused with exit status 2, "
        "the defaults included; --tiny is a CPU smoke run of a few seconds."
    ),
    add_arguments=add_arguments,
    run=run,
)
