"""Benchmarks that ship with flexmask: ``python -m flexmask bench {masks,dma} [options]``.

* ``bench masks``: building the ``BlockMask`` of ``causal & sliding_window(w)`` and of
  ``causal & document(ids)`` with flexmask's structural builder vs torch's compiled and eager
  ``create_block_mask`` (time, first call, peak memory), then ``flexmask.attention`` vs hand-written
  compiled FlexAttention for the same masks (the overhead of flexmask's layer, forward and
  forward + backward).
* ``bench dma``: Dynamic Mask Attention (``fm.topk`` token selection and ``fm.topk_blocks`` block
  selection, with a per-key bias that receives gradients) side by side with SDPA causal, flex
  causal and flex sliding window, plus the cost of building the mask when the scores change, peak
  memory, and the paper's head configuration.

Each command prints a markdown report (date, device, versions, configuration, command, tables,
targets) and with ``--out FILE`` writes it to ``FILE.md`` with the raw numbers in ``FILE.json``,
rewritten after every row so that an interrupted run keeps what it measured.

How things are measured:

* CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call), median of the
  repetitions (``--warmup-ms``/``--rep-ms``, default 25/100 ms); peak memory is
  ``torch.cuda.max_memory_allocated`` during one separate call, minus what was allocated before it.
  CPU: a wall-clock loop (median of the calls); memory is not measured. CPU runs are smoke tests.
* "fwd" is the forward of a training step (inputs require grad) and "fwd+bwd" adds
  ``torch.autograd.grad`` with a random output gradient, so both reuse one compiled graph.
* Every measurement is guarded: an error (out of memory, a compile failure, a missing feature)
  prints ``error: ...`` in its cell and the run goes on; ``--budget`` stops starting new
  measurements after that many seconds; ``--cell-timeout`` interrupts one that hangs.
* Compilation: FlexAttention, hand-written and flexmask's alike, is compiled with ``dynamic=False``
  (kernels specialised to each shape, as flexmask's backend does), so every new shape and every
  mask/bias structure costs one compilation (the "first call" columns show it). torch's
  ``create_block_mask`` is compiled once with ``dynamic=True`` (one graph per mask function for all
  lengths; torch's default compile is used if that fails). Dynamo's recompile limit is raised so
  that no variant silently falls back to eager FlexAttention. Target sizes run first so that a
  budget-limited run keeps the numbers that matter most.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import flexmask as fm

from .attention import cached_block_mask
from .backends import dma_layout
from .blocks import Layout, build_block_mask

Row = dict[str, Any]

# --------------------------------------------------------------------------------------------
# measuring


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

    def raw(self) -> dict[str, float]:
        return {"median_ms": self.median, "p20_ms": self.p20, "p80_ms": self.p80, "n": self.n}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Clock:
    """Times a function: ``triton.testing.do_bench`` on CUDA, a wall-clock loop elsewhere."""

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
            times = [float(t) for t in times]
            return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))
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
        return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def _sync(device: torch.device) -> None:
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
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - counters moved
        return 0


def first_call(fn: Callable[[], Any], device: torch.device, inspect: Callable[[Any], Any] | None = None):
    """Run ``fn`` once: ``(seconds including any compilation, graphs compiled, inspect(output))``."""
    graphs = compiled_graphs()
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    seen = None if inspect is None else inspect(out)
    del out
    return seconds, compiled_graphs() - graphs, seen


@contextlib.contextmanager
def _alarm(seconds: float):
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


def _timed_out(e: BaseException) -> bool:
    """Whether ``e`` is, or was raised while handling, a :class:`CellTimeout` (torch.compile wraps errors)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CellTimeout):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in first.lower():
        return "out of memory"
    return f"{type(e).__name__}: {first}"[:300]


class Runner:
    """Runs guarded measurements, keeps the time budget, logs progress to stderr."""

    def __init__(self, device: torch.device, budget_s: float | None, cell_timeout_s: float, log=None):
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
            if _timed_out(e):
                message = f"timed out after {self.cell_timeout_s:g} s (--cell-timeout)"
            else:
                message = _short_error(e)
            self.log(f"{label}: error: {message}")
            return Note(f"error: {message}")

    def cleanup(self) -> None:
        """Between rows on CUDA: free what the last row left (an error's traceback may hold tensors)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def _value(x: Any) -> Any:
    """A measurement's headline number: the median of a :class:`Timing`, else ``x``."""
    return x.median if isinstance(x, Timing) else x


def _number(x: Any) -> float | None:
    x = _value(x)
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _ratio(num: Any, den: Any) -> float | Note:
    a, b = _number(num), _number(den)
    if a is None or b is None or b <= 0:
        return Note("-")
    return a / b


