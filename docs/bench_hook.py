"""MkDocs hook that draws the plots of the benchmarks page (docs/benchmarks.md) at build time.

Registered in ``mkdocs.yml`` (``hooks: [docs/bench_hook.py]``). Every plot is read from the JSON
reports that ``python -m flexmask bench ... --out DIR`` writes, kept in ``docs/results/bench/``, so a
plot cannot disagree with the numbers it shows. The PNGs are made in memory and added to the build
as generated files under ``images/bench/``: nothing is written into ``docs/``, nothing needs
committing. Each plot prints, under it, the device, date, software and report it was drawn from.

The same plots can be written to a folder with one command::

    python docs/bench_hook.py OUT_DIR

This hook needs matplotlib (the ``docs`` extra) and nothing from flexmask itself.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

REPORTS = Path(__file__).resolve().parent / "results" / "bench"
IMAGE_DIR = "images/bench"

# One colour and marker per variant, the same in every plot.
STYLE = {
    "sdpa": ("SDPA causal (flash)", "#444444", "o"),
    "flex-causal": ("flex causal", "#9467bd", "v"),
    "flex-window": ("flex sliding window 2048", "#2ca02c", "s"),
    "token": ("DMA token top-k 2048", "#1f77b4", "^"),
    "block": ("DMA block top-k 16×128", "#d62728", "D"),
}


def load(name: str) -> dict:
    """One JSON report of ``docs/results/bench/``."""
    return json.loads((REPORTS / f"{name}.json").read_text())


def _ms(value) -> float | None:
    """A time cell: a number, ``{"median_ms": ...}``, or a string (skipped, error) → None."""
    if isinstance(value, dict):
        value = value.get("median_ms")
    return float(value) if isinstance(value, (int, float)) else None


def _rows(report: dict, section_prefix: str) -> list[dict]:
    for title, rows in report["sections"].items():
        if title.startswith(section_prefix):
            return rows
    raise KeyError(f"no section starting with {section_prefix!r} in {report['title']!r}")


def _source(*reports: tuple[str, dict]) -> str:
    """The footer: device, software, and each report's date and file."""
    devices = {r["meta"]["device"] for _, r in reports}
    software = {r["meta"]["software"] for _, r in reports}
    runs = "; ".join(f"{r['meta']['date']} ({name}.json)" for name, r in reports)
    return f"{' / '.join(sorted(devices))}; {' / '.join(sorted(software))}\nruns: {runs}"


def _figure(ncols: int, width: float = 5.2, height: float = 4.0):
    from matplotlib.figure import Figure  # no pyplot, no backend switch: drawn in memory

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _panels_with_legend():
    """Two panels side by side and, under them, a strip that holds their common legend."""
    from matplotlib.figure import Figure  # no pyplot, no backend switch: drawn in memory

    fig = Figure(figsize=(10.4, 5.0), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 0.13])
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    legend_ax = fig.add_subplot(grid[1, :])
    legend_ax.axis("off")
    return fig, (axes, legend_ax)


def _length_axis(ax, lengths, label="sequence length N"):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(lengths)))
    ax.set_xticklabels([f"{n // 1024}k" if n >= 1024 else str(n) for n in sorted(set(lengths))])
    ax.minorticks_off()
    ax.margins(x=0.15)  # room for the "×" labels right of the last points
    ax.set_xlabel(label)
    ax.grid(True, which="major", alpha=0.3)


