"""The report of a benchmark: tables of typed columns, printed as markdown and written as
markdown + JSON (``--out FILE`` gives ``FILE.md`` and ``FILE.json``), rewritten after every row so
that an interrupted run keeps what it measured.

Cells hold numbers (formatted by their column's kind), :class:`~.harness.Timing` summaries (their
median is shown, the JSON keeps median, 20th and 80th percentile and count) or
:class:`~.harness.Note` text (``error: ...``, ``skipped (...)``, ``OOM``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import Note, Timing

Row = dict[str, Any]


@dataclass
class Column:
    """A table column: the row key it shows, its title and how to format it."""

    key: str
    title: str
    kind: str  # "ms", "s", "x", "pct", "signed_pct", "mib", "gib", "int", "text"


def value(x: Any) -> Any:
    """A measurement's headline number: the median of a :class:`Timing`, else ``x``."""
    return x.median if isinstance(x, Timing) else x


def number(x: Any) -> float | None:
    """A cell as a float, or ``None`` for notes and missing cells."""
    x = value(x)
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def ratio(num: Any, den: Any) -> float | Note:
    """``num / den`` of two cells, or the note ``-`` when either is not a number.

    Examples:
        >>> ratio(Timing.of([4.0]), 2.0), ratio(Note("error: x"), 2.0)
        (2.0, '-')
    """
    a, b = number(num), number(den)
    if a is None or b is None or b <= 0:
        return Note("-")
    return a / b


def percent(part: Any, whole: Any) -> float | Note:
    """``100 · part / whole`` of two cells, or the note ``-``."""
    r = ratio(part, whole)
    return r * 100.0 if isinstance(r, float) else r


def fmt(x: Any, kind: str) -> str:
    """One cell as text.

    Examples:
        >>> fmt(0.01234, "ms"), fmt(3.0, "x"), fmt(Note("error: a | b"), "ms")
        ('0.0123', '3.00x', 'error: a / b')
    """
    if x is None:
        return "-"
    if isinstance(x, str):
        text = str(x).replace("|", "/").replace("\n", " ")
        return text if len(text) <= 90 else text[:87] + "..."
    x = value(x)
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
    if kind == "gib":
        return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"
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
    """Rows as a markdown table; cells hold numbers (formatted by column kind) or notes.

    Examples:
        >>> print(markdown_table([Column("a", "A", "ms")], [{"a": 1.5}]))
        | A |
        |---|
        | 1.50 |
    """
    head = "| " + " | ".join(c.title for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(row.get(c.key), c.kind) for c in columns) + " |" for row in rows]
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
        """A new table; returns its (live) list of rows."""
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
        """Write ``OUT.md`` and ``OUT.json`` (nothing without ``--out``)."""
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.with_suffix(".md").write_text(self.markdown())
        self.out.with_suffix(".json").write_text(json.dumps(self.as_json(), indent=1))
