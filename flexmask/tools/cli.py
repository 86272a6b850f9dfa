"""The command line: ``flexmask {demo,plot,bench} ...`` (also ``python -m flexmask``).

Every command and subcommand is an argparse parser, so ``--help`` works everywhere and only prints
help. A user error (a bad option, an expression :func:`flexmask.tools.expr.parse` refuses, sizes a
benchmark cannot run) prints one line on stderr and exits with status 2, without a traceback.

Examples:
    >>> from flexmask.tools.cli import main
    >>> main(["plot", "open('x')", "--q-len", "8"])  # refused, nothing runs (the line goes to stderr)
    2
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .bench.options import positive_int
from .errors import UsageError

PROG = "flexmask"
SUFFIXES = (".png", ".svg", ".pdf")

EPILOG = """examples:
  flexmask demo
  flexmask plot "fm.causal() & fm.sliding_window(64)" --q-len 256 --out window.png
  flexmask bench masks --tiny
  flexmask bench model --help

Each command has its own --help."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (raised as :class:`UsageError`), not a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``flexmask`` parser: subcommands ``demo``, ``plot`` and ``bench`` (with one per benchmark).

    Examples:
        >>> build_parser().parse_args(["plot", "causal()", "--q-len", "64"]).kv_len is None
        True
    """
    parser = _Parser(
        prog=PROG,
        description="flexmask: sparse and structured attention on FlexAttention. Pictures of masks, a demo, "
        "benchmarks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="compose a few masks, check them against dense truth, print block maps and sparsity",
        description="Compose a few masks, check each against its dense truth, and print its block map and "
        "sparsity. Writes nothing unless --out DIR is given (then one PNG per mask).",
    )
    demo.add_argument("--out", metavar="DIR", help="also draw each mask into DIR/<name>.png")
    demo.set_defaults(handler=_demo, error_prog=demo.prog)

    plot = sub.add_parser(
        "plot",
        help='draw a mask expression: plot "fm.causal() & fm.sliding_window(64)" --q-len 256',
        description="Draw a mask expression (or a bool tensor expression), one panel per head, with fm.plot. The "
        "expression is read with flexmask.tools.expr.parse, never evaluated: flexmask's mask constructors "
        "(bare or fm.<name>), & | ~, numbers, lists, and torch.tensor/arange/... with literal arguments.",
        epilog='example: flexmask plot "causal() & document(torch.tensor([[0] * 100 + [1] * 156]))" --q-len 256 '
        "--out documents.svg",
    )
    plot.add_argument("expr", help="the mask expression, e.g. 'causal() & (sliding_window(128) | prefix_lm(16))'")
    plot.add_argument("--q-len", type=positive_int, help="number of queries (required for a mask)")
    plot.add_argument("--kv-len", type=positive_int, help="number of keys (default: --q-len)")
    plot.add_argument("--heads", type=positive_int, help="number of heads to draw (default: the mask's own, else 1)")
    plot.add_argument("--batch-index", type=_nonnegative, default=0, help="batch row to draw (default 0)")
    plot.add_argument(
        "--level",
        choices=("auto", "token", "pooled", "block"),
        default="auto",
        help="token by token, pooled cells, blocks of the BlockMask, or auto (token level when it fits --max-cells)",
    )
    plot.add_argument(
        "--block-size",
        "--cell-size",
        dest="block_size",
        type=positive_int,
        help="tokens per block (cell) side when pooled or at block level",
    )
    plot.add_argument(
        "--max-cells",
        type=positive_int,
        help=f"most cells of the picture (default {_plot_default('max_cells')}); e.g. 16777216 "
        "draws N = 4096 token by token",
    )
    plot.add_argument("--title", help="figure title (default: the expression and lengths)")
    plot.add_argument("--dpi", type=positive_int, default=150, help="resolution of a .png (default 150)")
    plot.add_argument("--out", default="mask.png", help="output file: .png, .svg or .pdf (default mask.png)")
    plot.set_defaults(handler=_plot, error_prog=plot.prog)

    from . import bench

    bench_parser = sub.add_parser(
        "bench",
        help="benchmarks: masks, dma, model (see bench --help)",
        description="flexmask benchmarks. Each prints a markdown report; --out FILE also writes FILE.md and "
        "FILE.json. The default sizes are GPU sizes: without CUDA a benchmark refuses sizes that do not fit "
        "(exit status 2), and --tiny runs a CPU smoke test of a few seconds.",
    )
    bench.add_subcommands(bench_parser)
    bench_parser.set_defaults(handler=_bench, error_prog=bench_parser.prog)
    return parser


def _plot_parameter(*names: str) -> str:
    """The first of ``names`` that ``fm.plot`` takes (its block-size parameter was renamed ``cell_size``)."""
    import flexmask as fm

    try:
        parameters = inspect.signature(fm.plot).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return names[-1]
    return next((n for n in names if n in parameters), names[-1])


def _plot_default(name: str) -> object:
    import flexmask as fm

    try:
        return inspect.signature(fm.plot).parameters[name].default
    except (TypeError, ValueError, KeyError):  # pragma: no cover - fm.plot changed shape
        return "fm.plot's"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flexmask`` command line; returns the exit status (0 ok, 2 user error).

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Examples:
        >>> main(["demo", "--help"])  # doctest: +ELLIPSIS
        usage: flexmask demo [-h] [--out DIR]
        ...
        0
    """
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`flexmask --help | head -1`): as Python's docs recommend, point stdout
        # at devnull so that the interpreter's final flush does not fail again, and exit quietly.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout has no file descriptor (captured)
            pass
        return 1
    return code


