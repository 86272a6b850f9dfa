"""flexmask.viz: pictures are checked cell by cell (and pixel by pixel) against dense truths, not just written.

Truths come from ``Mask.to_dense``, from brute-force top-k (``tests/_reference.py``), from closed
forms (a prefix top-k keeps ``min(i + 1, k)`` keys at query ``i``) and, for probabilities, from a
float64 softmax written here.
"""

from __future__ import annotations

import importlib.util
import io
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import flexmask as fm
from flexmask.viz import (
    COLORS,
    EMPTY,
    FULL,
    MAX_CELLS,
    PARTIAL,
    SPARSITY_CAPTION,
    attention_map,
    draw_picture,
    mask_image,
    mask_picture,
    plot,
    plot_attention,
    plot_layers,
    record_masks,
    save_demo_images,
)

from ._reference import brute_topk

ROOT = Path(__file__).resolve().parents[1]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
drawing = pytest.mark.skipif(not HAS_MPL, reason="drawing needs matplotlib (pip install -e '.[viz]')")
PALETTE = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in COLORS])  # EMPTY, PARTIAL, FULL
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


def texts(fig) -> list[str]:
    """Every title, suptitle, label and legend text of a figure."""
    out = [fig.get_suptitle()]
    for a in fig.axes:
        out += [a.get_title(), a.get_xlabel(), a.get_ylabel()]
    for leg in fig.legends:
        out += [t.get_text() for t in leg.get_texts()]
    return out


