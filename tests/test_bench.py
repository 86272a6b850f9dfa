"""Smoke tests of ``python -m flexmask bench`` on CPU at tiny sizes.

They check the plumbing (every row and column is there, numbers parse, failures become cells and
the run goes on, ``--out`` writes markdown and JSON, sizes that do not fit a CPU are refused), not
speed: CPU numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

import flexmask as fm
from flexmask.tools import cli
from flexmask.tools.bench import BENCHMARKS, dma, harness, masks, model, options
from flexmask.tools.bench.handwritten import make_scores
from flexmask.tools.bench.report import Column, markdown_table

TINY = [
    "--device",
    "cpu",
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--head-dim",
    "16",
    "--warmup-ms",
    "0",
    "--rep-ms",
    "0",
    "--cell-timeout",
    "0",
]

NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?(e[+-]?\d+)?(x|%)?$")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny sizes: one intra-op thread is as fast and does not suffer from a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with 8 GiB free, whatever this one has: the CPU guard's verdicts do not depend on it."""
    monkeypatch.setattr(harness, "available_memory", lambda: 8 << 30)


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
    code = cli.main(["bench", *argv])
    return code, capsys.readouterr().out


def test_registry():
    assert list(BENCHMARKS) == ["masks", "dma", "decode", "model", "generate", "cp"]
    for name, bench in BENCHMARKS.items():
        assert bench.name == name and bench.help and "CUDA" in bench.description and "--tiny" in bench.description


def test_parse_lengths_and_priority():
    assert options.parse_lengths("4k,16384, 64K") == [4096, 16384, 65536]
    assert [options.parse_length_or_off(t) for t in ("32k", "300", "0")] == [32768, 300, 0]
    for bad in ("4k,8k", "-1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            options.parse_length_or_off(bad)
    assert options.priority_order([4096, 65536, 16384, 131072], (65536,)) == [65536, 4096, 16384, 131072]
    assert options.priority_order([4096, 8192], (32768, 65536)) == [4096, 8192]


def test_markdown_formatting():
    cols = [Column("a", "A", "ms"), Column("b", "B", "x"), Column("c", "C", "signed_pct")]
    text = markdown_table(cols, [{"a": 0.01234, "b": 3.0, "c": harness.Note("error: x | y")}])
    assert text.splitlines()[2] == "| 0.0123 | 3.00x | error: x / y |"


def test_bench_masks_cpu(capsys, tmp_path):
    out = tmp_path / "masks"
    code, text = run(
        capsys, ["masks", *TINY, "--lengths", "256", "--window", "64", "--attn-length", "256", "--out", str(out)]
    )
    assert code == 0
    assert "date:" in text and "device: CPU" in text and "command: `python -m flexmask bench masks" in text
    tables = parse_tables(text)
    build = section(tables, "Building the BlockMask")
    assert list(build[0]) == [
        "mask",
        "N",
        "builder",
        "BlockMask B×H",
        "time ms",
        "first call s",
        "graphs compiled",
        "peak MiB",
        "flexmask faster by",
    ]
    assert len(build) == 2 * len(masks.BUILDERS)
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
        ("causal & sliding_window(64)", "fwd"),
        ("causal & sliding_window(64)", "fwd+bwd"),
        ("causal & document(ids)", "fwd"),
        ("causal & document(ids)", "fwd+bwd"),
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


def test_bench_masks_tiny_preset(capsys):
    """--tiny sets every size; an option given on the command line still wins."""
    code, text = run(
        capsys,
        [
            "masks",
            "--tiny",
            "--device",
            "cpu",
            "--window",
            "32",
            "--warmup-ms",
            "0",
            "--rep-ms",
            "0",
            "--builders",
            "flexmask",
            "--masks",
            "window",
        ],
    )
    assert code == 0
    build = section(parse_tables(text), "Building the BlockMask (H=2)")
    assert [(r["mask"], r["N"]) for r in build] == [("causal & sliding_window(32)", "256")]
    assert "fm.attention vs hand-written FlexAttention (N=256, Hq=2, Hkv=1, D=16)" in text


@pytest.mark.parametrize(
    "argv, what",
    [
        (["masks"], "eager flex_attention at --attn-length 16384"),
        (["masks", "--lengths", "256"], "--attn-length 16384"),  # the sizes not given are GPU sizes
        (["masks", "--lengths", "16384", "--attn-length", "0"], "eager create_block_mask at N=16384"),
        (["dma"], "eager flex_attention (the flex baselines) at N=65536"),
        (["dma", "--quick"], "at N=65536"),
        (["model"], "one training step at N=65536"),
        (["model", "--lengths", "256"], "one training step at N=256"),  # a 0.5 B-parameter model
    ],
)
def test_cpu_refuses_sizes_that_do_not_fit(capsys, small_machine, argv, what):
    code = cli.main(["bench", argv[0], "--device", "cpu", *argv[1:]])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"flexmask bench {argv[0]}: error: ")
    assert what in err and "--tiny" in err