def _main(argv: list[str]) -> int:
    parser = build_parser()
    if not argv:
        return _fail(f"{PROG}: error: give a command: demo, plot or bench (see {PROG} --help)")
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --help printed the help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        return _fail(str(e))
    if extra:  # named after the (sub)command that did not know them, not after `flexmask`
        prog = args.error_prog
        return _fail(f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
    try:
        return args.handler(args, argv)
    except UsageError as e:
        return _fail(f"{args.error_prog}: error: {e}")


def _fail(message: str) -> int:
    print(" ".join(message.split()), file=sys.stderr)
    return 2


# --------------------------------------------------------------------------------------------
# the commands


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    return demo(args.out)


def demo(out_dir: str | None = None) -> int:
    """Compose masks, check each against its dense truth, print block maps and sparsity.

    Args:
        out_dir: also draw each mask into ``out_dir/<name>.png`` (default: write nothing).

    Returns:
        0 when every mask matches its truth, else 1.

    Raises:
        UsageError: ``out_dir`` given but matplotlib is not installed.
    """
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
        print(
            f"{name}\n  expression: {m!r}\n  matches dense truth: {same}   "
            f"kept: {dense.float().mean():.1%}   block sparsity: {bm.sparsity():.1f}%"
        )
        print("  " + bm.to_string(grid_size=(8, 8)).replace("\n", "\n  "))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, m in examples.items():
            path = out / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".png")
            try:
                fig = fm.plot(m, n, n, title=name)
            except ImportError as e:  # matplotlib is an extra
                raise UsageError(str(e)) from e
            fig.savefig(path, dpi=120)
            print(f"wrote {path}")
    return 0 if ok else 1


def _plot(args: argparse.Namespace, argv: list[str]) -> int:
    import flexmask as fm

    from .expr import parse

    out = Path(args.out)
    if out.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--out must end in .png, .svg or .pdf, got {args.out!r}")
    obj = parse(args.expr)
    if isinstance(obj, fm.Bias):
        raise UsageError(f"{args.expr!r} gives a bias; plot draws masks and bool tensors")
    if isinstance(obj, fm.Mask) and args.q_len is None:
        raise UsageError("give --q-len N (and optionally --kv-len N) to draw a mask")
    options = {
        "heads": args.heads,
        "batch_index": args.batch_index,
        "level": args.level,
        _plot_parameter("cell_size", "block_size"): args.block_size,
        "title": args.title,
    }
    if args.max_cells is not None:
        options["max_cells"] = args.max_cells
    try:
        fig = fm.plot(obj, args.q_len, args.kv_len, **options)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=args.dpi)
    except (ValueError, TypeError, OSError, RuntimeError, MemoryError, ImportError) as e:  # fm.plot says why
        lines = str(e).strip().splitlines()
        raise UsageError(f"{type(e).__name__}: {lines[0] if lines else ''}") from e
    print(f"wrote {out}")
    return 0


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from . import bench

    return bench.run(args, argv[2:])  # what follows `bench NAME`
