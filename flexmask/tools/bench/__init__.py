"""The benchmarks that ship with flexmask: ``python -m flexmask bench NAME [options]``.

One module per benchmark (:mod:`.masks`, :mod:`.dma` with :mod:`.decode`, :mod:`.decoding`,
:mod:`.model`, :mod:`.generate`, :mod:`.context_parallel`), each exposing a
:class:`~.harness.Benchmark`; :data:`BENCHMARKS` is the registry the command line builds its subcommands
from. They share the clock, runner and environment of :mod:`.harness`, the options of :mod:`.options`,
the baselines of :mod:`.handwritten` and the markdown + JSON report of :mod:`.report`. Each prints its
report; ``--out FILE`` also writes ``FILE.md`` and ``FILE.json``.

Examples:
    >>> from flexmask.tools.bench import BENCHMARKS
    >>> list(BENCHMARKS)
    ['masks', 'dma', 'decode', 'model', 'generate', 'cp']
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from . import context_parallel, decoding, dma, generate, masks, model
from .harness import Benchmark

#: The ``bench`` subcommands, by name.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        masks.BENCHMARK,
        dma.BENCHMARK,
        decoding.BENCHMARK,
        model.BENCHMARK,
        generate.BENCHMARK,
        context_parallel.BENCHMARK,
    )
}


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """Add one subparser per benchmark of :data:`BENCHMARKS` to the ``bench`` parser."""
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for bench in BENCHMARKS.values():
        p = sub.add_parser(bench.name, help=bench.help, description=bench.description, allow_abbrev=False)
        bench.add_arguments(p)
        p.set_defaults(benchmark_run=bench.run, error_prog=p.prog)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed benchmark, print its report, return the exit status.

    ``argv`` is the command line after ``bench NAME`` (it goes into the report, and presets such as
    ``--quick`` leave the options it gives alone).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_compile.*")
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        with torch.random.fork_rng(devices=[]):
            report = args.benchmark_run(args, argv)
    print(report.markdown(), end="", flush=True)
    if report.out is not None:
        print(f"\nwrote {report.out.with_suffix('.md')} and {report.out.with_suffix('.json')}", file=sys.stderr)
    return 0
