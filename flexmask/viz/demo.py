"""The images of ``python -m flexmask demo``: one PNG per named mask."""

from __future__ import annotations

import re
from pathlib import Path

from . import _core, _mpl
from .draw import plot


def save_demo_images(examples: dict[str, _core.Mask], n: int, out_dir: str | Path) -> list[Path]:
    """Draw each named mask at ``n × n`` into ``out_dir/<name>.png``; returns the paths written.

    Examples:
        >>> import tempfile, flexmask as fm
        >>> from flexmask.viz import save_demo_images
        >>> [p.name for p in save_demo_images({"causal & window": fm.causal()}, 64, tempfile.mkdtemp())]
        ['causal_window.png']
    """
    _mpl.require("flexmask.viz.save_demo_images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, m in examples.items():
        stem = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "mask"
        path = out / f"{stem}.png"
        k = 2
        while path in paths:
            path, k = out / f"{stem}_{k}.png", k + 1
        plot(m, n, n, title=name).savefig(path, dpi=120)
        paths.append(path)
    return paths