def _log_times(ax, label: str):
    """A log time axis labelled 0.5, 1, 2, 5, 10, ... (not 10^0)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel(label)


def _speedup(ax, x, y, factor, colour, dy: float = 2):
    """Write "3.6×" next to a point (``dy`` points above it): how many times faster than SDPA (or
    than torch's builder)."""
    if isinstance(factor, (int, float)):
        ax.annotate(
            f"{factor:.2g}×" if factor < 10 else f"{factor:.0f}×",
            (x, y),
            xytext=(7, dy),
            textcoords="offset points",
            fontsize=7,
            color=colour,
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )


def _finish(fig, title: str, source: str):
    fig.suptitle(title, fontsize=11)
    fig.supxlabel(source, fontsize=7, color="#555555")
    return fig


def blockmask_build():
    """BlockMask build time against N: flexmask's structural builder vs torch's compiled builder."""
    reports = [("masks-4k-16k-128k", load("masks-4k-16k-128k")), ("masks-64k", load("masks-64k"))]
    fig, (ax,) = _figure(1, width=6.4, height=4.4)
    series: dict[tuple[str, str], dict[int, float]] = {}
    for _, report in reports:
        for row in _rows(report, "Building the BlockMask"):
            t = _ms(row["time_ms"])
            if t is not None:
                series.setdefault((row["key"], row["mask"]), {})[row["N"]] = t
                if row["key"] == "torch-compiled-h1" and "window" in row["mask"]:
                    _speedup(ax, row["N"], t, row["flexmask_faster"], "#444444")
    names = {
        "flexmask": ("flexmask (from structure)", "#d62728"),
        "torch-compiled-h1": ("torch compiled create_block_mask, H=1", "#444444"),
    }
    lengths = []
    for (key, mask), points in sorted(series.items()):
        if key not in names:
            continue
        label, colour = names[key]
        ns = sorted(points)
        lengths += ns
        ax.plot(
            ns,
            [points[n] for n in ns],
            color=colour,
            marker="o" if "window" in mask else "s",
            linestyle="-" if "window" in mask else "--",
            label=f"{label}: {mask}",
        )
    _length_axis(ax, lengths)
    _log_times(ax, "build time, ms (median; lower is faster)")
    ax.legend(fontsize=7, loc="upper left")
    return _finish(
        fig,
        "Building the BlockMask (batch 1, 16 heads, blocks of 128)\n"
        "torch's time as a multiple of flexmask's, for the window mask",
        _source(*reports),
    )


def _attention_plot(series_of: Callable[[], tuple[dict, list]], title: str):
    """Two panels, fwd and fwd+bwd time against N, one line per variant."""
    series, reports, notes = series_of()
    fig, (axes, legend_ax) = _panels_with_legend()
    for ax, field, name in zip(axes, ("fwd_ms", "train_ms"), ("forward", "forward + backward"), strict=True):
        lengths = []
        for key, (label, colour, marker) in STYLE.items():
            for scores, linestyle in (("-", "-"), ("random", "-"), ("clustered", ":")):
                points = series.get((key, scores, field))
                if not points:
                    continue
                ns = sorted(points)
                lengths += ns
                suffix = ("" if scores == "-" else f", {scores} scores") + notes.get(key, "")
                ax.plot(
                    ns,
                    [points[n][0] for n in ns],
                    color=colour,
                    marker=marker,
                    linestyle=linestyle,
                    label=label + suffix,
                )
                if key != "sdpa" and scores != "clustered":
                    for n in ns:
                        _speedup(ax, n, points[n][0], points[n][1], colour)
        _length_axis(ax, lengths)
        _log_times(ax, "ms (median; lower is faster)")
        ax.set_title(f"{name} (× = times faster than SDPA)", fontsize=10)
    legend_ax.legend(*axes[1].get_legend_handles_labels(), fontsize=7, loc="center", ncols=3, frameon=False)
    return _finish(fig, title, _source(*reports))


def _collect(reports: list[tuple[str, dict]], section_prefix: str, keys=None) -> dict:
    """(variant key, scores, field) → {N: (median ms, times faster than SDPA in the same run)}."""
    series: dict[tuple[str, str, str], dict[int, tuple[float, float | None]]] = {}
    for _, report in reports:
        for row in _rows(report, section_prefix):
            if keys is not None and row["key"] not in keys:
                continue
            for field, ratio in (("fwd_ms", "fwd_x"), ("train_ms", "train_x")):
                t = _ms(row.get(field))
                if t is not None:
                    series.setdefault((row["key"], row["scores"], field), {})[row["N"]] = (t, row.get(ratio))
    return series


def dma_16_heads():
    """DMA vs SDPA at Hq 16 / Hkv 8: the latest run, plus the flex window from the earlier runs."""

    def series_of():
        latest = [("dma-fused-final", load("dma-fused-final"))]
        window = [("dma-32k", load("dma-32k")), ("dma-64k-paper", load("dma-64k-paper"))]
        series = _collect(latest, "Attention, Hq=16")
        series.update(_collect(window, "Attention, Hq=16", keys={"flex-window"}))
        return series, latest + window, {"flex-window": " (01:45, 01:49 runs)"}

    return _attention_plot(series_of, "Dynamic Mask Attention vs SDPA: bf16, Hq 16 / Hkv 8, D 128, w 2048")


def paper_sweep():
    """The DMA paper's heads (Hq 2 / Hkv 1) from N = 256 to 16k, one run."""

    def series_of():
        reports = [("paper-sweep", load("paper-sweep"))]
        return _collect(reports, "Attention, Hq=2"), reports, {}

    return _attention_plot(series_of, "The DMA paper's heads: bf16, Hq 2 / Hkv 1, D 128, w 2048, random scores")


def decoding():
    """One query against K cached keys: SDPA vs DMA with a prebuilt and with a fresh mask."""
    reports = [("paper-sweep", load("paper-sweep"))]
    fig, (ax,) = _figure(1, width=6.4, height=4.4)
    series: dict[str, dict[int, float]] = {}
    for row in _rows(reports[0][1], "Decoding"):
        sdpa = row["variant"].startswith("SDPA")
        for field, label in (("fwd_ms", "attention, mask prebuilt"), ("step_ms", "step: fresh mask + attention")):
            t = _ms(row.get(field))
            if t is not None:
                series.setdefault("SDPA over all keys" if sdpa else f"DMA token top-k 2048, {label}", {})[row["K"]] = t
    lengths = []
    for label, points in sorted(series.items(), reverse=True):
        colour, marker = ("#444444", "o") if label.startswith("SDPA") else ("#1f77b4", "^" if "step" in label else "v")
        ks = sorted(points)
        lengths += ks
        ax.plot(
            ks,
            [points[k] for k in ks],
            color=colour,
            marker=marker,
            label=label,
            linestyle=":" if "step" in label else "-",
        )
    _length_axis(ax, lengths, label="cached keys K")
    _log_times(ax, "time per decoding step, ms (median; lower is faster)")
    ax.legend(fontsize=7, loc="center right")
    return _finish(fig, "Decoding one query: bf16, Hq 2 / Hkv 1, D 128, w 2048", _source(*reports))


DECODE_STYLE = {
    "sdpa": ("SDPA over all keys", "#444444", "o"),
    "flex-causal": ("flexmask causal (flex)", "#9467bd", "v"),
    "token": ("DMA token top-2048 (gather)", "#1f77b4", "^"),
    "token-step": ("DMA token, kept keys carried", "#17becf", "v"),
    "block": ("DMA block top-16×128 (gather)", "#d62728", "D"),
}


def decode_layer():
    """One layer's decoding step against L cached keys, CUDA-graphed, batch 1 and 8."""
    reports = [("decode-layer", load("decode-layer"))]
    fig, axes = _figure(2, width=5.2, height=4.4)
    rows = _rows(reports[0][1], "Decoding step")
    for ax, batch in zip(axes, sorted({r["B"] for r in rows}), strict=False):
        lengths = []
        for key, (label, colour, marker) in DECODE_STYLE.items():
            points = {
                r["L"]: (_ms(r.get("graphed_ms")), r.get("graphed_x"))
                for r in rows
                if r["key"] == key and r["B"] == batch and _ms(r.get("graphed_ms")) is not None
            }
            if not points:
                continue
            ls = sorted(points)
            lengths += ls
            ax.plot(ls, [points[n][0] for n in ls], color=colour, marker=marker, label=label)
            if key != "sdpa":
                for n in ls:
                    _speedup(ax, n, points[n][0], points[n][1], colour)
        _length_axis(ax, lengths, label="cached keys L")
        _log_times(ax, "ms per decoding step (CUDA graph; lower is faster)")
        ax.set_title(f"batch {batch}", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    return _finish(
        fig, "One layer's decoding step: bf16, Hq 16 / Hkv 8, D 128, w 2048 (× = speed vs SDPA)", _source(*reports)
    )


MODEL_STYLE = {
    "sdpa-eager": ("SDPA eager", "#444444", "o"),
    "sdpa-compiled": ("SDPA compiled", "#999999", "o"),
    "flexmask": ("flexmask causal compiled", "#9467bd", "v"),
    "dma-token": ("DMA token compiled", "#1f77b4", "^"),
    "dma-block": ("DMA block compiled", "#d62728", "D"),
}


def model_step():
    """A training step of the 8-layer model against N, per variant."""
    reports = [("model-8k-64k", load("model-8k-64k"))]
    fig, (ax,) = _figure(1, width=7.6, height=4.6)  # wide enough for the title and the source line
    series: dict[str, dict[int, float]] = {}
    for _, report in reports:
        for row in _rows(report, "Training step"):
            t = _ms(row.get("step_ms"))
            if t is not None:
                series.setdefault(row["key"], {})[row["N"]] = (t, row.get("speedup"))
    lengths = []
    for key, (label, colour, marker) in MODEL_STYLE.items():
        points = series.get(key)
        if not points:
            continue
        ns = sorted(points)
        lengths += ns
        ax.plot(ns, [points[n][0] for n in ns], color=colour, marker=marker, label=label)
        if key not in ("sdpa-eager",):
            dy = {"dma-token": -10, "flexmask": 8}.get(key, 2)  # token's line runs just under block's,
            for n in ns:  # flexmask causal's just over it at 8k
                _speedup(ax, n, points[n][0], points[n][1], colour, dy=dy)
    _length_axis(ax, lengths)
    _log_times(ax, "ms per training step (lower is faster)")
    ax.legend(fontsize=7, loc="upper left")
    return _finish(
        fig, "8-layer Llama-style model, one training step: bf16, batch 1 (× = speed vs SDPA eager)", _source(*reports)
    )


def context_parallel_layer():
    """One attention layer's fwd+bwd on 2 GPUs (context parallel) against 1, from ``bench cp``."""
    reports = [("cp-layer", load("cp-layer")), ("cp-layer-dma-fused", load("cp-layer-dma-fused"))]
    fig, (ax,) = _figure(1, width=6.4, height=4.0)
    bars = []  # (label, speedup, colour)
    for name, report in reports:
        rows = _rows(report, "One attention layer")
        for row in rows:
            same = [r for r in rows if r["N"] == row["N"] and r["variant"] == row["variant"]]
            one = next((r for r in same if r["gpus"] == 1), None)
            two, base = _ms(row.get("ms")), _ms(one.get("ms")) if one else None
            if row["gpus"] != 2 or two is None or base is None:
                continue
            dma = row["variant"].startswith("DMA")
            label = f"{row['variant'].replace(' top-w/128', '')}\nN {row['N'] // 1024}k"
            if dma:
                label += "\n" + ("fused bwd at an offset" if name.endswith("fused") else "flex bwd (before)")
            bars.append((label, base / two, STYLE["block" if dma else "flex-causal"][1]))
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], color=[b[2] for b in bars], width=0.6)
    for x, (_, y, _) in zip(xs, bars, strict=True):
        ax.annotate(f"{y:.2f}×", (x, y), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.axhline(2.0, color="#444444", linestyle="--", linewidth=1)
    ax.annotate(
        "ideal (2 GPUs)", (len(bars) - 0.5, 2.0), textcoords="offset points", xytext=(0, 3), ha="right", fontsize=7
    )
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=7)
    ax.set_ylim(0, 2.4)
    ax.set_ylabel("throughput on 2 GPUs / on 1 GPU", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _finish(fig, "One layer fwd+bwd, 2 GPUs vs 1 (bf16, Hq 16 / Hkv 8, D 128, balanced)", _source(*reports))


def figures() -> dict[str, Callable]:
    """Slug → a function drawing that plot of the benchmarks page."""
    return {
        "blockmask-build": blockmask_build,
        "dma-16-heads": dma_16_heads,
        "paper-sweep": paper_sweep,
        "decoding": decoding,
        "decode-layer": decode_layer,
        "model-step": model_step,
        "cp-layer": context_parallel_layer,
    }


def render(slug: str) -> bytes:
    """The PNG bytes of one plot."""
    buf = io.BytesIO()
    figures()[slug]().savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def on_files(files, config):
    """Add the plots to the build; keep this hook (and its bytecode) out of the site."""
    from mkdocs.structure.files import File

    for f in list(files):
        if f.src_uri == "bench_hook.py" or f.src_uri.startswith("__pycache__/"):
            files.remove(f)
    for slug in figures():
        files.append(File.generated(config, f"{IMAGE_DIR}/{slug}.png", content=render(slug)))
    return files


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    for slug in figures():
        path = out_dir / f"{slug}.png"
        path.write_bytes(render(slug))
        print(f"wrote {path}")
