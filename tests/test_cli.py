"""The command line (``flexmask``, ``python -m flexmask``): help everywhere without side effects,
one-line user errors with exit status 2, ``plot`` without ``eval``, and a quiet broken pipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexmask.tools import cli

ROOT = Path(__file__).resolve().parents[1]

HELP = [
    [],
    ["demo"],
    ["plot"],
    ["bench"],
    ["bench", "masks"],
    ["bench", "dma"],
    ["bench", "model"],
]


@pytest.fixture
def empty_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    monkeypatch.chdir(ROOT)


def one_line_error(captured, prefix: str) -> str:
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(prefix), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("args", HELP, ids=lambda a: " ".join(a) or "top")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_everywhere_runs_nothing(args, flag, capsys, empty_dir):
    assert cli.main([*args, flag]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: flexmask {' '.join(args)}".rstrip() + " ")
    assert captured.err == ""
    assert list(empty_dir.iterdir()) == []  # `demo --help` used to run the demo and write its pictures


def test_help_says_what_runs_without_cuda(capsys):
    for bench in ("masks", "dma", "model"):
        cli.main(["bench", bench, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "Without CUDA" in text and "--tiny" in text and "exit status 2" in text
    cli.main(["plot", "--help"])
    assert "--max-cells" in capsys.readouterr().out


def test_no_command(capsys):
    assert cli.main([]) == 2
    one_line_error(capsys.readouterr(), "flexmask: error: give a command")


@pytest.mark.parametrize(
    "argv, prefix, words",
    [
        (["nope"], "flexmask: error:", ["invalid choice"]),
        (["demo", "--nope"], "flexmask demo: error:", ["unrecognized arguments"]),
        (["plot"], "flexmask plot: error:", ["expr"]),
        (["plot", "causal()"], "flexmask plot: error:", ["--q-len"]),
        (["plot", "causal()", "--q-len", "x"], "flexmask plot: error:", ["--q-len"]),
        (["plot", "causal()", "--q-len", "0"], "flexmask plot: error:", ["positive"]),
        (["plot", "causal()", "--q-len", "8", "--out", "m.txt"], "flexmask plot: error:", [".png, .svg or .pdf"]),
        (["plot", "open('x', 'w')", "--q-len", "8"], "flexmask plot: error:", ["refused this call: `open`"]),
        (["plot", "torch.os.system('touch x')", "--q-len", "8"], "flexmask plot: error:", ["refused"]),
        (["plot", "alibi(4)", "--q-len", "8"], "flexmask plot: error:", ["gives a bias"]),
        (["plot", "sliding_window(-1)", "--q-len", "8"], "flexmask plot: error:", ["ValueError"]),
        (["plot", "causal()", "--q-len", "4096", "--level", "token"], "flexmask plot: error:", ["ValueError"]),
        (["bench"], "flexmask bench: error:", ["BENCHMARK"]),
        (["bench", "masks", "--heads", "-1", "--device", "cpu"], "flexmask bench masks: error:", ["--heads"]),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, prefix, words, capsys, empty_dir):
    assert cli.main(argv) == 2
    err = one_line_error(capsys.readouterr(), prefix)
    for w in words:
        assert w in err
    assert list(empty_dir.iterdir()) == []


def test_plot_writes_the_picture(capsys, empty_dir):
    pytest.importorskip("matplotlib")
    argv = [
        "plot",
        "causal() & document(torch.tensor([[0] * 20 + [1] * 44]))",
        "--q-len",
        "64",
        "--heads",
        "2",
        "--title",
        "documents",
        "--out",
        "sub/documents.svg",
    ]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == "wrote sub/documents.svg"
    text = (empty_dir / "sub" / "documents.svg").read_text()
    assert text.lstrip().startswith("<?xml") and "documents" in text


def test_plot_bool_tensor_and_pdf(capsys, empty_dir):
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", "torch.ones(2, 16, 16, dtype=torch.bool)", "--out", "t.pdf"]) == 0
    assert (empty_dir / "t.pdf").read_bytes().startswith(b"%PDF")


def test_plot_max_cells_draws_4096_token_by_token(capsys, empty_dir):
    """4096² cells exceed the default picture size; --max-cells raises it (and --dpi keeps the PNG small)."""
    pytest.importorskip("matplotlib")
    argv = [
        "plot",
        "causal() & sliding_window(1024)",
        "--q-len",
        "4096",
        "--level",
        "token",
        "--max-cells",
        str(4096 * 4096),
        "--dpi",
        "20",
        "--out",
        "big.png",
    ]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (empty_dir / "big.png").read_bytes().startswith(b"\x89PNG")


def test_plot_block_size_reaches_fm_plot(capsys, empty_dir, monkeypatch):
    import flexmask as fm

    seen = {}

    def fake_plot(mask, q_len, kv_len, **options):
        seen.update(options, q_len=q_len, kv_len=kv_len)
        raise ValueError("stop here")

    monkeypatch.setattr(fm, "plot", fake_plot, raising=False)
    argv = [
        "plot",
        "causal()",
        "--q-len",
        "512",
        "--kv-len",
        "1024",
        "--block-size",
        "64",
        "--max-cells",
        "99",
        "--heads",
        "3",
        "--batch-index",
        "1",
        "--level",
        "block",
        "--title",
        "t",
    ]
    assert cli.main(argv) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen["q_len"] == 512 and seen["kv_len"] == 1024 and seen["max_cells"] == 99
    assert seen["heads"] == 3 and seen["batch_index"] == 1 and seen["level"] == "block" and seen["title"] == "t"
    assert 64 in (seen.get("cell_size"), seen.get("block_size"))


def test_demo_prints_and_writes_nothing(capsys, empty_dir):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.count("matches dense truth: True") == 6 and "block sparsity" in out
    assert list(empty_dir.iterdir()) == []


def test_demo_out_writes_pictures(capsys, empty_dir):
    pytest.importorskip("matplotlib")
    assert cli.main(["demo", "--out", "pics"]) == 0
    written = sorted(p.name for p in (empty_dir / "pics").iterdir())
    assert len(written) == 6 and "causal.png" in written and "causal_document_ids.png" in written
    assert capsys.readouterr().out.count("wrote pics/") == 6


def run_module(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "flexmask", *args], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )


def test_python_m_flexmask(tmp_path):
    done = run_module("bench", "masks", "--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: flexmask bench masks") and done.stderr == ""
    done = run_module("plot", "__import__('os').system('touch pwned')", "--q-len", "8", cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_broken_pipe_is_quiet(tmp_path):
    """``flexmask --help | head -1``: the reader closes the pipe before the help is written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexmask", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    proc.stdout.close()  # a reader that went away (importing torch takes the child long enough)
    _, err = proc.communicate(timeout=300)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode in (0, 1)


def test_broken_pipe_through_head(tmp_path):
    done = subprocess.run(
        f"'{sys.executable}' -m flexmask --help | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        timeout=300,
    )
    assert done.stdout.startswith("usage: flexmask") and len(done.stdout.splitlines()) == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
