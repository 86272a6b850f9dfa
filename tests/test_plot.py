"""flexmask.plot: pictures are checked pixel by pixel against ``to_dense``, not just written."""

from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import flexmask as fm  # noqa: E402
import flexmask.masks  # noqa: E402
from flexmask.plot import (  # noqa: E402
    COLORS,
    EMPTY,
    FULL,
    MAX_CELLS,
    PARTIAL,
    attention_map,
    eval_expression,
    main,
    mask_image,
    mask_picture,
    plot,
    plot_attention,
    plot_layers,
    record_masks,
    save_demo_images,
)

ROOT = Path(__file__).resolve().parents[1]
PALETTE = np.array([[round(255 * c) for c in to_rgb(color)] for color in COLORS])  # EMPTY, PARTIAL, FULL
IDS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])
SINKS = fm.mask(lambda b, h, q, kv: kv < 2, name="sinks")
PER_HEAD = fm.mask(lambda b, h, q, kv: q - kv < 2 * (h + 1), name="per_head")

# (mask, q_len, kv_len, heads, batch_index)
SMALL_MASKS = [
    (fm.causal(), 16, 16, None, 0),
    (fm.sliding_window(4), 16, 16, None, 0),
    (fm.chunked(5) & fm.causal(), 16, 16, None, 0),
    (fm.prefix_lm(6), 16, 16, None, 0),
    (fm.causal() & fm.document(IDS), 16, 16, None, 1),
    (fm.causal() & fm.padding(torch.tensor([11, 7])), 16, 16, None, 1),
    (fm.causal() & (fm.sliding_window(3) | SINKS), 16, 16, None, 0),
    (~fm.causal(), 16, 16, None, 0),
    (fm.causal() & PER_HEAD, 16, 16, 3, 0),
    (fm.sliding_window(6), 5, 16, 2, 0),  # decoding: queries are positions 11..15
]


def decode(rgb: np.ndarray) -> np.ndarray:
    """Colour codes (EMPTY/PARTIAL/FULL) of RGB pixels; every pixel must be exactly one palette colour."""
    dist = np.abs(rgb[..., None, :3].astype(int) - PALETTE).sum(-1)
    assert (dist.min(-1) == 0).all(), "a sampled pixel is not one of the palette colours"
    return dist.argmin(-1)


def rendered(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())


