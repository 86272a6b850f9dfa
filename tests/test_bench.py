"""Smoke tests of ``python -m flexmask bench`` on CPU at tiny sizes.

They check the plumbing (every row and column is there, numbers parse, failures become cells and
the run goes on, ``--out`` writes markdown and JSON), not speed: CPU numbers mean nothing.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import flexmask as fm
from flexmask import bench

TINY = ["--device", "cpu", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--warmup-ms", "0",
        "--rep-ms", "0", "--cell-timeout", "0"]

NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?(e[+-]?\d+)?(x|%)?$")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny sizes: one intra-op thread is as fast and does not suffer from a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """``{section title: [row as {column title: cell}]}`` from the printed markdown."""
    tables: dict[str, list[dict[str, str]]] = {}
    title, header = None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, header = line[3:].strip(), None
            continue
        if not line.startswith("|") or title is None:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            tables[title] = []
        elif set(line.replace("|", "")) != {"-"}:
            assert len(cells) == len(header), line
            tables[title].append(dict(zip(header, cells, strict=True)))
    return tables


def number(cell: str) -> float:
    assert NUMBER.match(cell), f"not a number: {cell!r}"
    return float(cell.rstrip("x%"))


def section(tables, prefix: str) -> list[dict[str, str]]:
    names = [t for t in tables if t.startswith(prefix)]
    assert len(names) == 1, (prefix, list(tables))
    return tables[names[0]]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    code = bench.main(argv)
    return code, capsys.readouterr().out


def test_parse_lengths_and_priority():
    assert bench.parse_lengths("4k,16384, 64K") == [4096, 16384, 65536]
    assert bench.priority_order([4096, 65536, 16384, 131072], (65536,)) == [65536, 4096, 16384, 131072]
    assert bench.priority_order([4096, 8192], (32768, 65536)) == [4096, 8192]


def test_markdown_formatting():
    cols = [bench.Column("a", "A", "ms"), bench.Column("b", "B", "x"), bench.Column("c", "C", "signed_pct")]
    text = bench.markdown_table(cols, [{"a": 0.01234, "b": 3.0, "c": bench.Note("error: x | y")}])
    assert text.splitlines()[2] == "| 0.0123 | 3.00x | error: x / y |"


def test_bench_masks_cpu(capsys, tmp_path):
    out = tmp_path / "masks"
    code, text = run(capsys, ["masks", *TINY, "--lengths", "256", "--window", "64", "--attn-length", "256",
                              "--out", str(out)])
    assert code == 0
    assert "date:" in text and "device: CPU" in text and "command: `python -m flexmask bench masks" in text
    tables = parse_tables(text)
    build = section(tables, "Building the BlockMask")
    assert list(build[0]) == ["mask", "N", "builder", "BlockMask B×H", "time ms", "first call s", "graphs compiled",
                              "peak MiB", "flexmask faster by"]
    assert len(build) == 2 * len(bench.BUILDERS)
    assert {r["mask"] for r in build} == {"causal & sliding_window(64)", "causal & document(ids)"}
    for r in build:
        assert r["N"] == "256"
        if r["builder"].startswith("flexmask"):
            assert r["BlockMask B×H"] == "1×1"  # head-independent masks broadcast
            number(r["time ms"])
            number(r["first call s"])
        elif "eager" in r["builder"]:
            assert r["BlockMask B×H"] == "1×2"
            number(r["time ms"])
            assert number(r["flexmask faster by"]) > 0
        else:  # compiled create_block_mask is a CUDA benchmark
            assert r["time ms"].startswith("skipped (CPU")
    overhead = section(tables, "fm.attention vs hand-written")
    assert [(r["mask"], r["pass"]) for r in overhead] == [
        ("causal & sliding_window(64)", "fwd"), ("causal & sliding_window(64)", "fwd+bwd"),
        ("causal & document(ids)", "fwd"), ("causal & document(ids)", "fwd+bwd"),
    ]
    for r in overhead:
        number(r["fm.attention ms"])
        if r["pass"] == "fwd":
            number(r["hand-written flex ms"])
        else:
            assert r["hand-written flex ms"].startswith("skipped (CPU")
    assert "error:" not in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["meta"]["device"].startswith("CPU")
    rows = next(v for k, v in saved["sections"].items() if k.startswith("Building"))
    assert rows[0]["time_ms"]["median_ms"] > 0 and rows[0]["time_ms"]["n"] >= 1
    assert out.with_suffix(".md").read_text().startswith("# flexmask bench masks")


DMA_ARGS = ["dma", *TINY, "--lengths", "256", "--window", "128", "--paper-length", "256"]


def check_dma(text: str, variants: list[str], dma_ok: bool = True) -> dict[str, list[dict[str, str]]]:
    tables = parse_tables(text)
    for prefix in ("Attention, Hq=2, Hkv=1", "Paper configuration, Hq=2, Hkv=1, N=256"):
        rows = section(tables, prefix)
        expected = []
        for v in variants:
            scores = ["clustered", "random"] if v in bench.DMA_VARIANTS else ["-"]
            expected += [(v, s) for s in scores]
        key = {"SDPA causal": "sdpa", "flex causal": "flex-causal", "flex sliding window 128": "flex-window",
               "DMA token top-k 128": "token", "DMA block top-k 1×128": "block"}
        got = [(key[r["variant"]], r["scores"]) for r in rows]
        assert sorted(got) == sorted(expected), got
        assert list(rows[0])[:5] == ["N", "variant", "scores", "fwd ms", "fwd+bwd ms"]
        for r in rows:
            variant = key[r["variant"]]
            assert r["N"] == "256"
            if variant in bench.DMA_VARIANTS and not dma_ok:
                continue
            number(r["fwd ms"])
            number(r["fwd vs SDPA"])
            if variant.startswith("flex"):
                assert r["fwd+bwd ms"].startswith("skipped (CPU")
            else:
                number(r["fwd+bwd ms"])
                number(r["fwd+bwd vs SDPA"])
            if variant in bench.DMA_VARIANTS:
                for col in ("mask build ms", "build / fwd+bwd", "step ms", "step vs SDPA"):
                    number(r[col])
    return tables


def stand_in_topk(monkeypatch):
    """Structural stand-ins with the fm.topk / fm.topk_blocks signatures (plumbing only)."""
    def topk(scores, k, *, among=None):
        return fm.causal() & fm.sliding_window(k)

    def topk_blocks(scores, k, *, block_size=128, among=None):
        return fm.causal() & fm.sliding_window(k * block_size)

    monkeypatch.setattr(fm, "topk", topk, raising=False)
    monkeypatch.setattr(fm, "topk_blocks", topk_blocks, raising=False)


def test_bench_dma_cpu_plumbing(capsys, monkeypatch):
    """The DMA rows with structural stand-ins: the bench's own plumbing, whatever the state of dma.py."""
    stand_in_topk(monkeypatch)
    variants = ["sdpa", "token", "block"]
    code, text = run(capsys, [*DMA_ARGS, "--variants", ",".join(variants)])
    assert code == 0 and "error:" not in text
    check_dma(text, variants)


