"""What every benchmark measures with: the clock, guarded measurements under a time budget, peak
memory, the environment (device, dtype, versions), the report header, and the CPU guard.

How things are measured:

* CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call), median of the
  repetitions (``--warmup-ms``/``--rep-ms``, default 25/100 ms); peak memory is
  ``torch.cuda.max_memory_allocated`` during one separate call, minus what was allocated before it.
  CPU: a wall-clock loop (median of the calls); memory is not measured. CPU runs are smoke tests.
* Every measurement is guarded (:class:`Runner`): an error (out of memory, a compile failure, a
  missing feature) becomes a :class:`Note` in its cell and the run goes on; ``--budget`` stops
  starting new measurements after that many seconds; ``--cell-timeout`` interrupts one that hangs.
* Without CUDA, :func:`cpu_guard` refuses (exit status 2) sizes whose dense ``N²`` tensors would not
  fit in the machine's free memory, instead of letting the kernel kill the process.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

import flexmask as fm

from ..._compat import dynamo_counters, raise_recompile_limit
from ..errors import UsageError

if TYPE_CHECKING:
    from .report import Report


class Note(str):
    """A table cell that is not a number: ``skipped (...)``, ``error: ...``, ``n/a (...)``."""


class Skip(Exception):
    """Raised inside a measurement to mark its cell ``skipped (<message>)``."""


class CellTimeout(Exception):
    """Raised by the ``--cell-timeout`` alarm inside a measurement that ran too long."""


@dataclass
class Timing:
    """Summary of repeated timings of one function, in milliseconds."""

    median: float
    p20: float
    p80: float
    n: int

    @classmethod
    def of(cls, times_ms: list[float]) -> Timing:
        """The summary of a list of timings (ms).

        Examples:
            >>> Timing.of([3.0, 1.0, 2.0]).median
            2.0
        """
        return cls(statistics.median(times_ms), _quantile(times_ms, 0.2), _quantile(times_ms, 0.8), len(times_ms))

    def raw(self) -> dict[str, float]:
        return {"median_ms": self.median, "p20_ms": self.p20, "p80_ms": self.p80, "n": self.n}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Clock:
    """Times a function: ``triton.testing.do_bench`` on CUDA, a wall-clock loop elsewhere.

    Examples:
        >>> clock = Clock(torch.device("cpu"), warmup_ms=0, rep_ms=0)
        >>> clock(lambda: torch.ones(8).sum()).n
        1
    """

    def __init__(self, device: torch.device, warmup_ms: float, rep_ms: float):
        self.device = device
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self._do_bench = None
        if device.type == "cuda":
            from triton.testing import do_bench

            self._do_bench = do_bench

    def __call__(self, fn: Callable[[], Any]) -> Timing:
        if self._do_bench is not None:
            try:
                times = self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all")
            except (TypeError, ValueError, AssertionError):  # a triton without return_mode="all"
                ms = float(self._do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
                return Timing(ms, ms, ms, 1)
            return Timing.of([float(t) for t in times])
        fn()
        deadline = time.perf_counter() + self.warmup_ms / 1e3
        while time.perf_counter() < deadline:
            fn()
        times: list[float] = []
        least = 3 if self.rep_ms > 0 else 1  # --rep-ms 0: one timed call (smoke tests)
        deadline = time.perf_counter() + self.rep_ms / 1e3
        while len(times) < least or (time.perf_counter() < deadline and len(times) < 1000):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return Timing.of(times)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall-clock times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | Note:
    """Peak device memory (MiB) of one call of ``fn`` above what was allocated before it."""
    if device.type != "cuda":
        return Note("n/a (CPU)")
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet (and importing dynamo takes seconds)
        return 0
    try:
        return int(dynamo_counters()["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - counters moved
        return 0


def first_call(
    fn: Callable[[], Any], device: torch.device, inspect: Callable[[Any], Any] | None = None
) -> tuple[float, int, Any]:
    """Run ``fn`` once: ``(seconds including any compilation, graphs compiled, inspect(output))``."""
    graphs = compiled_graphs()
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    seen = None if inspect is None else inspect(out)
    del out
    return seconds, compiled_graphs() - graphs, seen


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`CellTimeout` in the main thread after ``seconds`` (0: no limit)."""
    usable = seconds and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise CellTimeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timed_out(e: BaseException | None) -> bool:
    """Whether ``e`` is, or was raised while handling, a :class:`CellTimeout` (torch.compile wraps errors)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CellTimeout):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (CUDA's, or one that says so)."""
    text = str(e).strip().splitlines()
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or bool(
        text and "out of memory" in text[0].lower()
    )