# --------------------------------------------------------------------------------------------
# report


@dataclass
class Column:
    key: str
    title: str
    kind: str  # "ms", "s", "x", "pct", "signed_pct", "mib", "int", "text"


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        text = str(value).replace("|", "/").replace("\n", " ")
        return text if len(text) <= 90 else text[:87] + "..."
    x = _value(value)
    if kind == "int":
        return str(int(x))
    if kind == "x":
        return f"{x:.2f}x"
    if kind == "pct":
        return f"{x:.1f}%"
    if kind == "signed_pct":
        return f"{x:+.1f}%"
    if kind == "mib":
        return f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"
    if kind in ("ms", "s"):
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def markdown_table(columns: list[Column], rows: list[Row]) -> str:
    """Rows as a markdown table; cells hold numbers (formatted by column kind) or notes."""
    head = "| " + " | ".join(c.title for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row.get(c.key), c.kind) for c in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _json_ready(x: Any) -> Any:
    if isinstance(x, Timing):
        return x.raw()
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class Report:
    """The markdown + JSON report of one bench command, rewritten to ``--out`` as rows arrive."""

    def __init__(self, title: str, meta: dict[str, Any], out: str | None):
        self.title = title
        self.meta = meta
        self.sections: list[tuple[str, list[Column], list[Row], list[str]]] = []
        self.targets: list[str] = []
        self.out = Path(out) if out else None

    def section(self, name: str, columns: list[Column], notes: list[str] | None = None) -> list[Row]:
        rows: list[Row] = []
        self.sections.append((name, columns, rows, notes or []))
        return rows

    def markdown(self) -> str:
        m = self.meta
        lines = [f"# {self.title}", ""]
        for key in ("date", "device", "software", "command", "config", "timing", "compile"):
            if key in m:
                lines.append(f"- {key}: {m[key]}")
        if m.get("smoke"):
            lines.append(f"- note: {m['smoke']}")
        for name, columns, rows, notes in self.sections:
            lines += ["", f"## {name}", "", markdown_table(columns, rows)]
            for note in notes:
                lines += ["", note]
        if self.targets:
            lines += ["", "## Targets", ""] + [f"- {t}" for t in self.targets]
        if "elapsed_s" in m:
            lines += ["", f"Total time: {m['elapsed_s']:.0f} s; errors: {m.get('errors', 0)}."]
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return _json_ready(
            {
                "title": self.title,
                "meta": self.meta,
                "sections": {name: rows for name, _, rows, _ in self.sections},
                "targets": self.targets,
            }
        )

    def save(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_suffix(".md").write_text(self.markdown())
        self.out.with_suffix(".json").write_text(json.dumps(self.as_json(), indent=1))


# --------------------------------------------------------------------------------------------
# environment


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    clock: Clock
    runner: Runner
    gen: torch.Generator

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _versions() -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("no triton")
    parts.append(f"flexmask {fm.__version__}")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _configure_compile() -> str:
    """Raise dynamo's recompile limit: every variant and every shape is a new graph of flex_attention."""
    import torch._dynamo.config as dynamo_config

    limit = 256
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(limit, getattr(dynamo_config, name)))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(4 * limit, dynamo_config.accumulated_recompile_limit)
    return (
        "flex_attention (hand-written and flexmask) compiled with dynamic=False, one specialised compile per "
        "shape and mask/bias structure; torch's create_block_mask compiled with dynamic=True (one graph per "
        f"mask function for all lengths); dynamo recompile limit raised to {limit}"
    )


def _make_env(args) -> Env:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    budget = args.budget if args.budget and args.budget > 0 else None
    runner = Runner(device, budget, args.cell_timeout)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    return Env(device, dtype, Clock(device, args.warmup_ms, args.rep_ms), runner, gen)


def _meta(args, env: Env, argv: list[str], command: str, config: str) -> dict[str, Any]:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": _device_name(env.device),
        "software": _versions(),
        "command": "`" + " ".join(["python -m flexmask bench", command, *argv]) + "`",
        "config": config,
    }
    if env.cuda:
        meta["timing"] = (
            f"triton.testing.do_bench median (warmup {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms, L2 flushed), "
            "CUDA events; peak memory = torch.cuda.max_memory_allocated in one separate call, above what was "
            "allocated before it"
        )
        meta["compile"] = _configure_compile()
    else:
        meta["timing"] = "wall-clock loop, median; memory not measured"
        meta["smoke"] = (
            "CPU smoke run: hand-written flex is eager flex_attention (forward only), flexmask uses its "
            "reference backend, the bench compiles nothing; the numbers say nothing about GPU speed"
        )
    return meta


