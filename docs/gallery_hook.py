"""MkDocs hook that draws the images of the mask gallery (docs/gallery.md) at build time.

Registered in ``mkdocs.yml`` (``hooks: [docs/gallery_hook.py]``), so ``mkdocs build`` and
``mkdocs serve`` draw every picture from the code that is being documented. The PNGs are made in
memory and added to the build as generated files under ``images/gallery/``: nothing is written
into ``docs/``, nothing needs committing, and ``--strict`` sees every image the page links to.

The same pictures can be written to a folder with one command::

    python docs/gallery_hook.py OUT_DIR

Each mask entry pairs the expression the page shows with a plain Python function building the
same mask (the tests check that the page shows each expression and that both give one mask).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import flexmask  # noqa: F401
except ImportError:  # building the docs from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import flexmask as fm
from flexmask.viz import draw_picture, mask_picture, plot, plot_attention, plot_layers, record_masks

IMAGE_DIR = "images/gallery"

_IDS = [[0] * 20 + [1] * 28 + [2] * 16]

#: slug → (the expression the page shows, a function building that mask)
MASKS: dict[str, tuple[str, Callable[[], fm.Mask]]] = {
    "causal": ("causal()", lambda: fm.causal()),
    "sliding_window": ("sliding_window(16)", lambda: fm.sliding_window(16)),
    "chunked_causal": ("chunked(16) & causal()", lambda: fm.chunked(16) & fm.causal()),
    "prefix_lm": ("prefix_lm(24)", lambda: fm.prefix_lm(24)),
    "documents": (
        "causal() & document(torch.tensor([[0] * 20 + [1] * 28 + [2] * 16]))",
        lambda: fm.causal() & fm.document(torch.tensor(_IDS)),
    ),
    "documents_bidirectional": (
        "document(torch.tensor([[0] * 20 + [1] * 28 + [2] * 16]))",
        lambda: fm.document(torch.tensor(_IDS)),
    ),
    "padding": ("causal() & padding(torch.tensor([48]))", lambda: fm.causal() & fm.padding(torch.tensor([48]))),
    "window_sinks": (
        'causal() & (sliding_window(12) | mask(lambda b, h, q, kv: kv < 4, name="sinks"))',
        lambda: fm.causal() & (fm.sliding_window(12) | fm.mask(lambda b, h, q, kv: kv < 4, name="sinks")),
    ),
    "dilated": (
        'causal() & mask(lambda b, h, q, kv: (q - kv) % 4 == 0, name="dilated")',
        lambda: fm.causal() & fm.mask(lambda b, h, q, kv: (q - kv) % 4 == 0, name="dilated"),
    ),
    "not_causal": ("~causal()", lambda: ~fm.causal()),
    "kv_cache": ("sliding_window(32)", lambda: fm.sliding_window(32)),
    "per_head": (
        'causal() & mask(lambda b, h, q, kv: q - kv < 8 * (h + 1), name="window_per_head")',
        lambda: fm.causal() & fm.mask(lambda b, h, q, kv: q - kv < 8 * (h + 1), name="window_per_head"),
    ),
    "long_context": (
        "sliding_window(4096) | (chunked(16384) & causal())",
        lambda: fm.sliding_window(4096) | (fm.chunked(16384) & fm.causal()),
    ),
}

#: (q_len, kv_len, heads) of each mask picture: 64 positions and the mask's own heads unless listed.
SIZES: dict[str, tuple[int, int, int | None]] = {
    "kv_cache": (16, 64, None),
    "per_head": (64, 64, 4),
    "long_context": (65536, 65536, None),
}


def size(slug: str) -> tuple[int, int, int | None]:
    return SIZES.get(slug, (64, 64, None))


#: The DMA model of the "learned masks" section: its size and the length of the recorded input.
DMA = dict(layers=3, hidden=64, heads=4, kv_heads=2, keep_window=256, vocab=512, n=4096, seed=0)


def _mask_figure(slug: str):
    q_len, kv_len, heads = size(slug)
    return plot(MASKS[slug][1](), q_len, kv_len, heads=heads)


def _attention_figure():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 48, 32, generator=gen)
    k = torch.randn(1, 4, 48, 32, generator=gen)
    return plot_attention(q, k, mask=fm.causal() & fm.sliding_window(24), bias=fm.alibi(4))


def dma_recording():
    """What each layer of a small seeded DMA stack kept for one ``DMA["n"]``-token input."""
    c = DMA
    with torch.random.fork_rng(devices=[]):  # seeded weights, without touching the caller's RNG
        torch.manual_seed(c["seed"])
        layers = torch.nn.ModuleList(
            fm.DynamicMaskAttention(
                c["hidden"], num_heads=c["heads"], num_kv_heads=c["kv_heads"], keep_window=c["keep_window"]
            )
            for _ in range(c["layers"])
        )
        with torch.no_grad():
            for layer in layers:  # A = 0 would select a plain sliding window: give the gates content
                layer.A.normal_(0.0, 2.0)
                layer.dt_proj.weight.normal_(0.0, 0.5)
            # a "text" of tokens from a small vocabulary: equal tokens get equal content scores
            embedding = torch.randn(c["vocab"], c["hidden"])
            x = embedding[torch.randint(c["vocab"], (1, c["n"]))]
            with record_masks() as rec:
                for layer in layers:
                    x = x + layer(x)
    return rec


def _dma_figures() -> dict[str, Callable]:
    cache: dict = {}

    def rec():
        if "rec" not in cache:
            cache["rec"] = dma_recording()
        return cache["rec"]

    def blocks():
        call = rec()[0]
        pic = mask_picture(call.mask, call.layout.q_len, call.layout.kv_len, heads=call.layout.heads, level="block")
        return draw_picture(pic)

    return {"dma_layers": lambda: plot_layers(rec()), "dma_blocks": blocks}


def figures() -> dict[str, Callable]:
    """Slug → a function drawing that gallery picture."""
    out: dict[str, Callable] = {slug: (lambda s=slug: _mask_figure(s)) for slug in MASKS}
    out["attention"] = _attention_figure
    out.update(_dma_figures())
    return out


def render(slug: str, figs: dict[str, Callable] | None = None) -> bytes:
    """The PNG bytes of one gallery picture."""
    buf = io.BytesIO()
    (figs or figures())[slug]().savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def on_files(files, config):
    """Add the gallery PNGs to the build; keep this hook (and its bytecode) out of the site."""
    from mkdocs.structure.files import File

    for f in list(files):
        if f.src_uri == "gallery_hook.py" or f.src_uri.startswith("__pycache__/"):
            files.remove(f)
    figs = figures()  # one DMA recording for both of its pictures
    for slug in figs:
        files.append(File.generated(config, f"{IMAGE_DIR}/{slug}.png", content=render(slug, figs)))
    return files


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "gallery")
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures()
    for slug in figs:
        path = out_dir / f"{slug}.png"
        path.write_bytes(render(slug, figs))
        print(f"wrote {path}")