def test_bench_dma_cpu_real_topk(capsys):
    if not (hasattr(fm, "topk") and hasattr(fm, "topk_blocks")):
        pytest.skip("flexmask has no fm.topk / fm.topk_blocks yet")
    variants = list(bench.VARIANTS)
    code, text = run(capsys, [*DMA_ARGS, "--variants", ",".join(variants)])
    assert code == 0 and "error:" not in text
    check_dma(text, variants)


def test_bench_dma_errors_become_cells(capsys, monkeypatch):
    stand_in_topk(monkeypatch)

    def broken(scores, k, *, among=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(fm, "topk", broken)
    code, text = run(capsys, [*DMA_ARGS, "--variants", "sdpa,token,block", "--paper-length", "0",
                              "--scores", "random"])
    assert code == 0
    rows = section(parse_tables(text), "Attention")
    token = [r for r in rows if r["variant"].startswith("DMA token")]
    assert token and all(r["fwd ms"] == "error: RuntimeError: boom" for r in token)
    blocks = [r for r in rows if r["variant"].startswith("DMA block")]
    assert blocks and all(NUMBER.match(r["fwd ms"]) for r in blocks)  # the run went on


def test_bench_dma_without_topk(capsys, monkeypatch):
    monkeypatch.delattr(fm, "topk", raising=False)
    code, text = run(capsys, [*DMA_ARGS, "--variants", "sdpa,token", "--paper-length", "0", "--scores", "random"])
    assert code == 0
    rows = section(parse_tables(text), "Attention")
    token = next(r for r in rows if r["variant"].startswith("DMA token"))
    assert token["fwd ms"].startswith("skipped (unavailable: this flexmask has no fm.topk")


def test_bench_budget_skips(capsys):
    code, text = run(capsys, [*DMA_ARGS, "--variants", "sdpa", "--budget", "1e-9"])
    assert code == 0
    rows = section(parse_tables(text), "Attention")
    assert rows[0]["fwd ms"] == "skipped (time budget)"


def test_bench_help_and_bad_args(capsys):
    assert bench.main(["--help"]) == 0
    assert "masks" in capsys.readouterr().out
    assert bench.main(["dma", "--variants", "nope"]) == 2
    assert bench.main(["dma", "--device", "cpu", "--heads", "3", "--kv-heads", "2"]) == 2
    assert "multiple of --kv-heads" in capsys.readouterr().err


def test_scores_kinds():
    g = torch.Generator().manual_seed(0)
    for kind in bench.SCORES:
        s = bench.make_scores(kind, 2, 512, g, torch.device("cpu"))
        assert s.shape == (1, 2, 512) and s.requires_grad and s.dtype == torch.float32
        assert torch.isfinite(s).all()
    walk = bench.make_scores("clustered", 1, 4096, g, torch.device("cpu"))[0, 0].detach()
    noise = bench.make_scores("random", 1, 4096, g, torch.device("cpu"))[0, 0]
    # neighbours are alike in a random walk, unrelated in noise
    assert (walk[1:] - walk[:-1]).abs().mean() < 0.2 < (noise[1:] - noise[:-1]).abs().mean()


def test_bench_dma_decode_section(capsys):
    argv = ["dma", *TINY, "--lengths", "256", "--window", "64", "--paper-length", "0", "--variants", "sdpa",
            "--decode-lengths", "200,300"]
    assert bench.main(argv) == 0
    rows = section(parse_tables(capsys.readouterr().out), "Decoding, Q=1, Hq=2, Hkv=1")
    assert [(r["K"], r["variant"]) for r in rows] == [
        (k, v) for k in ("200", "300") for v in ("SDPA (all keys)", "DMA token top-k 64")
    ]
    for r in rows:
        number(r["attention ms"])
        number(r["vs SDPA"])
    number(rows[1]["step ms (fresh mask)"])
