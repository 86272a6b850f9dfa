"""The options the benchmarks share (device, sizes, timing, budget, output) and the presets
``--quick`` and ``--tiny``, which set only the options the command line leaves out.

The bench parsers take no abbreviations (``allow_abbrev=False``), so that :func:`given_options`
sees every option given.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..errors import UsageError


def parse_lengths(text: str) -> list[int]:
    """``"4k,16384,64K"`` → ``[4096, 16384, 65536]``.

    Examples:
        >>> parse_lengths("4k,16384, 64K")
        [4096, 16384, 65536]
    """
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if part.endswith("k") else part) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"lengths are ints like 4096 or 4k, got {part!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"lengths must be positive, got {part!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("no lengths given")
    return out


def parse_length_or_off(text: str) -> int:
    """One length as :func:`parse_lengths` reads it, or ``0`` (off).

    Examples:
        >>> parse_length_or_off("32k"), parse_length_or_off("0")
        (32768, 0)
    """
    if text.strip() == "0":
        return 0
    values = parse_lengths(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"one length like 32768 or 32k (0: off), got {text!r}")
    return values[0]


def priority_order(lengths: list[int], first: tuple[int, ...]) -> list[int]:
    """The lengths to run, target sizes first (then ascending): a budget cut keeps what matters.

    Examples:
        >>> priority_order([4096, 65536, 16384], (65536,))
        [65536, 4096, 16384]
    """
    head = [n for n in first if n in lengths]
    return head + sorted(n for n in dict.fromkeys(lengths) if n not in head)


def csv_choices(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``choices``.

    Examples:
        >>> csv_choices(("a", "b", "c"))("c, a")
        ['c', 'a']
    """

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def positive_int(text: str) -> int:
    """An argparse type: an int > 0.

    Examples:
        >>> positive_int("8")
        8
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def add_device_arguments(p: argparse.ArgumentParser, dtype_of: str | None) -> None:
    """``--device``, and ``--dtype`` (that of ``dtype_of``) unless it is ``None``; ``make_env`` resolves them."""
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    if dtype_of is not None:
        p.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "bf16", "fp16", "fp32"],
            help=f"{dtype_of} dtype (auto: bf16 on CUDA, fp32 on CPU)",
        )


def add_common_arguments(p: argparse.ArgumentParser, lengths: str, heads: int, kv_heads: int) -> None:
    """The options every attention benchmark takes (device, sizes, timing, budget, output)."""
    add_device_arguments(p, "attention")
    p.add_argument(
        "--lengths",
        type=parse_lengths,
        default=parse_lengths(lengths),
        help=f"comma-separated sequence lengths, 'k' = 1024 (default {lengths})",
    )
    p.add_argument("--heads", type=int, default=heads, help=f"query heads (default {heads})")
    p.add_argument("--kv-heads", type=int, default=kv_heads, help=f"key/value heads (default {kv_heads})")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--window", type=int, default=2048, help="sliding window / keep window w (default 2048)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warmup (default 25 ms)")
    p.add_argument(
        "--rep-ms",
        type=float,
        default=100.0,
        help="do_bench repetition time (default 100 ms; on CPU, 0 times a single call)",
    )
    add_run_arguments(p)
    p.add_argument("--quick", action="store_true", help="fewer sizes (see each command's help)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny sizes for a CPU smoke run of a few seconds (options given explicitly still apply)",
    )


def add_run_arguments(p: argparse.ArgumentParser, cell_timeout: float = 240.0) -> None:
    """Budget, timeout, seed and output options."""
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds after which no new measurement starts (cells then read 'skipped (time budget)')",
    )
    p.add_argument(
        "--cell-timeout",
        type=float,
        default=cell_timeout,
        help=f"interrupt one measurement (incl. its compilation) after this many seconds "
        f"(default {cell_timeout:g}); 0: never",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the report to OUT.md and the raw numbers to OUT.json")


def given_options(argv: list[str]) -> set[str]:
    """The ``--options`` present in ``argv`` (the bench parsers do not accept abbreviations)."""
    return {a.split("=")[0] for a in argv if a.startswith("--")}


def apply_presets(args: argparse.Namespace, argv: list[str], presets: dict[str, Any]) -> None:
    """Set each ``--option: value`` of ``presets`` unless the command line gave that option.

    Examples:
        >>> args = argparse.Namespace(heads=4, head_dim=128)  # parsed from `--heads 4`
        >>> apply_presets(args, ["--heads", "4"], {"--heads": 2, "--head-dim": 16})
        >>> args.heads, args.head_dim
        (4, 16)
    """
    given = given_options(argv)
    for option, value in presets.items():
        if option not in given:
            setattr(args, option.lstrip("-").replace("-", "_"), value)


def check_heads(args: argparse.Namespace) -> None:
    """Sizes must be positive and the query heads a multiple of the KV heads."""
    for name in ("heads", "kv_heads", "head_dim", "window"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        raise UsageError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