def short_error(e: BaseException) -> str:
    """One line for a table cell: ``out of memory`` or ``Type: first line of the message``."""
    if out_of_memory(e):
        return "out of memory"
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:300]


class Runner:
    """Runs guarded measurements, keeps the time budget, logs progress to stderr.

    Examples:
        >>> import io
        >>> runner = Runner(torch.device("cpu"), budget_s=None, cell_timeout_s=0, log=io.StringIO())
        >>> runner.run("one", lambda: 1), runner.run("two", lambda: 1 / 0)
        (1, 'error: ZeroDivisionError: division by zero')
    """

    def __init__(self, device: torch.device, budget_s: float | None, cell_timeout_s: float, log: Any = None):
        self.device = device
        self.budget_s = budget_s
        self.cell_timeout_s = cell_timeout_s
        self.t0 = time.perf_counter()
        self.log_stream = sys.stderr if log is None else log
        self.errors = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {text}", file=self.log_stream, flush=True)

    def over_budget(self) -> bool:
        return self.budget_s is not None and self.elapsed() > self.budget_s

    def run(self, label: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or a :class:`Note` saying why there is no value (skipped, error, timeout)."""
        if self.over_budget():
            return Note("skipped (time budget)")
        try:
            with _alarm(self.cell_timeout_s):
                return fn()
        except Skip as e:
            return Note(f"skipped ({e})")
        except Exception as e:  # noqa: BLE001 - every failure becomes a cell, the run goes on
            self.errors += 1
            if timed_out(e):
                message = f"timed out after {self.cell_timeout_s:g} s (--cell-timeout)"
            else:
                message = short_error(e)
            self.log(f"{label}: error: {message}")
            return Note(f"error: {message}")

    def cleanup(self) -> None:
        """Between rows on CUDA: free what the last row left (an error's traceback may hold tensors)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Benchmark:
    """A ``bench`` subcommand: its name, its help, how it adds its options and how it runs.

    ``run(args, argv)`` gets the parsed options and the command line after ``bench NAME`` (for the
    report and for presets such as ``--quick``); it returns the finished report, or raises
    :class:`~flexmask.tools.errors.UsageError` for options it refuses.
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], Report]


# --------------------------------------------------------------------------------------------
# environment


@dataclass
class Env:
    """Where a benchmark runs: device, dtype, its clock and runner, and a seeded CPU generator."""

    device: torch.device
    dtype: torch.dtype
    clock: Clock
    runner: Runner
    gen: torch.Generator

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def versions(*extra: str) -> str:
    """``torch …, triton …, flexmask …, python …`` (plus ``extra`` parts, e.g. transformers)."""
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    parts += [*extra, f"flexmask {fm.__version__}", f"python {platform.python_version()}"]
    return ", ".join(parts)


def device_name(device: torch.device) -> str:
    """The GPU's name, memory and CUDA version, or the CPU and its threads."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def configure_compile() -> str:
    """Raise dynamo's recompile limit: every variant and every shape is a new graph of flex_attention."""
    limit = 256
    raise_recompile_limit(limit)
    return (
        "flex_attention (hand-written and flexmask) compiled with dynamic=False, one specialised compile per "
        "shape and mask/bias structure; torch's create_block_mask compiled with dynamic=True (one graph per "
        f"mask function for all lengths); dynamo recompile limit raised to {limit}"
    )


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when available, else CPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def make_env(args: argparse.Namespace) -> Env:
    """The :class:`Env` of the parsed common options (device, dtype, timing, budget, seed)."""
    device = resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    budget = args.budget if args.budget and args.budget > 0 else None
    runner = Runner(device, budget, args.cell_timeout)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    clock = Clock(device, getattr(args, "warmup_ms", 0.0), getattr(args, "rep_ms", 0.0))
    return Env(device, dtype, clock, runner, gen)


def meta(
    env: Env, argv: list[str], command: str, config: str, *, timing: str, software: str | None = None, **more: str
) -> dict[str, Any]:
    """The report's header: date, device, software, the exact command, configuration, timing method
    (and ``compile``, ``smoke`` notes given as keywords)."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(env.device),
        "software": software or versions(),
        "command": "`" + " ".join(["python -m flexmask bench", command, *argv]) + "`",
        "config": config,
        "timing": timing,
    }
    info.update(more)
    return info


def attention_meta(args: argparse.Namespace, env: Env, argv: list[str], command: str, config: str) -> dict[str, Any]:
    """:func:`meta` of the attention benchmarks (``do_bench`` on CUDA, a CPU smoke run elsewhere)."""
    if env.cuda:
        timing = (
            f"triton.testing.do_bench median (warmup {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms, L2 flushed), "
            "CUDA events; peak memory = torch.cuda.max_memory_allocated in one separate call, above what was "
            "allocated before it"
        )
        return meta(env, argv, command, config, timing=timing, compile=configure_compile())
    smoke = (
        "CPU smoke run: hand-written flex is eager flex_attention (forward only), flexmask uses its "
        "reference backend, the bench compiles nothing; the numbers say nothing about GPU speed"
    )
    return meta(env, argv, command, config, timing="wall-clock loop, median; memory not measured", smoke=smoke)


def finish(report: Report, runner: Runner) -> Report:
    """Record the run's time and error count in the report and write it a last time."""
    report.meta["elapsed_s"] = runner.elapsed()
    report.meta["errors"] = runner.errors
    report.save()
    return report


# --------------------------------------------------------------------------------------------
# the CPU guard


def available_memory() -> int:
    """Bytes of memory free for this process (``MemAvailable``, else half the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not a POSIX system
        return 8 << 30


def cpu_guard(device: torch.device, needs: list[tuple[float, str]]) -> None:
    """Refuse a CPU run whose largest dense tensors would not fit in half the free memory.

    Args:
        device: where it runs; nothing is checked on CUDA (the run reports out-of-memory cells).
        needs: ``(bytes, what)`` for each step that materialises ``N²`` tensors on CPU; steps run
            one after the other, so the largest one counts.

    Raises:
        UsageError: one line naming the step, its size, the free memory and what to do instead.

    Examples:
        >>> cpu_guard(torch.device("cpu"), [(1e3, "a tiny step")])  # fits: nothing happens
        >>> try:
        ...     cpu_guard(torch.device("cpu"), [(1e18, "eager flex_attention at N=10**7")])
        ... except UsageError as e:
        ...     print(str(e).split(" GiB")[0])
        on CPU, eager flex_attention at N=10**7 needs about 931322574.6
    """
    if device.type == "cuda" or not needs:
        return
    need, what = max(needs)
    limit = available_memory() / 2
    if need > limit:
        raise UsageError(
            f"on CPU, {what} needs about {need / 2**30:.1f} GiB, more than half the "
            f"{2 * limit / 2**30:.1f} GiB of free memory; add --tiny for a CPU smoke run (seconds) or give "
            "smaller sizes (the defaults are GPU sizes)"
        )