def test_cpu_runs_sizes_that_fit(capsys, small_machine):
    """No flex baseline, no eager builder: nothing dense, so larger N is allowed (and refused nowhere)."""
    argv = ["masks", *TINY, "--lengths", "2048", "--builders", "flexmask", "--attn-length", "0", "--masks", "window"]
    code, text = run(capsys, argv)
    assert code == 0
    assert [r["N"] for r in section(parse_tables(text), "Building")] == ["2048"]


DMA_ARGS = ["dma", *TINY, "--lengths", "256", "--window", "128", "--paper-length", "256"]


def check_dma(text: str, variants: list[str], dma_ok: bool = True) -> dict[str, list[dict[str, str]]]:
    tables = parse_tables(text)
    for prefix in ("Attention, Hq=2, Hkv=1", "Paper configuration, Hq=2, Hkv=1, N=256"):
        rows = section(tables, prefix)
        expected = []
        for v in variants:
            scores = ["clustered", "random"] if v in dma.DMA_VARIANTS else ["-"]
            expected += [(v, s) for s in scores]
        key = {
            "SDPA causal": "sdpa",
            "flex causal": "flex-causal",
            "flex sliding window 128": "flex-window",
            "DMA token top-k 128": "token",
            "DMA token top-k 128, flex over the key layout": "token-flex",
            "DMA block top-k 1×128": "block",
        }
        got = [(key[r["variant"]], r["scores"]) for r in rows]
        assert sorted(got) == sorted(expected), got
        assert list(rows[0])[:5] == ["N", "variant", "scores", "fwd ms", "fwd+bwd ms"]
        for r in rows:
            variant = key[r["variant"]]
            assert r["N"] == "256"
            if variant in dma.DMA_VARIANTS and not dma_ok:
                continue
            number(r["fwd ms"])
            number(r["fwd vs SDPA"])
            if variant.startswith("flex"):
                assert r["fwd+bwd ms"].startswith("skipped (CPU")
            else:
                number(r["fwd+bwd ms"])
                number(r["fwd+bwd vs SDPA"])
            if variant in dma.DMA_VARIANTS:
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
    """The DMA rows with structural stand-ins: the bench's own plumbing, whatever the state of the core."""
    stand_in_topk(monkeypatch)
    variants = ["sdpa", "token", "block"]
    code, text = run(capsys, [*DMA_ARGS, "--variants", ",".join(variants)])
    assert code == 0 and "error:" not in text
    check_dma(text, variants)


def test_bench_dma_cpu_real_topk(capsys):
    variants = list(dma.VARIANTS)
    code, text = run(capsys, [*DMA_ARGS, "--variants", ",".join(variants)])
    assert code == 0 and "error:" not in text
    check_dma(text, variants)


