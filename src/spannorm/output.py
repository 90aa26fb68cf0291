"""The idioms of what spannorm prints and writes: Markdown tables, numbers, figures.

One helper each, so every table, report and plot formats the same way."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes

MISSING = "—"  # a cell with no value


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: a header row, the separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def num(x: float | None, spec: str = ".3g") -> str:
    """A number in ``spec`` format, or — when there is none."""
    return MISSING if x is None else format(x, spec)


def lr(x: float) -> str:
    """A learning rate as 1e-3 or 2.5e-3."""
    mantissa, exp = f"{x:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def value(v: Any) -> str:
    """A config value as it is written in a cell's name or an override: true, 0.001, pre."""
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)


def pyplot():
    """matplotlib.pyplot with the non-interactive backend (no display is needed)."""
    import matplotlib  # imported here: matplotlib takes a second to import, and only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 100, tight: bool = False, layout: bool = True) -> None:
    """Lay out ``fig`` (tight_layout; ``layout=False`` keeps a layout set by hand), write it to ``path`` as a
    PNG (atomically) and close it. ``tight`` crops to the drawn area, so that a legend placed beside the axes
    is kept."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        if layout:
            fig.tight_layout()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)  # (also when it cannot be drawn: pyplot keeps every figure it opened until closed)
    atomic_write_bytes(path, palette_png(buf.getvalue()))


def palette_png(png: bytes) -> bytes:
    """``png`` in 256 colours (a plot has few; its antialiased edges lose nothing one can see): 2-3 times
    smaller than matplotlib's RGBA, which matters for the plots a repository commits."""
    from PIL import Image  # (matplotlib's own dependency)

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(buf, format="PNG")
    return buf.getvalue()
