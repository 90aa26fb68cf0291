"""The house style of every figure spannorm writes (compare, probe, study): the pyplot it draws with, panels in
rows of at most three, one legend beside the figure, the unigram line, integer ticks on integer axes, and PNGs
in 256 colours, written atomically.

A plot answers one question; these helpers keep the answer readable where the figure is embedded (a report's
width): no long strips of panels, no legend hidden in one panel, a stalled run labelled as such."""

from __future__ import annotations

import io
import math
from pathlib import Path

from .files import atomic_write_bytes

UNIGRAM_LABEL = "unigram entropy (a run here stalled)"


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
    rgb = Image.open(io.BytesIO(png)).convert("RGB")
    rgb.quantize(256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG")  # (octree: 3× faster than median cut)
    return buf.getvalue()


def panel_grid(plt, n: int, width: float, height: float, sharey: bool = False):
    """A figure of ``n`` panels of ``width`` × ``height`` inches in rows of at most 3 (a long strip of panels does
    not read where it is embedded), the unused ones hidden. Returns (figure, 2-d array of axes)."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharey=sharey)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    for ax in axes.flat:
        ax.yaxis.set_tick_params(labelleft=True)  # (shared or not, every panel keeps its scale's labels)
    return fig, axes


def figure_legend(fig, axes) -> None:
    """One legend for the whole figure, beside it: every label drawn in any panel, once."""
    handles = {}
    for ax in getattr(axes, "flat", axes):
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    if handles:
        fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def unigram_line(ax, unigram: float | None) -> None:
    """The loss of a model that learned only token frequencies, labelled: where a stalled run ends."""
    if unigram is not None:
        ax.axhline(unigram, color="0.5", linestyle="--", linewidth=1, label=UNIGRAM_LABEL)


def integer_ticks(axis) -> None:
    """Integer ticks only, on an axis of whole numbers (blocks, layers, steps)."""
    from matplotlib.ticker import MaxNLocator  # (matplotlib: imported only when a plot is drawn)

    axis.set_major_locator(MaxNLocator(integer=True))


def log_y(ax) -> None:
    """A log y axis whose ticks read as plain numbers (1.05, 1.2, 0.4) where the data span less than two decades,
    instead of 1.2×10⁰ (the default labels only powers of ten, and their mantissas where it has too few)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator  # (only when a plot is drawn)

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if not 0 < low < high < 100 * low:
        return
    # within a decade: evenly spaced round values; within two: 1, 2, 5 times the powers of ten
    ax.yaxis.set_major_locator(MaxNLocator(6) if high < 10 * low else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
