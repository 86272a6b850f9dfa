"""MkDocs hook that draws the images of the mask gallery (docs/gallery.md) at build time.

Registered in ``mkdocs.yml`` (``hooks: [docs/gallery_hook.py]``), so ``mkdocs build`` and
``mkdocs serve`` draw every picture from the code that is being documented. The PNGs are made in
memory and added to the build as generated files under ``images/gallery/``: nothing is written
into ``docs/``, nothing needs committing, and ``--strict`` sees every image the page links to.

The same pictures can be written to a folder with one command::

    python docs/gallery_hook.py OUT_DIR

Each mask entry is an expression evaluated exactly as ``python -m flexmask plot EXPR`` evaluates
it, so every picture on the page can be reproduced from the command line.
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

from flexmask.plot import eval_expression, plot, plot_attention, plot_layers, record_masks

IMAGE_DIR = "images/gallery"

#: (slug, expression, q_len, kv_len, heads) for each mask picture of the gallery.
MASKS: list[tuple[str, str, int, int, int | None]] = [
    ("causal", "causal()", 64, 64, None),
    ("sliding_window", "sliding_window(16)", 64, 64, None),
    ("chunked_causal", "chunked(16) & causal()", 64, 64, None),
    ("prefix_lm", "prefix_lm(24)", 64, 64, None),
    ("documents", "causal() & document(torch.tensor([[0] * 20 + [1] * 28 + [2] * 16]))", 64, 64, None),
    ("documents_bidirectional", "document(torch.tensor([[0] * 20 + [1] * 28 + [2] * 16]))", 64, 64, None),
    ("padding", "causal() & padding(torch.tensor([48]))", 64, 64, None),
    ("window_sinks", 'causal() & (sliding_window(12) | mask(lambda b, h, q, kv: kv < 4, name="sinks"))', 64, 64, None),
    ("dilated", 'causal() & mask(lambda b, h, q, kv: (q - kv) % 4 == 0, name="dilated")', 64, 64, None),
    ("not_causal", "~causal()", 64, 64, None),
    ("kv_cache", "sliding_window(32)", 16, 64, None),
    ("per_head", 'causal() & mask(lambda b, h, q, kv: q - kv < 8 * (h + 1), name="window_per_head")', 64, 64, 4),
    ("long_context", "sliding_window(4096) | (chunked(16384) & causal())", 65536, 65536, None),
]


def _mask_figure(expr: str, q_len: int, kv_len: int, heads: int | None):
    return plot(eval_expression(expr), q_len, kv_len, heads=heads)


def _attention_figure():
    import flexmask as fm

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 48, 32, generator=gen)
    k = torch.randn(1, 4, 48, 32, generator=gen)
    return plot_attention(q, k, mask=fm.causal() & fm.sliding_window(24), bias=fm.alibi(4))


def _layers_figure():
    import flexmask as fm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 48, 16, generator=gen)
    per_head = fm.mask(lambda b, h, q, kv: q - kv < 6 * (h + 1), name="window_per_head")
    masks = [fm.causal(), fm.causal() & fm.sliding_window(12), fm.chunked(16) & fm.causal(), fm.causal() & per_head]
    with record_masks() as rec:  # a toy 4-layer "model": one flexmask.attention call per layer
        for m in masks:
            x = fm.attention(x, x, x, mask=m)
    return plot_layers(rec)


def figures() -> dict[str, Callable]:
    """Slug → a function drawing that gallery picture."""
    out: dict[str, Callable] = {
        slug: (lambda e=expr, q=q_len, kv=kv_len, h=heads: _mask_figure(e, q, kv, h))
        for slug, expr, q_len, kv_len, heads in MASKS
    }
    out["attention"] = _attention_figure
    out["layers"] = _layers_figure
    return out


def render(slug: str) -> bytes:
    """The PNG bytes of one gallery picture."""
    buf = io.BytesIO()
    figures()[slug]().savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def on_files(files, config):
    """Add the gallery PNGs to the build; keep this hook (and its bytecode) out of the site."""
    from mkdocs.structure.files import File

    for f in list(files):
        if f.src_uri == "gallery_hook.py" or f.src_uri.startswith("__pycache__/"):
            files.remove(f)
    for slug in figures():
        files.append(File.generated(config, f"{IMAGE_DIR}/{slug}.png", content=render(slug)))
    return files


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "gallery")
    out_dir.mkdir(parents=True, exist_ok=True)
    for slug in figures():
        path = out_dir / f"{slug}.png"
        path.write_bytes(render(slug))
        print(f"wrote {path}")