def test_bench_dma_errors_become_cells(capsys, monkeypatch):
    stand_in_topk(monkeypatch)

    def broken(scores, k, *, among=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(fm, "topk", broken)
    code, text = run(capsys, [*DMA_ARGS, "--variants", "sdpa,token,block", "--paper-length", "0", "--scores", "random"])
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
    assert cli.main(["bench", "--help"]) == 0
    assert "masks" in capsys.readouterr().out
    assert cli.main(["bench", "dma", "--variants", "nope"]) == 2
    assert "choose from" in capsys.readouterr().err
    assert cli.main(["bench", "dma", "--device", "cpu", "--heads", "3", "--kv-heads", "2"]) == 2
    err = capsys.readouterr().err
    assert "multiple of --kv-heads" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["bench", "dma", "--len", "256"]) == 2  # no abbreviations: --quick/--tiny see what was given
    assert cli.main(["bench", "nope"]) == 2


def test_scores_kinds():
    g = torch.Generator().manual_seed(0)
    for kind in dma.SCORES:
        s = make_scores(kind, 2, 512, g, torch.device("cpu"))
        assert s.shape == (1, 2, 512) and s.requires_grad and s.dtype == torch.float32
        assert torch.isfinite(s).all()
    walk = make_scores("clustered", 1, 4096, g, torch.device("cpu"))[0, 0].detach()
    noise = make_scores("random", 1, 4096, g, torch.device("cpu"))[0, 0]
    # neighbours are alike in a random walk, unrelated in noise
    assert (walk[1:] - walk[:-1]).abs().mean() < 0.2 < (noise[1:] - noise[:-1]).abs().mean()


def test_bench_dma_decode_section(capsys):
    argv = [
        "dma",
        *TINY,
        "--lengths",
        "256",
        "--window",
        "64",
        "--paper-length",
        "0",
        "--variants",
        "sdpa",
        "--decode-lengths",
        "200,300",
    ]
    code, text = run(capsys, argv)
    assert code == 0
    rows = section(parse_tables(text), "Decoding, Q=1, Hq=2, Hkv=1")
    assert [(r["K"], r["variant"]) for r in rows] == [
        (k, v) for k in ("200", "300") for v in ("SDPA (all keys)", "DMA token top-k 64")
    ]
    for r in rows:
        number(r["attention ms"])
        number(r["vs SDPA"])
    number(rows[1]["step ms (fresh mask)"])


# ---------------------------------------------------------------------------------------------
# bench model