def pooled_truth(dense: np.ndarray, c: int) -> np.ndarray:
    """Share of kept pairs per ``c × c`` cell of a ``[H, Q, KV]`` bool array (edge cells cut short)."""
    h, q, kv = dense.shape
    out = np.empty((h, -(-q // c), -(-kv // c)))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = dense[:, i * c : (i + 1) * c, j * c : (j + 1) * c].mean((1, 2))
    return out


def block_truth(dense: np.ndarray, bs: int) -> np.ndarray:
    """EMPTY/PARTIAL/FULL per block of a [H, Q, KV] bool array (edge blocks cut short)."""
    frac = pooled_truth(dense, bs)
    return np.where(frac == 1, FULL, np.where(frac > 0, PARTIAL, EMPTY)).astype(np.uint8)


def topk_sparsity(n: int, k: int) -> float:
    """Percent masked of a prefix top-k over ``n`` keys with no ties dropped: query ``i`` keeps ``min(i + 1, k)``."""
    return 100.0 * (1.0 - sum(min(i + 1, k) for i in range(n)) / n**2)


# -------------------------------------------------------------------------------------------
# token level: exact against to_dense


@pytest.mark.parametrize("mask, q_len, kv_len, heads, row", SMALL_MASKS, ids=lambda v: repr(v)[:40])
def test_mask_image_is_to_dense(mask, q_len, kv_len, heads, row):
    pic = mask_picture(mask, q_len, kv_len, heads=heads, batch_index=row)
    dense = mask.to_dense(q_len, kv_len, heads=heads)[row].numpy()
    assert pic.level == "token" and pic.cells.dtype == np.bool_ and pic.cells.shape == dense.shape
    np.testing.assert_array_equal(pic.cells, dense)
    np.testing.assert_array_equal(pic.kept, np.stack([dense.sum((1, 2))] * 2, -1))
    np.testing.assert_allclose(pic.sparsity(), 100 * (1 - dense.mean((1, 2))), rtol=0, atol=1e-12)


@drawing
@pytest.mark.parametrize("mask, q_len, kv_len, heads, row", SMALL_MASKS[4:], ids=lambda v: repr(v)[:40])
def test_one_pixel_per_cell_render_is_to_dense(mask, q_len, kv_len, heads, row):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


@drawing
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
        assert ax.get_title() == f"head {h} · sparsity {100 * (1 - dense[h].mean()):.1f}%"
    assert [a.get_xlabel() for a in axes] == ["", "", "key position", "key position"]  # 2 × 2 grid
    assert [a.get_ylabel() for a in axes] == ["query position", "", "query position", ""]
    # all panels share one colour mapping
    assert len({(a.images[0].norm.vmin, a.images[0].norm.vmax, a.images[0].cmap.name) for a in axes}) == 1
    assert "causal() & mask(per_head)" in fig.get_suptitle()
    assert fig.get_suptitle().endswith(SPARSITY_CAPTION)


@drawing
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
    with pytest.raises(TypeError, match="bool"):
        mask_picture(dense.float())
    with pytest.raises(ValueError, match="q_len=9"):
        mask_picture(dense, 9)


# -------------------------------------------------------------------------------------------
# pooled token level: content masks at realistic lengths


@pytest.mark.parametrize(
    "mask, q_len, kv_len, heads, cell",
    [
        (fm.causal() & PER_HEAD, 37, 37, 3, 4),  # edge cells cut short
        (fm.sliding_window(6), 11, 30, 2, 4),  # decoding offset
        (fm.causal() & fm.document(IDS[1:]), 16, 16, None, 3),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_pooled_cells_are_shares_of_dense(mask, q_len, kv_len, heads, cell):
    pic = mask_picture(mask, q_len, kv_len, heads=heads, level="pooled", cell_size=cell)
    dense = mask.to_dense(q_len, kv_len, heads=heads)[0].numpy()
    assert pic.level == "pooled" and pic.cell_size == cell
    np.testing.assert_allclose(pic.cells, pooled_truth(dense, cell), rtol=0, atol=1e-15)
    assert pic.exact and (pic.kept[:, 0] == dense.sum((1, 2))).all()


def test_pooled_topk_against_brute_force(gen):
    scores = torch.randn(2, 2, 70, generator=gen)
    pic = mask_picture(fm.topk(scores, 9), 70, 70, batch_index=1, level="pooled", cell_size=8)
    truth = brute_topk(scores, 9)[1].numpy()
    np.testing.assert_allclose(pic.cells, pooled_truth(truth, 8), rtol=0, atol=1e-15)
    np.testing.assert_allclose(pic.sparsity(), [topk_sparsity(70, 9)] * 2, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def dma_4096():
    """A DMA layer (random nonzero gates) run on 4096 tokens inside record_masks: the issue's case."""
    gen = torch.Generator().manual_seed(4096)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = fm.DynamicMaskAttention(16, num_heads=4, num_kv_heads=2, keep_window=256, rope_theta=None)
    with torch.no_grad():
        layer.A.copy_(torch.randn(2, generator=gen))
        x = torch.randn(1, 4096, 16, generator=gen)
        with record_masks() as rec:
            layer(x)
    return rec


def test_dma_layer_at_4096_is_pooled_token_truth(dma_4096):
    (call,) = dma_4096
    pic = call.picture
    assert pic.level == "pooled" and pic.cell_size == 16 and pic.cells.shape == (4, 256, 256)
    # the kept share per head is exact: the closed form of prefix top-k, and the dense mask
    np.testing.assert_allclose(pic.sparsity(), [topk_sparsity(4096, 256)] * 4, rtol=0, atol=1e-9)
    dense = call.mask.to_dense(4096, 4096, heads=4)[0]  # 67 MB of bools
    kept = dense.view(4, 256, 16, 256, 16).sum((2, 4), dtype=torch.int64).numpy()
    np.testing.assert_array_equal(pic.cells * 256, kept)
    np.testing.assert_allclose(1 - pic.sparsity() / 100, dense.double().mean((1, 2)).numpy(), rtol=0, atol=1e-9)
    assert pic.sparsity()[0] == pytest.approx(93.94, abs=0.01)  # not the 48% "block sparsity" of old
    assert len(np.unique(pic.cells[0])) > 10  # shares of each cell kept, not a 0/1 map


def test_dma_block_map_stays_available_with_token_level_sparsity(dma_4096):
    (call,) = dma_4096
    pic = mask_picture(call.mask, 4096, 4096, heads=4, level="block")
    assert pic.level == "block" and pic.cell_size == 128
    below = np.tril(np.ones((32, 32), dtype=bool), -1)
    assert (pic.cells[:, below] == PARTIAL).mean() > 0.9  # the kernel's view: nearly all partial
    np.testing.assert_allclose(pic.sparsity(), call.picture.sparsity(), rtol=0, atol=1e-12)


def test_topk_attention_call_keeps_a_visible_stripe(gen):
    n, heavy = 4096, 100
    scores = torch.randn(1, 1, n, generator=gen)
    scores[0, 0, heavy] = 1e6  # kept by every later query
    q = torch.randn(1, 2, n, 8, generator=gen)
    with torch.no_grad(), record_masks() as rec:
        fm.attention(q, q, q, mask=fm.topk(scores, 256))
    pic = rec[0].picture
    assert pic.level == "pooled"
    column = pic.cells[:, heavy // 16 + 1 :, heavy // 16]  # every cell row below the key's own
    assert (column >= 1 / 16).all()  # the stripe: at least one kept key (16 pairs) in each cell
    if HAS_MPL:
        fig = plot_layers(rec)
        ax = image_axes(fig)[0]
        px = pixels(fig, ax, np.array([heavy + 0.5]), np.arange(512, n, 256) + 0.5)
        assert not (px.astype(int) == PALETTE[EMPTY]).all(-1).any()  # drawn, never "nothing kept" grey


# -------------------------------------------------------------------------------------------
# block level


@pytest.mark.parametrize(
    "mask, q_len, kv_len",
    [
        (fm.causal(), 1000, 1000),
        (fm.sliding_window(300), 1000, 1000),
        (fm.chunked(200), 600, 1000),
        (fm.prefix_lm(150), 1000, 1000),
    ],
    ids=repr,
)
def test_block_map_is_block_truth_with_token_sparsity(mask, q_len, kv_len):
    pic = mask_picture(mask, q_len, kv_len, level="block", cell_size=64)
    dense = mask.to_dense(q_len, kv_len)[0].numpy()
    assert pic.level == "block" and pic.cell_size == 64
    np.testing.assert_array_equal(pic.cells, block_truth(dense, 64))
    assert pic.exact and pic.kept[0, 0] == dense.sum()  # partial blocks evaluated: exact
    assert pic.sparsity()[0] == pytest.approx(100 * (1 - dense.mean()), abs=1e-12)


def test_block_map_is_sound_for_combinations():
    mask = fm.causal() & fm.document(IDS.repeat_interleave(40, dim=1)) & (fm.sliding_window(100) | SINKS)
    pic = mask_picture(mask, 640, 640, level="block", cell_size=32, batch_index=1)
    dense = mask.to_dense(640, 640)[1].numpy()
    truth = block_truth(dense, 32)
    assert ((pic.cells == EMPTY) <= (truth == EMPTY)).all()
    assert ((pic.cells == FULL) <= (truth == FULL)).all()
    assert ((truth != EMPTY) <= (pic.cells != EMPTY)).all()  # nothing kept is ever drawn empty
    assert pic.kept[0, 0] == dense.sum()


def test_block_map_gives_bounds_past_max_pairs():
    mask = fm.causal() & fm.sliding_window(700)
    dense = mask.to_dense(2048, 2048)[0].numpy()
    pic = mask_picture(mask, 2048, 2048, level="block", cell_size=256, max_pairs=1000)
    low, high = pic.sparsity_bounds()[0]
    assert not pic.exact and low < 100 * (1 - dense.mean()) < high
    with pytest.raises(ValueError, match="sparsity_bounds"):
        pic.sparsity()
    if HAS_MPL:
        fig = draw_picture(pic)
        assert re.search(r"sparsity \d+\.\d–\d+\.\d%$", image_axes(fig)[0].get_title())
        assert "a range where partial blocks" in fig.get_suptitle()


def test_bool_tensor_larger_than_cap():
    dense = (fm.causal() & fm.sliding_window(70)).to_dense(300, 300)
    pic = mask_picture(dense, max_cells=10_000)  # a tensor has no structure: pooled
    assert pic.level == "pooled"
    np.testing.assert_allclose(pic.cells, pooled_truth(dense[0].numpy(), pic.cell_size), rtol=0, atol=1e-15)
    blocks = mask_picture(dense, level="block", cell_size=64)
    np.testing.assert_array_equal(blocks.cells, block_truth(dense[0].numpy(), 64))
    np.testing.assert_array_equal(
        blocks.cells, mask_image(fm.causal() & fm.sliding_window(70), 300, level="block", cell_size=64)
    )
    assert blocks.kept[0, 0] == dense.sum()


@drawing
def test_rendered_block_map_pixels():
    mask = fm.causal() & fm.sliding_window(700)
    fig = plot(mask, 4096, 4096, level="block", cell_size=256)
    (ax,) = image_axes(fig)
    pic = mask_picture(mask, 4096, 4096, level="block", cell_size=256)
    centres = (np.arange(16) + 0.5) * 256
    np.testing.assert_array_equal(sample(fig, ax, centres[None, :], centres[:, None]), pic.cells[0])
    assert set(np.unique(pic.cells)) == {EMPTY, PARTIAL, FULL}
    exact = 100 * (1 - (4096 * 700 - 700 * 699 / 2) / 4096**2)  # window of 700 keys, the first rows cut
    assert ax.get_title() == f"head 0 · sparsity {exact:.1f}%"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["empty block", "partial block", "full block"]


def test_auto_level():
    assert mask_picture(fm.causal(), 64, 64, heads=4).level == "token"
    assert mask_picture(fm.causal(), 64, 64, heads=4, max_cells=64 * 64 * 4 - 1).level == "block"
    content = fm.topk(torch.randn(1, 1, 64), 8)
    assert mask_picture(content, 64, 64, max_cells=100).level == "pooled"
    assert mask_picture(content & fm.causal(), 64, 64, max_cells=100).level == "pooled"  # inside expressions
    assert mask_picture(fm.causal() & SINKS, 64, 64, max_cells=100).level == "pooled"  # custom functions
    assert mask_picture(content, 64, 64, max_cells=100, max_pairs=1000).level == "block"
    with pytest.raises(ValueError, match="max_cells"):
        mask_picture(fm.causal(), 4096, 4096, level="token")
    with pytest.raises(ValueError, match="max_pairs"):
        mask_picture(content, 64, 64, level="pooled", max_pairs=1000)


def test_large_n_never_builds_a_dense_mask(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dense mask was built")

    monkeypatch.setattr(fm.Mask, "to_dense", refuse)
    n = 1 << 20
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([n // 2, n // 4, n // 8, n // 8]))[None]
    mask = fm.causal() & fm.document(ids) & (fm.sliding_window(1 << 16) | fm.prefix_lm(1 << 12))
    pic = mask_picture(mask, n, n, heads=8)
    assert pic.level == "block" and pic.cells.size <= MAX_CELLS
    assert pic.cells.shape == (8, 256, 256) and pic.cell_size == 4096
    # causal at a million positions: partial blocks hold 4.3e9 pairs, more than max_pairs: bounds
    causal = mask_picture(fm.causal(), n, n)
    low, high = causal.sparsity_bounds()[0]
    assert low <= 100 * (1 - (n + 1) / (2 * n)) <= high and high - low < 0.4
    if HAS_MPL:
        fig = plot(mask, n, n, heads=8)
        assert len(image_axes(fig)) == 8
        assert all("sparsity" in a.get_title() and "block sparsity" not in a.get_title() for a in image_axes(fig))


def test_large_n_peak_memory_in_a_fresh_process():
    pytest.importorskip("matplotlib")
    code = textwrap.dedent(
        """
        import io, resource, torch, flexmask as fm
        from flexmask.viz import plot
        plot(fm.causal(), 64, 64).savefig(io.BytesIO())  # warm up matplotlib
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = 1 << 20
        ids = torch.repeat_interleave(torch.arange(2), torch.tensor([n // 2, n // 2]))[None].repeat(2, 1)
        mask = fm.causal() & fm.document(ids) & (fm.sliding_window(1 << 16) | fm.chunked(1 << 18))
        plot(mask, n, n, heads=16, batch_index=1).savefig(io.BytesIO())
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    grown_mib = int(res.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    assert grown_mib < 200, f"peak memory grew by {grown_mib:.0f} MiB"  # dense would be 2 · 16 TiB


def test_custom_function_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="custom mask function"):
        mask_picture(fm.causal() & SINKS, 1 << 20, 1 << 20)


def test_bad_arguments():
    with pytest.raises(ValueError, match="q_len"):
        mask_picture(fm.causal())
    with pytest.raises(ValueError, match="level"):
        mask_picture(fm.causal(), 8, level="pixels")
    with pytest.raises(ValueError, match="batch_index"):
        mask_picture(fm.document(IDS), 16, batch_index=2)
    with pytest.raises(TypeError, match="mask or a bool tensor"):
        mask_picture("causal", 8)
    with pytest.raises(ValueError, match="cell_size"):
        mask_picture(fm.causal(), 4096, level="block", cell_size=1)


@drawing
def test_ax_draws_one_head():
    from matplotlib.figure import Figure

    with pytest.raises(ValueError, match="one head"):
        plot(fm.causal(), 8, heads=2, ax=Figure().add_subplot())


# -------------------------------------------------------------------------------------------
# one sparsity definition in every title and caption


@drawing
def test_one_sparsity_definition_everywhere(dma_4096):
    fig = plot_layers(dma_4096)
    axes = image_axes(fig)
    assert [a.get_title() for a in axes] == [f"layer 0 · head {h} · {topk_sparsity(4096, 256):.1f}%" for h in range(4)]
    assert SPARSITY_CAPTION in fig.get_suptitle() and "16×16 tokens" in fig.get_suptitle()
    figures = [
        fig,
        plot(fm.causal(), 64, 64),  # token
        plot(fm.topk(torch.randn(1, 1, 3000), 64), 3000, 3000),  # pooled
        plot(fm.causal() & fm.sliding_window(300), 3000, 3000),  # block, exact
        plot(fm.causal(), 1 << 20, 1 << 20),  # block, bounds
    ]
    for f in figures:
        assert SPARSITY_CAPTION in f.get_suptitle()
        assert not any(re.search(r"block sparsity|blocks? skipped", t) for t in texts(f))


# -------------------------------------------------------------------------------------------
# matplotlib is optional


def test_import_and_picture_data_without_matplotlib():
    code = textwrap.dedent(
        """
        import sys
        import flexmask, flexmask.viz
        assert "matplotlib" not in sys.modules, "import flexmask.viz imported matplotlib"
        sys.modules["matplotlib"] = None  # as if it were not installed
        import torch, flexmask as fm
        from flexmask.viz import attention_map, mask_picture, plot, record_masks
        assert mask_picture(fm.topk(torch.randn(1, 1, 3000), 8), 3000, 3000).level == "pooled"
        x = torch.randn(1, 2, 16, 8)
        with record_masks() as rec:
            fm.attention(x, x, x, mask=fm.causal())
        assert attention_map(x, x, mask=fm.causal()).shape == (1, 2, 16, 16) and len(rec) == 1
        try:
            fm.plot(fm.causal(), 8)
        except ImportError as e:
            print(e)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "`viz` extra" in res.stdout and "pip install matplotlib" in res.stdout


def test_drawing_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    x = torch.randn(1, 2, 16, 8)
    with record_masks() as rec:
        fm.attention(x, x, x, mask=fm.causal())
    pic = mask_picture(fm.causal(), 8)
    calls = [
        lambda: plot(fm.causal(), 8),
        lambda: draw_picture(pic),
        lambda: plot_layers(rec),
        lambda: plot_attention(x, x),
        lambda: save_demo_images({"c": fm.causal()}, 8, tmp_path),
    ]
    for call in calls:
        with pytest.raises(ImportError, match=re.escape("`viz` extra")):
            call()
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------------
# attention probabilities


def probabilities_truth(q, k, *, keep, scale, softcap, slopes, key_bias):
    """float64 softmax of ``softcap · tanh(q·k·scale / softcap) + slope_h · (j − i) + key_bias[b, h, j]``."""
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = softcap * torch.tanh(q @ k.transpose(-1, -2) * scale / softcap)
    i = torch.arange(k.shape[2] - q.shape[2], k.shape[2]).view(-1, 1)  # absolute query positions
    j = torch.arange(k.shape[2]).view(1, -1)
    s = s + slopes.double().view(1, -1, 1, 1) * (j - i) + key_bias.double()[:, :, None, :]
    s = s.masked_fill(~keep, -math.inf)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return torch.nan_to_num(p, nan=0.0)  # rows with no kept key


def test_attention_map_is_dense_float64_softmax(gen):
    q = torch.randn(2, 4, 12, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 20, 16, generator=gen, dtype=torch.float64)
    kb = torch.randn(2, 4, 20, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[0] * 8 + [1] * 12, [0] * 20])
    mask = fm.causal() & fm.document(ids) & (fm.sliding_window(6) | SINKS) & fm.padding(torch.tensor([20, 0]))
    p = attention_map(q, k, mask=mask, bias=fm.alibi(4) + fm.key_bias(kb), scale=0.3, softcap=4.0)
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / 4) for h in range(4)])
    keep = mask.to_dense(12, 20, heads=4)
    want = probabilities_truth(q, k, keep=keep, scale=0.3, softcap=4.0, slopes=slopes, key_bias=kb)
    assert p.dtype == torch.float64 and p.shape == (2, 4, 12, 20)
    assert bool((want[1] == 0).all()) and bool((p[1] == 0).all())  # batch row 1 has no key
    torch.testing.assert_close(p, want, rtol=1e-12, atol=1e-14)


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
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4, 12))


def test_attention_map_checks_and_cap(gen):
    q = k = torch.randn(1, 1, 6, 4, generator=gen)
    assert bool((attention_map(q, k, mask=fm.causal() & fm.padding(torch.tensor([0]))) == 0).all())
    with pytest.raises(ValueError, match="max_cells"):
        attention_map(torch.randn(1, 4, 2048, 8), torch.randn(1, 4, 4096, 8))
    with pytest.raises(TypeError, match="mask"):
        attention_map(q, k, mask="causal")
    with pytest.raises(TypeError, match="bias"):
        attention_map(q, k, bias=torch.zeros(6))
    with pytest.raises(ValueError, match="scale"):
        attention_map(q, k, scale=math.nan)
    with pytest.raises(ValueError, match="softcap"):
        attention_map(q, k, softcap=-1.0)
    with pytest.raises(ValueError, match="document ids"):
        attention_map(q, k, mask=fm.document(torch.zeros(1, 4, dtype=torch.long)))


@drawing
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
    np.testing.assert_allclose(rec.sparsity()[2], 0.0)
    assert rec[2].picture.label == "no mask"
    if HAS_MPL:
        fig = plot_layers(rec)
        assert len(image_axes(fig)) == 4 * 4  # layers × heads
        assert image_axes(fig)[4 + 2].get_title().startswith("layer 1 · head 2")
        assert len(image_axes(plot_layers(rec, layers=[1, 3], heads=[0, 2]))) == 4


def test_record_masks_stops_recording_even_on_error(gen):
    x = torch.randn(1, 1, 8, 4, generator=gen)
    with pytest.raises(RuntimeError), record_masks() as rec:
        fm.attention(x, x, x, mask=fm.causal())
        raise RuntimeError("model failed")
    fm.attention(x, x, x, mask=fm.causal())
    assert len(rec) == 1


def test_record_masks_large_structured_calls_are_block_maps(gen):
    x = torch.randn(1, 2, 256, 4, generator=gen)
    with record_masks(max_cells=4096) as rec:
        fm.attention(x, x, x, mask=fm.causal() & fm.sliding_window(64))
    (call,) = rec
    assert call.dense is None and call.picture.level == "block" and call.picture.cells.size <= 4096
    dense = (fm.causal() & fm.sliding_window(64)).to_dense(256, 256)[0, 0]
    np.testing.assert_allclose(rec.sparsity()[0], 100 * (1 - dense.double().mean().item()), atol=1e-12)
    if HAS_MPL:
        assert len(image_axes(plot_layers(rec))) == 2


def test_record_dynamic_mask_attention_layers(gen):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = [
            fm.DynamicMaskAttention(32, num_heads=4, num_kv_heads=2, keep_window=5, rope_theta=None) for _ in range(2)
        ]
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
    np.testing.assert_allclose(rec.sparsity(), topk_sparsity(20, 5), atol=1e-12)
    if HAS_MPL:
        assert len(image_axes(plot_layers(rec))) == 2 * 4


# -------------------------------------------------------------------------------------------
# demo images and the docs gallery


SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-", ".svg": b"<svg"}


@drawing
def test_save_demo_images(tmp_path):
    examples = {
        "causal": fm.causal(),
        "causal & sliding_window(4)": fm.causal() & fm.sliding_window(4),
        "causal & (sliding_window(4))": fm.sliding_window(4),
    }
    paths = save_demo_images(examples, 32, tmp_path / "demo")
    assert [p.name for p in paths] == ["causal.png", "causal_sliding_window_4.png", "causal_sliding_window_4_2.png"]
    for p in paths:
        assert p.read_bytes().startswith(SIGNATURES[".png"])


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
    names = {
        name: getattr(fm, name)
        for name in ("causal", "sliding_window", "chunked", "prefix_lm", "document", "padding", "mask")
    }
    for slug, (expr, build) in hook.MASKS.items():
        q_len, kv_len, heads = hook.size(slug)
        assert f"`{expr}`" in page, f"the gallery page does not show the expression of {slug}"
        shown = eval(expr, {"__builtins__": {}, "torch": torch, **names})  # the page's text, as Python reads it
        built = build()
        assert repr(shown) == repr(built)
        q, kv = min(q_len, 64), min(kv_len, 64)  # the long ones at 64 positions
        np.testing.assert_array_equal(built.to_dense(q, kv, heads=heads), shown.to_dense(q, kv, heads=heads))
    # the DMA section's numbers are those of hook.DMA
    c = hook.DMA
    assert f"keep_window={c['keep_window']}" in page and f"{c['n']}-token input" in page
    assert f"{topk_sparsity(c['n'], c['keep_window']):.1f}%" in page
    assert f"{c['n'] // 256} × {c['n'] // 256} tokens" in page


def test_gallery_dma_recording_is_pooled_and_content_based(monkeypatch):
    hook = load_hook()
    monkeypatch.setitem(hook.DMA, "n", 1024)  # the page's 4096 costs seconds; 4 heads × 1024² is pooled too
    monkeypatch.setitem(hook.DMA, "layers", 2)
    rec = hook.dma_recording()
    assert len(rec) == 2 and all(call.picture.level == "pooled" for call in rec)
    window = fm.sliding_window(hook.DMA["keep_window"]).to_dense(1024, 1024)[0, 0]
    assert not torch.equal(rec[0].mask.to_dense(1024, 1024, heads=4)[0, 0], window)  # not a plain window
    np.testing.assert_allclose(rec.sparsity(), topk_sparsity(1024, hook.DMA["keep_window"]), atol=1e-9)
    if HAS_MPL:
        assert len(image_axes(plot_layers(rec))) == 2 * 4


def test_gallery_hook_adds_generated_images(tmp_path, monkeypatch):
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') builds the site")
    from mkdocs.config import load_config
    from mkdocs.structure.files import File, Files

    docs, site, hook_path = tmp_path / "docs", tmp_path / "site", ROOT / "docs" / "gallery_hook.py"
    docs.mkdir()
    config = load_config(io.StringIO(f"site_name: t\ndocs_dir: {docs}\nsite_dir: {site}\nhooks: ['{hook_path}']\n"))
    hook = config.hooks[str(hook_path)]
    monkeypatch.setattr(hook, "figures", lambda: {"causal": lambda: plot(fm.causal(), 8, 8)})
    files = Files(
        [
            File(p, str(docs), str(site), False)
            for p in ("index.md", "gallery_hook.py", "__pycache__/gallery_hook.cpython-311.pyc")
        ]
    )
    files = config.plugins.on_files(files, config=config)  # as `mkdocs build` runs it
    assert sorted(f.src_uri for f in files) == ["images/gallery/causal.png", "index.md"]
    png = files.get_file_from_path("images/gallery/causal.png").content_bytes
    assert png.startswith(SIGNATURES[".png"])