def pixels(fig, ax, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """RGB ``[..., 3]`` of the rendered pixels at data points (xs, ys) (broadcast) of ``ax``."""
    img = rendered(fig)
    pts = np.stack(np.broadcast_arrays(xs, ys), -1).reshape(-1, 2).astype(float)
    disp = ax.transData.transform(pts)
    cols = np.floor(disp[:, 0]).astype(int)
    rows = np.floor(img.shape[0] - disp[:, 1]).astype(int)
    return img[rows, cols, :3].reshape(*np.broadcast_shapes(np.shape(xs), np.shape(ys)), 3)


def sample(fig, ax, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Colour codes of the pixels at data points (xs, ys) of ``ax``."""
    return decode(pixels(fig, ax, xs, ys))


def image_axes(fig):
    return [a for a in fig.axes if a.images]


# -------------------------------------------------------------------------------------------
# token level: exact against to_dense


@pytest.mark.parametrize("mask, q_len, kv_len, heads, row", SMALL_MASKS, ids=lambda v: repr(v)[:40])
def test_mask_image_is_to_dense(mask, q_len, kv_len, heads, row):
    img = mask_image(mask, q_len, kv_len, heads=heads, batch_index=row)
    dense = mask.to_dense(q_len, kv_len, heads=heads)[row].numpy()
    assert img.dtype == np.bool_ and img.shape == dense.shape
    np.testing.assert_array_equal(img, dense)


@pytest.mark.parametrize("mask, q_len, kv_len, heads, row", SMALL_MASKS[4:], ids=lambda v: repr(v)[:40])
def test_one_pixel_per_cell_render_is_to_dense(mask, q_len, kv_len, heads, row):
    dense = mask.to_dense(q_len, kv_len, heads=heads)[row].numpy()
    for h in range(dense.shape[0]):
        fig = Figure(figsize=(kv_len / 100, q_len / 100), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        plot(mask, q_len, kv_len, heads=[h], batch_index=row, ax=ax)
        ax.set_axis_off()  # no frame over the edge pixels; title and ticks fall outside the canvas
        img = rendered(fig)
        assert img.shape[:2] == (q_len, kv_len)
        np.testing.assert_array_equal(decode(img) == FULL, dense[h])


def test_rendered_grid_pixels_titles_and_labels():
    mask = fm.causal() & PER_HEAD
    fig = plot(mask, 12, 12, heads=4)
    axes = image_axes(fig)
    assert len(axes) == 4  # one panel per head
    dense = mask.to_dense(12, 12, heads=4)[0].numpy()
    centres = np.arange(12) + 0.5
    for h, ax in enumerate(axes):
        codes = sample(fig, ax, centres[None, :], centres[:, None])
        np.testing.assert_array_equal(codes == FULL, dense[h])
        sparsity = 100 * (1 - dense[h].mean())
        assert ax.get_title() == f"head {h} · sparsity {sparsity:.1f}%"
    assert [a.get_xlabel() for a in axes] == ["", "", "key position", "key position"]  # 2 × 2 grid
    assert [a.get_ylabel() for a in axes] == ["query position", "", "query position", ""]
    # all panels share one colour mapping
    assert len({(a.images[0].norm.vmin, a.images[0].norm.vmax, a.images[0].cmap.name) for a in axes}) == 1
    assert "causal() & mask(per_head)" in fig._suptitle.get_text()


def test_head_selection_and_grid_shape():
    fig = plot(fm.causal() & PER_HEAD, 8, 8, heads=[1, 3])
    assert [a.get_title().split(" · ")[0] for a in image_axes(fig)] == ["head 1", "head 3"]
    fig = plot(fm.causal(), 8, 8, heads=7)
    assert len(image_axes(fig)) == 7
    assert len(fig.axes) == 9  # 3 × 3 grid, two panels switched off


def test_bool_tensor_input_shapes():
    dense = (fm.causal() & PER_HEAD).to_dense(10, 10, heads=2)
    for t, want in ((dense[0, 1], dense[0, 1:2]), (dense[0], dense[0]), (dense, dense[0])):
        np.testing.assert_array_equal(mask_image(t), want.numpy())
    fig = plot(dense)
    assert len(image_axes(fig)) == 2
    with pytest.raises(TypeError, match="bool"):
        plot(dense.float())
    with pytest.raises(ValueError, match="q_len=9"):
        plot(dense, 9)


# -------------------------------------------------------------------------------------------
# block level


def pooled(dense: np.ndarray, bs: int) -> np.ndarray:
    """EMPTY/PARTIAL/FULL per block of a [H, Q, KV] bool array (edge blocks cut short)."""
    h, q, kv = dense.shape
    nq, nk = -(-q // bs), -(-kv // bs)
    out = np.empty((h, nq, nk), dtype=np.uint8)
    for i in range(nq):
        for j in range(nk):
            blk = dense[:, i * bs : (i + 1) * bs, j * bs : (j + 1) * bs]
            out[:, i, j] = np.where(blk.all((1, 2)), FULL, np.where(blk.any((1, 2)), PARTIAL, EMPTY))
    return out


@pytest.mark.parametrize(
    "mask, q_len, kv_len",
    [(fm.causal(), 1000, 1000), (fm.sliding_window(300), 1000, 1000), (fm.chunked(200), 600, 1000),
     (fm.prefix_lm(150), 1000, 1000)],
    ids=repr,
)
def test_block_map_is_pooled_dense_for_exact_masks(mask, q_len, kv_len):
    pic = mask_picture(mask, q_len, kv_len, level="block", block_size=64)
    assert pic.level == "block" and pic.block_size == 64
    np.testing.assert_array_equal(pic.cells, pooled(mask.to_dense(q_len, kv_len)[0].numpy(), 64))


def test_block_map_is_sound_for_combinations():
    mask = fm.causal() & fm.document(IDS.repeat_interleave(40, dim=1)) & (fm.sliding_window(100) | SINKS)
    cells = mask_image(mask, 640, 640, level="block", block_size=32, batch_index=1)
    truth = pooled(mask.to_dense(640, 640)[1].numpy(), 32)
    assert ((cells == EMPTY) <= (truth == EMPTY)).all()
    assert ((cells == FULL) <= (truth == FULL)).all()
    assert ((truth != EMPTY) <= (cells != EMPTY)).all()  # nothing kept is ever drawn empty


def test_bool_tensor_larger_than_cap_is_pooled():
    dense = (fm.causal() & fm.sliding_window(70)).to_dense(300, 300)
    pic = mask_picture(dense, max_cells=10_000)
    assert pic.level == "block"
    np.testing.assert_array_equal(pic.cells, pooled(dense[0].numpy(), pic.block_size))
    np.testing.assert_array_equal(
        mask_image(dense, level="block", block_size=64),
        mask_image(fm.causal() & fm.sliding_window(70), 300, 300, level="block", block_size=64),
    )


def test_rendered_block_map_pixels():
    mask = fm.causal() & fm.sliding_window(700)
    fig = plot(mask, 4096, 4096, level="block", block_size=256)
    (ax,) = image_axes(fig)
    pic = mask_picture(mask, 4096, 4096, level="block", block_size=256)
    centres = (np.arange(16) + 0.5) * 256
    np.testing.assert_array_equal(sample(fig, ax, centres[None, :], centres[:, None]), pic.cells[0])
    assert set(np.unique(pic.cells)) == {EMPTY, PARTIAL, FULL}
    assert "block sparsity" in ax.get_title()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["empty block", "partial block", "full block"]


def test_auto_level_switches_on_the_cap():
    assert mask_picture(fm.causal(), 64, 64, heads=4).level == "token"
    assert mask_picture(fm.causal(), 64, 64, heads=4, max_cells=64 * 64 * 4 - 1).level == "block"
    with pytest.raises(ValueError, match="max_cells"):
        mask_picture(fm.causal(), 4096, 4096, level="token")


def test_large_n_never_builds_a_dense_mask(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dense mask was built")

    monkeypatch.setattr(flexmask.masks.Mask, "to_dense", refuse)
    monkeypatch.setattr(flexmask.masks, "evaluate", refuse)
    n = 1 << 20
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([n // 2, n // 4, n // 8, n // 8]))[None]
    mask = fm.causal() & fm.document(ids) & (fm.sliding_window(1 << 16) | fm.prefix_lm(1 << 12))
    fig = plot(mask, n, n, heads=8)
    pic = mask_picture(mask, n, n, heads=8)
    assert pic.level == "block" and pic.cells.size <= MAX_CELLS
    assert pic.cells.shape == (8, 256, 256) and pic.block_size == 4096
    assert len(image_axes(fig)) == 8
    # a plain causal mask skips (almost exactly) half of the scores
    assert mask_picture(fm.causal(), n, n).sparsity()[0] == pytest.approx(50.0, abs=0.25)


def test_large_n_peak_memory_in_a_fresh_process():
    code = textwrap.dedent(
        """
        import io, resource, torch, flexmask as fm
        from flexmask.plot import plot
        plot(fm.causal(), 64, 64).savefig(io.BytesIO())  # warm up matplotlib
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = 1 << 20
        ids = torch.repeat_interleave(torch.arange(2), torch.tensor([n // 2, n // 2]))[None].repeat(2, 1)
        mask = fm.causal() & fm.document(ids) & (fm.sliding_window(1 << 16) | fm.chunked(1 << 18))
        plot(mask, n, n, heads=16, batch_index=1).savefig(io.BytesIO())
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    grown_mib = int(res.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    assert grown_mib < 200, f"peak memory grew by {grown_mib:.0f} MiB"  # dense would be 2 · 16 TiB


def test_custom_function_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="custom mask function"):
        mask_picture(fm.causal() & SINKS, 1 << 20, 1 << 20)


def test_bad_arguments():
    with pytest.raises(ValueError, match="q_len"):
        plot(fm.causal())
    with pytest.raises(ValueError, match="level"):
        plot(fm.causal(), 8, level="pixels")
    with pytest.raises(ValueError, match="batch_index"):
        plot(fm.document(IDS), 16, batch_index=2)
    with pytest.raises(ValueError, match="one head"):
        plot(fm.causal(), 8, heads=2, ax=Figure().add_subplot())
    with pytest.raises(TypeError, match="mask or a bool tensor"):
        plot("causal", 8)


# -------------------------------------------------------------------------------------------
# attention probabilities


def test_attention_map_is_what_attention_uses(gen):
    q = torch.randn(2, 4, 12, 16, generator=gen)
    k = torch.randn(2, 2, 20, 16, generator=gen)
    v = torch.randn(2, 2, 20, 8, generator=gen)
    mask = fm.causal() & fm.document(IDS[:, :4].repeat_interleave(5, dim=1)) & (fm.sliding_window(6) | SINKS)
    bias = fm.alibi(4) + fm.key_bias(torch.randn(2, 4, 20, generator=gen))
    kw = dict(mask=mask, bias=bias, scale=0.3, softcap=4.0)
    p = attention_map(q, k, **kw)
    assert p.shape == (2, 4, 12, 20) and p.dtype == torch.float32
    out = fm.attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(p @ v.repeat_interleave(2, dim=1), out, rtol=1e-5, atol=1e-5)
    kept = mask.to_dense(12, 20, heads=4)
    assert bool((p[~kept] == 0).all())
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))


def test_attention_map_masked_rows_and_cap(gen):
    q = k = torch.randn(1, 1, 6, 4, generator=gen)
    p = attention_map(q, k, mask=fm.causal() & fm.padding(torch.tensor([0])))
    assert bool((p == 0).all())
    with pytest.raises(ValueError, match="max_cells"):
        attention_map(torch.randn(1, 4, 2048, 8), torch.randn(1, 4, 4096, 8))
    with pytest.raises(TypeError, match="mask"):
        attention_map(q, k, mask="causal")


def test_plot_attention_panels_and_masked_pixels(gen):
    q = torch.randn(1, 4, 10, 8, generator=gen)
    k = torch.randn(1, 2, 10, 8, generator=gen)
    mask = fm.causal() & fm.sliding_window(3)
    fig = plot_attention(q, k, mask=mask, bias=fm.alibi(4), heads=[0, 3])
    axes = image_axes(fig)
    assert [a.get_title() for a in axes] == ["head 0", "head 3"]
    kept = mask.to_dense(10, 10)[0, 0].numpy()
    centres = np.arange(10) + 0.5
    px = pixels(fig, axes[1], centres[None, :], centres[:, None])
    grey = (px.astype(int) == PALETTE[EMPTY]).all(-1)
    np.testing.assert_array_equal(grey, ~kept)  # masked entries grey, kept ones coloured


# -------------------------------------------------------------------------------------------
# learned masks


def test_record_masks_layer_order_and_dense_maps(gen):
    x = torch.randn(1, 4, 16, 8, generator=gen)
    masks = [fm.causal(), fm.causal() & PER_HEAD, None, fm.chunked(4) & fm.causal()]
    with record_masks() as rec:
        for m in masks:
            x = fm.attention(x, x, x, mask=m)
    assert len(rec) == 4
    for call, m in zip(rec, masks, strict=True):
        assert call.mask is m
        assert (call.layout.batch, call.layout.heads, call.layout.q_len, call.layout.kv_len) == (1, 4, 16, 16)
        want = (fm.full() if m is None else m).to_dense(16, 16, heads=4)[0]
        assert torch.equal(call.dense, want)
    fig = plot_layers(rec)
    assert len(image_axes(fig)) == 4 * 4  # layers × heads
    assert image_axes(fig)[4 + 2].get_title().startswith("layer 1 · head 2")
    assert len(image_axes(plot_layers(rec, layers=[1, 3], heads=[0, 2]))) == 4


def test_record_masks_removes_its_observer_even_on_error():
    from flexmask.attention import observers

    before = list(observers)
    with pytest.raises(RuntimeError), record_masks():
        assert len(observers) == len(before) + 1
        raise RuntimeError("model failed")
    assert observers == before


def test_record_masks_large_calls_are_block_maps(gen):
    x = torch.randn(1, 2, 256, 4, generator=gen)
    with record_masks(max_cells=4096) as rec:
        fm.attention(x, x, x, mask=fm.causal() & fm.sliding_window(64))
    (call,) = rec
    assert call.dense is None and call.picture.level == "block" and call.picture.cells.size <= 4096
    assert len(image_axes(plot_layers(rec))) == 2


def test_record_dynamic_mask_attention_layers(gen):
    torch.manual_seed(0)
    layers = [fm.DynamicMaskAttention(32, num_heads=4, num_kv_heads=2, keep_window=5, rope_theta=None)
              for _ in range(2)]
    with torch.no_grad():
        for layer in layers:
            layer.A.fill_(1.0)  # make the selection content-dependent, not a plain window
    x = torch.randn(1, 20, 32, generator=gen)
    with torch.no_grad(), record_masks() as rec:
        for layer in layers:
            x = layer(x)
    assert len(rec) == 2
    for call in rec:
        assert torch.equal(call.dense, call.mask.to_dense(20, 20, heads=4)[0])
        assert int(call.dense.sum(-1).max()) <= 5
    assert len(image_axes(plot_layers(rec))) == 2 * 4


# -------------------------------------------------------------------------------------------
# command line and demo


SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-", ".svg": b"<svg"}


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_cli_writes_each_format(tmp_path, capsys, suffix):
    out = tmp_path / "sub" / f"m{suffix}"
    rc = main(["fm.causal() & sliding_window(4) | mask(lambda b, h, q, kv: kv < 2)", "--q-len", "16",
               "--heads", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = out.read_bytes()
    if suffix == ".svg":
        assert SIGNATURES[suffix] in data[:2000]
    else:
        assert data.startswith(SIGNATURES[suffix])
    assert capsys.readouterr().out.strip() == f"wrote {out}"


def test_cli_png_pixels_match(tmp_path):
    out = tmp_path / "m.png"
    assert main(["torch.ones(6, 6, dtype=torch.bool).tril()", "--out", str(out), "--dpi", "100"]) == 0
    img = matplotlib.image.imread(out)
    assert img.shape[2] == 4 and img.shape[0] > 100  # a real picture, not an empty file


@pytest.mark.parametrize(
    "argv, message",
    [
        (["causal() &", "--q-len", "8"], "bad expression"),
        (["open('/etc/passwd')", "--q-len", "8"], "NameError"),
        (["__import__('os')", "--q-len", "8"], "NameError"),
        (["1 + 1", "--q-len", "8"], "not a flexmask mask"),
        (["causal()", "--q-len", "abc"], "invalid int value"),
        (["causal()", "--q-len", "8", "--bogus"], "unrecognized arguments"),
        (["causal()", "--q-len", "8", "--out", "m.jpg"], ".png, .svg or .pdf"),
        (["causal()"], "--q-len"),
        (["causal()", "--q-len", "10", "--kv-len", "5"], "q_len=10 is larger than kv_len=5"),
        (["document(torch.zeros(1, 4, dtype=torch.long))", "--q-len", "8"], "ids have length 4"),
        ([], "required"),
    ],
)
def test_cli_errors_are_one_line_and_status_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flexmask plot: error: ")
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_bad_expression_through_python_m(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "flexmask", "plot", "causal() & & x", "--q-len", "8"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("flexmask plot: error: bad expression")
    assert "Traceback" not in res.stderr


def test_eval_expression_namespace():
    assert repr(eval_expression("causal() & fm.sliding_window(3)")) == "causal() & sliding_window(3)"
    assert eval_expression("torch.ones(2, dtype=torch.bool)").dtype == torch.bool
    for expr in ("len([1])", "print", "__builtins__['open']"):
        with pytest.raises((NameError, KeyError, TypeError)):
            eval_expression(expr)


def test_save_demo_images(tmp_path):
    examples = {"causal": fm.causal(), "causal & sliding_window(4)": fm.causal() & fm.sliding_window(4),
                "causal & (sliding_window(4))": fm.sliding_window(4)}
    paths = save_demo_images(examples, 32, tmp_path / "demo")
    assert [p.name for p in paths] == ["causal.png", "causal_sliding_window_4.png", "causal_sliding_window_4_2.png"]
    for p in paths:
        assert p.read_bytes().startswith(SIGNATURES[".png"])


# -------------------------------------------------------------------------------------------
# docs gallery


def load_hook():
    spec = importlib.util.spec_from_file_location("gallery_hook", ROOT / "docs" / "gallery_hook.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    return hook


def test_gallery_page_and_hook_agree():
    hook = load_hook()
    page = (ROOT / "docs" / "gallery.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(images/gallery/([\w-]+)\.png\)", page)
    assert sorted(linked) == sorted(hook.figures())
    for slug, expr, q_len, kv_len, heads in hook.MASKS:
        assert expr in page, f"the gallery page does not show the expression of {slug}"
        pic = mask_picture(eval_expression(expr), q_len, kv_len, heads=heads)
        if pic.level == "token":
            np.testing.assert_array_equal(pic.cells, eval_expression(expr).to_dense(q_len, kv_len, heads=heads)[0])


def test_gallery_hook_adds_generated_images(tmp_path, monkeypatch):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') builds the site")
    from mkdocs.config import load_config
    from mkdocs.structure.files import File, Files

    docs, site, hook_path = tmp_path / "docs", tmp_path / "site", ROOT / "docs" / "gallery_hook.py"
    docs.mkdir()
    config = load_config(io.StringIO(f"site_name: t\ndocs_dir: {docs}\nsite_dir: {site}\nhooks: ['{hook_path}']\n"))
    hook = config.hooks[str(hook_path)]
    monkeypatch.setattr(hook, "figures", lambda: {"causal": lambda: plot(fm.causal(), 8, 8)})
    files = Files([File(p, str(docs), str(site), False)
                   for p in ("index.md", "gallery_hook.py", "__pycache__/gallery_hook.cpython-311.pyc")])
    files = config.plugins.on_files(files, config=config)  # as `mkdocs build` runs it
    assert sorted(f.src_uri for f in files) == ["images/gallery/causal.png", "index.md"]
    png = files.get_file_from_path("images/gallery/causal.png").content_bytes
    assert png.startswith(SIGNATURES[".png"])