MODEL_TINY = ["model", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--cell-timeout", "0"]


def test_bench_model_tiny_end_to_end(capsys, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "model"
    code, text = run(capsys, [*MODEL_TINY, "--out", str(out)])
    assert code == 0 and "error:" not in text
    assert "transformers" in text and "2 layers, hidden 64" in text and "device: CPU" in text
    rows = section(parse_tables(text), "Training step, 2 layers, hidden 64")
    assert list(rows[0]) == ["N", "variant", "step ms", "tokens/s", "vs SDPA eager", "peak GiB", "first step s", "loss"]
    assert [(r["N"], r["variant"]) for r in rows] == [
        (n, v)
        for n in ("64", "128")
        for v in (
            "SDPA eager",
            "SDPA (not compiled: --compile off)",
            "flexmask causal (not compiled: --compile off)",
            "DMA token top-32 (not compiled: --compile off)",
            "DMA block top-2×16 (not compiled: --compile off)",
        )
    ]
    for n in ("64", "128"):
        at_n = [r for r in rows if r["N"] == n]
        for r in at_n:
            assert number(r["step ms"]) > 0 and number(r["tokens/s"]) > 0 and number(r["first step s"]) > 0
            number(r["vs SDPA eager"])
        losses = [float(r["loss"]) for r in at_n]
        # one model and one batch per N: SDPA twice and flexmask causal compute the same loss
        assert losses[0] == pytest.approx(losses[1], abs=1e-4) and losses[0] == pytest.approx(losses[2], abs=1e-4)
        assert all(abs(x - losses[0]) < 1.0 for x in losses)  # DMA's random gates move it, a little
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["title"] == "flexmask bench model" and "transformers" in saved["meta"]["software"]
    first = next(iter(saved["sections"].values()))[0]
    assert first["step_ms"]["n"] == 1 and first["key"] == "sdpa-eager"


def test_bench_model_out_of_memory_is_a_cell(capsys, monkeypatch):
    pytest.importorskip("transformers")
    measure = model._measure

    def flaky(env, args, config, n, variant, compiled):
        if variant == "flexmask" and n == 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return measure(env, args, config, n, variant, compiled)

    monkeypatch.setattr(model, "_measure", flaky)
    code, text = run(capsys, [*MODEL_TINY, "--variants", "sdpa-eager,flexmask"])
    assert code == 0
    rows = section(parse_tables(text), "Training step")
    assert [(r["N"], r["step ms"] == "OOM") for r in rows] == [
        ("64", False),
        ("64", False),
        ("128", False),
        ("128", True),
    ]


def test_bench_model_bad_options(capsys):
    assert cli.main(["bench", *MODEL_TINY, "--keep-window", "8", "--block-size", "16"]) == 2
    assert "smaller than --block-size" in capsys.readouterr().err
    assert cli.main(["bench", *MODEL_TINY, "--heads", "3"]) == 2
    assert "multiple of --kv-heads" in capsys.readouterr().err
    assert cli.main(["bench", *MODEL_TINY, "--layers", "0"]) == 2
    assert "positive int" in capsys.readouterr().err


def test_decode_benchmark_runs_tiny_on_cpu(capsys):
    status, out = run(capsys, ["decode", "--tiny", "--rep-ms", "0", "--variants", "sdpa,token,block"])
    assert status == 0
    rows = section(parse_tables(out), "Decoding step")
    assert {r["variant"] for r in rows} == {"SDPA (all keys)", "DMA token top-w", "DMA block top-w/128"}
    assert all(number(r["eager ms"]) > 0 for r in rows)


def test_generate_benchmark_runs_tiny_on_cpu(capsys):
    # 512 tokens of a 256-token vocabulary: the prompt would hold the pad token unless the bench avoids it
    status, out = run(capsys, ["generate", "--tiny", "--lengths", "512", "--variants", "sdpa,flexmask,dma-token"])
    assert status == 0
    rows = section(parse_tables(out), "generate()")
    assert [r["variant"] for r in rows] == ["SDPA", "flexmask causal", "DMA token"]
    assert rows[1]["tokens = SDPA's"] == "yes"  # flexmask causal decodes SDPA's tokens
    for r in rows:  # a rate, or the bench's note where timing noise outweighs 5 tiny decoding steps (a busy CPU)
        cell = r["decode tokens/s"]
        assert cell == "n/a (generate(6) took no longer than the prefill)" or number(cell) > 0


def test_context_parallel_benchmark_runs_tiny_on_cpu(capsys):
    """Two gloo processes against one; a GPU count the machine lacks is a skipped cell."""
    argv = ["cp", "--tiny", "--lengths", "256", "--variants", "causal,dma-block", "--gpus", "1,2,4096"]
    status, out = run(capsys, argv)
    assert status == 0
    rows = section(parse_tables(out), "One attention layer")
    assert [(r["attention"], r["GPUs"]) for r in rows] == [
        (v, g) for v in ("flexmask causal", "DMA block top-w/128") for g in ("1", "2", "4096")
    ]
    for r in rows:
        if r["GPUs"] == "4096":
            assert r["step ms"].startswith("skipped"), r
        else:
            assert number(r["step ms"]) > 0 and number(r["tokens/s per GPU"]) > 0, r
    assert [r["throughput vs 1 GPU"] for r in rows if r["GPUs"] == "1"] == ["1.00x", "1.00x"]
