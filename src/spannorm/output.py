"""The idioms of what spannorm prints and writes: Markdown tables and numbers (figures: spannorm.plotting).

One helper each, so every table and report formats the same way."""

from __future__ import annotations

from typing import Any

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