def parse_lengths(text: str) -> list[int]:
    """``"4k,16384,64K"`` → ``[4096, 16384, 65536]``."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = 1024 if part.endswith("k") else 1
        value = int(part[:-1] if part.endswith("k") else part) * scale
        if value <= 0:
            raise argparse.ArgumentTypeError(f"lengths must be positive, got {part!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("no lengths given")
    return out


def priority_order(lengths: list[int], first: tuple[int, ...]) -> list[int]:
    """The lengths to run, target sizes first (then ascending): a budget cut keeps what matters."""
    head = [n for n in first if n in lengths]
    return head + sorted(n for n in dict.fromkeys(lengths) if n not in head)


# --------------------------------------------------------------------------------------------
# hand-written FlexAttention (what a user writes without flexmask)

_handwritten_window: dict[int, Callable] = {}
_compiled: dict[str, Callable] = {}


def causal_mod(b, h, q_idx, kv_idx):
    """Hand-written causal ``mask_mod``."""
    return q_idx >= kv_idx


def window_mod(size: int) -> Callable:
    """Hand-written ``causal & sliding_window(size)`` ``mask_mod`` (one function object per size)."""
    if size not in _handwritten_window:

        def sliding_window(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < size)

        _handwritten_window[size] = sliding_window
    return _handwritten_window[size]


_handwritten_document: dict[int, tuple[torch.Tensor, Callable]] = {}


def document_mod(ids: torch.Tensor) -> Callable:
    """Hand-written ``causal & document(ids)`` ``mask_mod`` (ids: ``[B, N]``; one function per ids tensor)."""
    if id(ids) not in _handwritten_document or _handwritten_document[id(ids)][0] is not ids:

        def causal_document(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

        _handwritten_document[id(ids)] = (ids, causal_document)
    return _handwritten_document[id(ids)][1]


def compiled_create_block_mask(*args, **kwargs):
    """torch's compiled ``create_block_mask``, called with ``create_block_mask``'s arguments.

    ``torch.compile(create_block_mask, dynamic=True)``: one graph per mask function serves every
    length (``create_block_mask(..., _compile=True)`` is ``torch.compile(create_block_mask)``, whose
    automatic dynamic shapes reach the same graph from the second length on, after one more
    compilation). Should that compilation fail, torch's default compile is used from then on.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    if "cbm" not in _compiled:
        _compiled["cbm"] = torch.compile(create_block_mask, dynamic=True)
        _compiled["cbm_mode"] = "torch.compile(create_block_mask, dynamic=True)"
    try:
        return _compiled["cbm"](*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        if _timed_out(e) or _compiled["cbm_mode"] != "torch.compile(create_block_mask, dynamic=True)":
            raise
        print(f"bench: compiled create_block_mask with dynamic=True failed ({_short_error(e)}); "
              "using torch.compile(create_block_mask) defaults", file=sys.stderr)
        _compiled["cbm"] = torch.compile(create_block_mask)
        _compiled["cbm_mode"] = "torch.compile(create_block_mask) (dynamic=True failed)"
        return _compiled["cbm"](*args, **kwargs)


def handwritten_flex(device: torch.device) -> Callable:
    """``torch.compile(flex_attention, dynamic=False, fullgraph=True)`` on CUDA (as flexmask compiles it);
    eager ``flex_attention`` (forward only) elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled["flex"]


def handwritten_block_mask(mod: Callable, n: int, device: torch.device):
    """The hand-written path's ``BlockMask`` (B = H = 1, broadcast): torch's compiled builder on CUDA.

    Called with the same arguments as the ``H=1`` rows of ``bench masks`` so both share one graph.
    """
    if device.type == "cuda":
        return compiled_create_block_mask(mod, 1, 1, n, n, device=device)
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mod, 1, 1, n, n, device=device)


def random_document_ids(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[1, n]`` ids of 8–32 packed documents of random lengths (each at least 1 token)."""
    docs = int(torch.randint(8, 33, (1,), generator=gen))
    docs = max(1, min(docs, n))
    cuts = torch.randperm(n - 1, generator=gen)[: docs - 1] + 1
    starts = torch.zeros(n, dtype=torch.int64)
    starts[cuts] = 1
    return starts.cumsum(0)[None].to(device)


def _grad(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out)


def _qkv(env: Env, n: int, hq: int, hkv: int, d: int, requires_grad: bool = True):
    def make(h):
        return torch.randn(1, h, n, d, device=env.device, dtype=env.dtype).requires_grad_(requires_grad)

    q, k, v = make(hq), make(hkv), make(hkv)
    grad_out = torch.randn(1, hq, n, d, device=env.device, dtype=env.dtype)
    return q, k, v, grad_out


# --------------------------------------------------------------------------------------------
# bench masks

BUILDERS = ("flexmask", "torch-compiled", "torch-compiled-h1", "torch-eager")
BUILDER_TITLES = {
    "flexmask": "flexmask structural (heads={h})",
    "torch-compiled": "torch compiled create_block_mask (H={h})",
    "torch-compiled-h1": "torch compiled create_block_mask (H=1)",
    "torch-eager": "torch eager create_block_mask (H={h})",
}
MASKS = ("window", "document")

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


def _mask_exprs(kind: str, window: int, ids: torch.Tensor):
    if kind == "window":
        return f"causal & sliding_window({window})", fm.causal() & fm.sliding_window(window), window_mod(window)
    return "causal & document(ids)", fm.causal() & fm.document(ids), document_mod(ids)


def _block_shape(bm) -> str:
    return "×".join(str(s) for s in bm.kv_num_blocks.shape[:2])


def _build_row(env: Env, args, kind: str, n: int, builder: str, ids: torch.Tensor) -> Row:
    runner, dev = env.runner, env.device
    name, mask, mod = _mask_exprs(kind, args.window, ids)
    heads = 1 if builder == "torch-compiled-h1" else args.heads
    row: Row = {"mask": name, "N": n, "builder": BUILDER_TITLES[builder].format(h=args.heads), "key": builder}

    def setup():
        if builder == "flexmask":
            layout = Layout(1, args.heads, n, n, dev)
            return lambda: build_block_mask(mask, layout)
        if builder in ("torch-compiled", "torch-compiled-h1"):
            if not env.cuda:
                raise Skip("CPU: compiled create_block_mask is a CUDA benchmark")
            return lambda: compiled_create_block_mask(mod, 1, heads, n, n, device=dev)
        gb = heads * n * n / 1e9
        if gb > args.eager_cap_gb:
            raise Skip(f"B·H·N² = {gb:.1f} GB > --eager-cap-gb {args.eager_cap_gb:g}")
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
        q, k, v, grad_out = _qkv(env, n, args.heads, args.kv_heads, args.head_dim)
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
            return _grad(hand_fwd(), (q, k, v), grad_out)

        def fm_train():
            return _grad(fm_fwd(), (q, k, v), grad_out)

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
            got = [_number(t) for t in times[label]]
            key = "hand_ms" if label == "hand" else "flexmask_ms"
            if all(g is not None for g in got):
                row[key] = sum(got) / len(got)
                row[f"{label}_repeats_ms"] = got
            else:
                row[key] = next(t for t in times[label] if isinstance(t, Note))
        hand_ms, ours_ms = _number(row["hand_ms"]), _number(row["flexmask_ms"])
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


def run_masks(args, argv: list[str]) -> Report:
    """``bench masks``: BlockMask building, then flexmask's attention overhead over hand-written flex."""
    env = _make_env(args)
    runner = env.runner
    lengths = priority_order(args.lengths, (65536,))
    builders = [b for b in args.builders if b in BUILDERS]
    config = (
        f"B=1, heads={args.heads}, window={args.window}, documents: 8–32 of random lengths, block 128; "
        f"attention: {str(env.dtype).replace('torch.', '')}, B=1, Hq={args.heads}, Hkv={args.kv_heads}, "
        f"D={args.head_dim}, N={args.attn_length}; eager create_block_mask skipped when B·H·N² > "
        f"{args.eager_cap_gb:g} GB"
    )
    report = Report("flexmask bench masks", _meta(args, env, argv, "masks", config), args.out)
    build_rows = report.section(
        f"Building the BlockMask (H={args.heads})",
        BUILD_COLUMNS,
        [
            "time: a fresh build per call (flexmask: `flexmask.blocks.build_block_mask`, no cache); "
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
                    f"{_fmt(row.get('time_ms'), 'ms')} ms, first call {_fmt(row.get('first_call_s'), 's')} s, "
                    f"peak {_fmt(row.get('peak_mib'), 'mib')} MiB"
                )
                runner.cleanup()
                report.save()
            ours = next((r for r in rows if r["key"] == "flexmask"), None)
            for r in rows:
                r["flexmask_faster"] = Note("-") if ours is None or r is ours else _ratio(r["time_ms"], ours["time_ms"])

    def overhead() -> None:
        for kind in args.masks:
            rows = _overhead_rows(env, args, kind, ids_for(args.attn_length))
            overhead_rows.extend(rows)
            for r in rows:
                runner.log(
                    f"overhead {r['mask']} {r['pass']}: hand {_fmt(r.get('hand_ms'), 'ms')} ms, "
                    f"flexmask {_fmt(r.get('flexmask_ms'), 'ms')} ms, {_fmt(r.get('overhead_pct'), 'signed_pct')}"
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

    for r in build_rows:
        if r["N"] == 65536 and r["key"] in ("torch-compiled", "torch-compiled-h1"):
            x = _number(r["flexmask_faster"])
            verdict = "n/a" if x is None else ("met" if x >= 10 else "MISSED")
            report.targets.append(
                f"{r['mask']}, N=65536: flexmask vs {r['builder']}: "
                f"{_fmt(r['flexmask_faster'], 'x')} (target ≥ 10x): {verdict}"
            )
    for r in build_rows:
        if r["N"] == 65536 and r["key"] == "flexmask":
            torch_row = next((t for t in build_rows if t["N"] == 65536 and t["mask"] == r["mask"]
                              and t["key"] == "torch-compiled"), {})
            report.targets.append(
                f"{r['mask']}, N=65536: flexmask peak memory {_fmt(r.get('peak_mib'), 'mib')} MiB, torch compiled "
                f"{_fmt(torch_row.get('peak_mib'), 'mib')} MiB (target: O((N/128)²) = 262144 block pairs, "
                "no N² tensor)"
            )
    for r in overhead_rows:
        x = _number(r.get("overhead_pct"))
        if x is not None:
            verdict = "met" if x <= 5 else "MISSED"
            report.targets.append(
                f"{r['mask']} {r['pass']}: fm.attention overhead {x:+.1f}% (target ≤ 5%; run-to-run spread "
                f"{_fmt(r.get('spread_pct'), 'pct')}): {verdict}"
            )
    return _finish(report, runner)


# --------------------------------------------------------------------------------------------
# bench dma

VARIANTS = ("sdpa", "flex-causal", "flex-window", "token", "block")  # table order
RUN_ORDER = ("sdpa", "token", "block", "flex-window", "flex-causal")  # SDPA first: the speedups' reference
DMA_VARIANTS = ("token", "block")
SCORES = ("random", "clustered")

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
    "mask build: constructing the mask object + what `fm.attention` builds from it on fresh scores (the token "
    "key layout, `flexmask.backends.dma_layout.prepare`, or the BlockMask, `flexmask.attention.cached_block_mask`) "
    "(what a training step pays when the scores change). step: fwd+bwd with a fresh mask every call "
    "(build + attention, measured together). peak MiB: fwd+bwd, above the inputs. first call s: first fwd+bwd "
    "call incl. compilation (graphs: how many dynamo graphs it compiled).",
    "scores: random = i.i.d. normal per key (scattered selection, the hard case); clustered = a normalised "
    "random walk along the keys (a few hot regions).",
]


def make_scores(kind: str, hs: int, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[1, hs, n]`` float32 key scores requiring grad: ``random`` normal or ``clustered`` random walk."""
    x = torch.randn(1, hs, n, generator=gen)
    if kind == "clustered":
        x = x.cumsum(-1)
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-6)
    elif kind != "random":
        raise ValueError(f"scores must be 'random' or 'clustered', got {kind!r}")
    return x.to(device).requires_grad_(True)


def _dma_factory(variant: str, window: int, block_size: int) -> Callable:
    name = "topk" if variant == "token" else "topk_blocks"
    fn = getattr(fm, name, None)
    if fn is None:
        raise Skip(f"unavailable: this flexmask has no fm.{name} (flexmask/dma.py)")
    if variant == "token":
        return lambda s: fn(s, window)
    k_blocks = max(1, window // block_size)
    return lambda s: fn(s, k_blocks, block_size=block_size)


VARIANT_TITLES = {
    "sdpa": "SDPA causal",
    "flex-causal": "flex causal",
    "flex-window": "flex sliding window {w}",
    "token": "DMA token top-k {w}",
    "block": "DMA block top-k {kb}×{bs}",
}


def _dma_row(env: Env, args, inputs, n: int, hq: int, hkv: int, variant: str, scores: str | None) -> Row:
    runner, dev = env.runner, env.device
    q, k, v, grad_out = inputs
    gqa = hq != hkv
    title = VARIANT_TITLES[variant].format(w=args.window, kb=max(1, args.window // 128), bs=128)
    row: Row = {"N": n, "Hq": hq, "Hkv": hkv, "variant": title, "key": variant, "scores": scores or "-"}
    label = f"dma N={n} Hq={hq} {variant}{' ' + scores if scores else ''}"
    extras: dict[str, Callable] = {}

    def setup():
        if variant == "sdpa":

            def fwd():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

            return fwd, lambda: _grad(fwd(), (q, k, v), grad_out)
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

            return fwd, lambda: _grad(fwd(), (q, k, v), grad_out)
        make_mask = _dma_factory(variant, args.window, 128)
        s = make_scores(scores, hkv, n, env.gen, dev)
        mask, bias = make_mask(s), fm.key_bias(s)
        layout = Layout(1, hq, n, n, dev)

        def fwd():
            return fm.attention(q, k, v, mask=mask, bias=bias)

        def build():  # what fm.attention builds for a fresh mask: the token layout, or the BlockMask
            fresh = make_mask(s)
            if dma_layout.applies(fresh, bias, None, layout, k):
                return dma_layout.prepare(fresh, layout)
            return cached_block_mask(fresh, layout)

        extras["build"] = build
        extras["step"] = lambda: _grad(
            fm.attention(q, k, v, mask=make_mask(s), bias=fm.key_bias(s)), (q, k, v, s), grad_out
        )
        return fwd, lambda: _grad(fwd(), (q, k, v, s), grad_out)

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
        row["build_pct"] = _percent(row["build_ms"], row["train_ms"])

        def timed_step():
            if env.cuda:  # new scores must not recompile: a recompiling step would take minutes to time
                step()  # warm: a first fresh mask may compile something once
                _sync(dev)
                before = compiled_graphs()
                step()
                step()
                _sync(dev)
                recompiled = compiled_graphs() - before
                if recompiled:
                    raise RuntimeError(f"new masks recompile ({recompiled} graphs in 2 steps); not timed")
            return env.clock(step)

        row["step_ms"] = runner.run(f"{label} step (fresh mask)", timed_step)
    return row


def _percent(part: Any, whole: Any) -> float | Note:
    r = _ratio(part, whole)
    return r * 100.0 if isinstance(r, float) else r


def _fill_speedups(rows: list[Row], sdpa: Row | None) -> None:
    for r in rows:
        for key, ref in (("fwd_x", "fwd_ms"), ("train_x", "train_ms"), ("step_x", "train_ms")):
            own = "step_ms" if key == "step_x" else ref
            if own not in r:
                continue
            r[key] = _ratio(sdpa.get(ref), r.get(own)) if sdpa is not None else Note("-")


def _dma_config(env: Env, args, n: int, hq: int, hkv: int, rows: list[Row], report: Report,
                variants: list[str], sdpa_rows: dict[tuple[int, int, int], Row]) -> None:
    runner = env.runner
    if not variants:
        return
    inputs = runner.run(f"dma N={n} Hq={hq} inputs", lambda: _qkv(env, n, hq, hkv, args.head_dim))
    for variant in sorted(variants, key=RUN_ORDER.index):
        for scores in args.scores if variant in DMA_VARIANTS else (None,):
            if isinstance(inputs, Note):
                row = {"N": n, "Hq": hq, "Hkv": hkv, "key": variant, "scores": scores or "-", "fwd_ms": inputs,
                       "variant": VARIANT_TITLES[variant].format(w=args.window, kb=max(1, args.window // 128), bs=128)}
            else:
                row = _dma_row(env, args, inputs, n, hq, hkv, variant, scores)
            rows.append(row)
            if variant == "sdpa":
                sdpa_rows[n, hq, hkv] = row
            _fill_speedups([row], sdpa_rows.get((n, hq, hkv)))
            runner.log(
                f"dma N={n} Hq={hq}/{hkv} {row['variant']} {row['scores']}: fwd {_fmt(row.get('fwd_ms'), 'ms')} ms, "
                f"fwd+bwd {_fmt(row.get('train_ms'), 'ms')} ms ({_fmt(row.get('train_x'), 'x')} SDPA), "
                f"build {_fmt(row.get('build_ms'), 'ms')} ms, step {_fmt(row.get('step_ms'), 'ms')} ms, "
                f"first call {_fmt(row.get('first_call_s'), 's')} s"
            )
            runner.cleanup()
            report.save()
    del inputs
    runner.cleanup()


DECODE_COLUMNS = [
    Column("K", "K", "int"),
    Column("variant", "variant", "text"),
    Column("fwd_ms", "attention ms", "ms"),
    Column("fwd_x", "vs SDPA", "x"),
    Column("step_ms", "step ms (fresh mask)", "ms"),
    Column("step_x", "step vs SDPA", "x"),
    Column("first_call_s", "first call s", "s"),
]


def _decode_rows(env: Env, args, report: Report) -> None:
    """Decoding, Q = 1 against K cached keys: SDPA (the newest query sees every key) vs DMA token top-k."""
    hq, hkv = args.paper_heads
    rows = report.section(
        f"Decoding, Q=1, Hq={hq}, Hkv={hkv}", DECODE_COLUMNS,
        ["attention: the call with the mask prebuilt (scores unchanged); step: a fresh `fm.topk` mask every call "
         "(the selection over all K scores plus the attention), as when a new token arrives. No gradients."],
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
        return fm.attention(q, k, v, mask=fm.topk(s, args.window), bias=fm.key_bias(s))

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
        row["fwd_x"] = _ratio(ref.get("fwd_ms"), row.get("fwd_ms"))
        if "step_ms" in row:
            row["step_x"] = _ratio(ref.get("fwd_ms"), row["step_ms"])
        rows.append(row)
        env.runner.log(f"{label}: {_fmt(row.get('fwd_ms'), 'ms')} ms, step {_fmt(row.get('step_ms'), 'ms')} ms")
        report.save()


def _dma_targets(report: Report, rows: list[Row], hq: int) -> None:
    def find(n, key, scores="random"):
        return next((r for r in rows if r["N"] == n and r["key"] == key and r["Hq"] == hq and r["scores"] == scores),
                    None)

    checks = [
        ("token", 32768, "train_x", 3.0, "token top-k fwd+bwd"),
        ("token", 65536, "train_x", 6.0, "token top-k fwd+bwd"),
        ("token", 32768, "fwd_x", 3.5, "token top-k fwd"),
        ("block", 32768, "train_x", 4.0, "block top-k fwd+bwd"),
        ("block", 65536, "train_x", 8.0, "block top-k fwd+bwd"),
    ]
    for scores in SCORES:
        for key, n, col, target, what in checks:
            r = find(n, key, scores)
            if r is None:
                continue
            x = _number(r.get(col))
            verdict = "n/a" if x is None else ("met" if x >= target else "MISSED")
            report.targets.append(
                f"N={n}, {scores} scores: {what} vs SDPA causal {_fmt(r.get(col), 'x')} (target ≥ {target:g}x): "
                f"{verdict}"
            )
        for key in DMA_VARIANTS:
            r = find(32768, key, scores)
            if r is None:
                continue
            x = _number(r.get("build_pct"))
            verdict = "n/a" if x is None else ("met" if x <= 10 else "MISSED")
            report.targets.append(
                f"N=32768, {scores} scores: {key} mask build = {_fmt(r.get('build_pct'), 'pct')} of fwd+bwd "
                f"(target ≤ 10%): {verdict}"
            )


def run_dma(args, argv: list[str]) -> Report:
    """``bench dma``: DMA token and block selection vs SDPA causal and flex causal/window."""
    env = _make_env(args)
    runner = env.runner
    dtype = str(env.dtype).replace("torch.", "")
    config = (
        f"{dtype}, B=1, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, w={args.window}, block selection "
        f"k={max(1, args.window // 128)} blocks of 128, key scores float32 [B, Hkv, N] requiring grad; "
        f"paper config: Hq={args.paper_heads[0]}, Hkv={args.paper_heads[1]}, N={args.paper_length or 'off'}"
    )
    report = Report("flexmask bench dma", _meta(args, env, argv, "dma", config), args.out)
    if not (hasattr(fm, "topk") and hasattr(fm, "topk_blocks")) and set(args.variants) & set(DMA_VARIANTS):
        runner.log("note: flexmask has no fm.topk / fm.topk_blocks yet (flexmask/dma.py); DMA rows are skipped")
    main_rows = report.section(f"Attention, Hq={args.heads}, Hkv={args.kv_heads}", DMA_COLUMNS, DMA_NOTES)
    paper_rows: list[Row] = []
    if args.paper_length:
        hq, hkv = args.paper_heads
        paper_rows = report.section(
            f"Paper configuration, Hq={hq}, Hkv={hkv}, N={args.paper_length}", DMA_COLUMNS,
            ["Same columns as above; the paper (arXiv 2508.02124) times batch 1, 2 query heads, 1 KV head, "
             "d 128, w 2048 on an RTX 4090 against a dense-mask SDPA."],
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
        _decode_rows(env, args, report)
    _dma_targets(report, main_rows, args.heads)
    return _finish(report, runner)


# --------------------------------------------------------------------------------------------
# command line


def _finish(report: Report, runner: Runner) -> Report:
    if "cbm_mode" in _compiled:
        report.meta["compile"] = report.meta.get("compile", "") + f"; create_block_mask: {_compiled['cbm_mode']}"
    report.meta["elapsed_s"] = runner.elapsed()
    report.meta["errors"] = runner.errors
    report.save()
    return report


def _common(p: argparse.ArgumentParser, lengths: str, heads: int, kv_heads: int) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="attention dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths(lengths),
                   help=f"comma-separated sequence lengths, 'k' = 1024 (default {lengths})")
    p.add_argument("--heads", type=int, default=heads, help=f"query heads (default {heads})")
    p.add_argument("--kv-heads", type=int, default=kv_heads, help=f"key/value heads (default {kv_heads})")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    p.add_argument("--window", type=int, default=2048, help="sliding window / keep window w (default 2048)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warmup (default 25 ms)")
    p.add_argument("--rep-ms", type=float, default=100.0,
                   help="do_bench repetition time (default 100 ms; on CPU, 0 times a single call)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which no new measurement starts (cells then read 'skipped (time budget)')")
    p.add_argument("--cell-timeout", type=float, default=240.0,
                   help="interrupt one measurement (incl. its compilation) after this many seconds; 0: never")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer sizes (see each command's help)")
    p.add_argument("--out", default=None, help="write the report to OUT.md and the raw numbers to OUT.json")


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` argument parser (subcommands ``masks`` and ``dma``)."""
    parser = argparse.ArgumentParser(
        prog="python -m flexmask bench",
        description="flexmask benchmarks. Prints a markdown report; --out FILE also writes FILE.md and FILE.json.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("masks", help="BlockMask building vs torch's create_block_mask; fm.attention overhead",
                       description="BlockMask building (flexmask structural vs torch compiled/eager create_block_mask) "
                       "and fm.attention vs hand-written flex. --quick: lengths 16k,64k.")
    _common(m, "4096,16384,65536,131072", 16, 8)
    m.add_argument("--masks", type=_csv(MASKS), default=list(MASKS), help="window,document (default both)")
    m.add_argument("--builders", type=_csv(BUILDERS), default=list(BUILDERS),
                   help=f"subset of {','.join(BUILDERS)} (default all)")
    m.add_argument("--eager-cap-gb", type=float, default=8.0,
                   help="skip eager create_block_mask when B·H·N² bytes exceed this many GB (default 8)")
    m.add_argument("--attn-length", type=int, default=16384,
                   help="N of the attention-overhead comparison (default 16384; 0 skips it)")
    d = sub.add_parser("dma", help="Dynamic Mask Attention vs SDPA and flex",
                       description="DMA token/block selection vs SDPA causal, flex causal, flex window. "
                       "--quick: lengths 32k,64k and no paper configuration.")
    _common(d, "4096,8192,16384,32768,65536", 16, 8)
    d.add_argument("--variants", type=_csv(VARIANTS), default=list(VARIANTS),
                   help=f"subset of {','.join(VARIANTS)} (default all; sdpa is the speedup reference)")
    d.add_argument("--scores", type=_csv(SCORES), default=list(SCORES), help="random,clustered (default both)")
    d.add_argument("--paper-length", type=int, default=32768,
                   help="N of the paper configuration (default 32768; 0 skips it)")
    d.add_argument("--decode-lengths", type=lambda t: parse_lengths(t) if t not in ("", "0") else [],
                   default=[], help="K values of a decoding section (Q=1, --paper-heads, no gradients), "
                   "e.g. 4k,16k,64k (default: none)")
    d.add_argument("--paper-heads", type=lambda t: tuple(int(x) for x in t.split(",")), default=(2, 1),
                   help="Hq,Hkv of the paper configuration (default 2,1)")
    return parser


def _apply_quick(args, argv: list[str]) -> None:
    given = {a.split("=")[0] for a in argv}
    if not args.quick:
        return
    if args.command == "masks":
        if "--lengths" not in given:
            args.lengths = [16384, 65536]
    else:
        if "--lengths" not in given:
            args.lengths = [32768, 65536]
        if "--paper-length" not in given:
            args.paper_length = 0


def _check_args(args) -> None:
    for name in ("heads", "kv_heads", "head_dim", "window"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"bench: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        raise SystemExit(f"bench: --heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.command == "dma" and (len(args.paper_heads) != 2 or args.paper_heads[0] % args.paper_heads[1]):
        raise SystemExit(f"bench: --paper-heads must be Hq,Hkv with Hq a multiple of Hkv, got {args.paper_heads}")


def main(argv: list[str]) -> int:
    """Entry point of ``python -m flexmask bench``; returns the process exit code.

    Example:
        ``python -m flexmask bench dma --quick --out results/dma`` prints the report and writes
        ``results/dma.md`` and ``results/dma.json``. On CPU, a tiny smoke run:
        ``python -m flexmask bench masks --device cpu --lengths 256 --heads 2 --kv-heads 1 --head-dim 16
        --window 64 --attn-length 256``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _apply_quick(args, argv)
        _check_args(args)
    except SystemExit as e:  # --help, or bad arguments (argparse has printed why)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        return int(e.code or 0)
    rest = argv[1:]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_compile.*")
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        with torch.random.fork_rng(devices=[]):
            report = run_masks(args, rest) if args.command == "masks" else run_dma(args, rest)
    print(report.markdown(), end="", flush=True)
    if report.out is not None:
        print(f"\nwrote {report.out.with_suffix('.md')} and {report.out.with_suffix('.json')}", file=sys.stderr)
    return 0
