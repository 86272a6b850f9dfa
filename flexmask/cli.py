"""Command line: ``python -m flexmask {demo,bench,plot} ...`` (also installed as ``flexmask``).

Each subcommand's options live with the code it runs: ``bench`` in :mod:`flexmask.bench`, ``plot``
in :mod:`flexmask.plot`. ``demo`` is here.
"""

from __future__ import annotations

import sys

USAGE = """usage: python -m flexmask COMMAND [options]

commands:
  demo    compose a few masks, check them against dense, print block maps and sparsity
  bench   benchmarks on your GPU: `bench masks`, `bench dma` (see `bench --help`)
  plot    draw a mask expression: `plot "fm.causal() & fm.sliding_window(64)" --q-len 256 --kv-len 256`
"""


def demo(out_dir: str | None = None) -> int:
    """Compose masks, check each against its dense truth, print block maps and sparsity."""
    import torch

    import flexmask as fm

    n = 1000
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([300, 200, 380, 120]))[None]
    sinks = fm.mask(lambda b, h, q_idx, kv_idx: kv_idx < 16, name="sinks")
    examples = {
        "causal": fm.causal(),
        "causal & sliding_window(256)": fm.causal() & fm.sliding_window(256),
        "causal & (sliding_window(128) | sinks)": fm.causal() & (fm.sliding_window(128) | sinks),
        "prefix_lm(300)": fm.prefix_lm(300),
        "chunked(256) & causal": fm.chunked(256) & fm.causal(),
        "causal & document(ids)": fm.causal() & fm.document(ids),
    }
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    truth = {
        "causal": j <= i,
        "causal & sliding_window(256)": (j <= i) & (j > i - 256),
        "causal & (sliding_window(128) | sinks)": (j <= i) & ((j > i - 128) | (j < 16)),
        "prefix_lm(300)": (j < 300) | (j <= i),
        "chunked(256) & causal": (i // 256 == j // 256) & (j <= i),
        "causal & document(ids)": (j <= i) & (ids[0][:, None] == ids[0][None, :]),
    }
    ok = True
    for name, m in examples.items():
        dense = m.to_dense(n, n)[0, 0]
        same = bool(torch.equal(dense, truth[name]))
        ok &= same
        bm = m.block_mask(n, n, block_size=128)
        print(f"{name}\n  expression: {m!r}\n  matches dense truth: {same}   "
              f"kept: {dense.float().mean():.1%}   block sparsity: {bm.sparsity():.1f}%")
        print("  " + bm.to_string(grid_size=(8, 8)).replace("\n", "\n  "))
    if out_dir is not None:
        try:
            from .plot import save_demo_images
        except ImportError:
            print("heatmaps need flexmask.plot")
        else:
            for path in save_demo_images(examples, n, out_dir):
                print(f"wrote {path}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        out_dir = rest[rest.index("--out") + 1] if "--out" in rest[:-1] else "flexmask-demo"
        return demo(out_dir)
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if command == "plot":
        from .plot import main as plot_main

        return plot_main(rest)
    print(f"flexmask: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
