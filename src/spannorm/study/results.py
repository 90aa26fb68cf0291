"""A study's results: one results.csv row per cell, each (series, depth)'s best learning rate and stable
range, the second phase that the best lrs give (:func:`follow_ups`), and seed groups (:func:`aggregate`)."""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_write_text, read_json, shape_problem
from ..run import SUMMARY_FIELDS
from .grid import Cell, Follow, Plan, canonical, expand, series_label

RESULT_COLUMNS = (
    "steps",
    "max_steps",
    "tokens",
    "final_val_loss",
    "final_loss",
    "diverged",
    "diverged_step",
    "diverged_reason",
    "stalled",
    "unigram_entropy",
    "tokens_per_s",
    "n_params",
    "wall_s",
    "status",
    "guard_skipped",
    "guard_rollbacks",
)  # the guard's columns: empty unless train.guard.enabled=true


CELL_FIELDS = {"wall_s": "number?"}  # cell.json: the wall time of the session that finished the cell
PROBE_FIELDS = {  # probe.json: the probe of a cell's final model (spannorm.probe), what the report reads of it
    "stream_rms": "numbers",
    "layer_drop": "numbers",
    "grad_ratio_first_last": "number?",
}


def cell_result(cell: Cell, out: Path, error: str | None = None) -> dict:
    """One row of results.csv for ``cell``, read from its run directory."""
    run_dir = out / "cells" / cell.name
    row: dict[str, Any] = {
        "name": cell.name,
        "grid": "+".join(cell.grids),
        **cell.axes,
        "max_steps": cell.cfg.train.max_steps,
    }
    summary_path = run_dir / "summary.json"
    if error == "not run":
        return row | {"status": "not run"}
    if error is not None or not summary_path.is_file():
        return row | {"status": "failed: " + (error or "no summary.json")}
    again = "delete it and run the study again to write it again"
    # (what a row needs: summaries of older versions lack some of today's keys)
    s = read_json(
        summary_path, again, lambda s: shape_problem(s, SUMMARY_FIELDS, ("steps", "final_val_loss", "diverged"))
    )
    cell_json = run_dir / "cell.json"
    wall = None
    if cell_json.is_file():
        wall = read_json(cell_json, again, lambda c: shape_problem(c, CELL_FIELDS, tuple(CELL_FIELDS)))["wall_s"]
    t = cell.cfg.train
    row |= {k: s.get(k) for k in RESULT_COLUMNS if k in s}
    row |= {
        "tokens": s.get("tokens", s["steps"] * t.batch_size * t.seq_len),  # (a summary before it had tokens)
        "wall_s": wall,
        "status": "diverged" if s["diverged"] else "stalled" if s.get("stalled") else "ok",
    }
    return row


def write_results(path: Path, cells: list[Cell], rows: list[dict]) -> None:
    axes = list(dict.fromkeys(p for c in cells for p in c.axes))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["name", "grid", *axes, *RESULT_COLUMNS], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def read_probe(out: Path, cell: Cell) -> dict | None:
    """The probe of ``cell``'s trained model (its probe.json), or None if it has none."""
    path = out / "cells" / cell.name / "probe.json"
    fix = "delete it and run the study again to write it again"
    return read_json(path, fix, lambda p: shape_problem(p, PROBE_FIELDS)) if path.is_file() else None


# --- the best learning rate (second phase) -------------------------------------------------

STABLE_MARGIN = 0.05  # nats: an lr whose val loss is within this of the best lr's is in the stable range


def _trained(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("final_val_loss") not in (None, "")


def best_lr(by_lr: dict[float, dict]) -> float | None:
    """The rule, fixed before the data: of one (series, depth)'s first-seed results ({lr: results.csv row}),
    the lr with the lowest final val loss among the cells neither diverged nor stalled; None if none is."""
    vals = {lr: float(r["final_val_loss"]) for lr, r in by_lr.items() if _trained(r)}
    return min(vals, key=lambda lr: (vals[lr], lr)) if vals else None


def stable_lrs(by_lr: dict[float, dict]) -> list[float]:
    """The lrs that trained (neither diverged nor stalled) to within STABLE_MARGIN of the best lr's val loss."""
    best = best_lr(by_lr)
    if best is None:
        return []
    top = float(by_lr[best]["final_val_loss"]) + STABLE_MARGIN
    return sorted(lr for lr, r in by_lr.items() if _trained(r) and float(r["final_val_loss"]) <= top)


def first_seed(cells: list[Cell]) -> dict:
    """(series, depth, lr) -> the cell with the smallest seed."""
    out: dict = {}
    for c in sorted(cells, key=lambda c: c.cfg.train.seed):
        out.setdefault((c.series, *c.depth_lr), c)
    return out


def lr_points(cells: list[Cell], rows: list[dict]) -> dict:
    """(series, depth) -> {lr: the first seed's results.csv row}, for best_lr and stable_lrs."""
    row_of = {c.name: r for c, r in zip(cells, rows)}
    out: dict = {}
    for (series, depth, lr), c in sorted(first_seed(cells).items(), key=lambda kv: kv[0][2]):
        out.setdefault((series, depth), {})[lr] = row_of[c.name]
    return out


def best_lr_points(cells: list[Cell], rows: list[dict]) -> dict:
    """(series, depth) -> {lr: the first seed's row} for the points with 2+ lrs run (cells not run left out)."""
    done = [i for i, r in enumerate(rows) if r.get("status") != "not run"]
    points = lr_points([cells[i] for i in done], [rows[i] for i in done])
    return {k: v for k, v in points.items() if len(v) >= 2}


def follow_ups(plan: Plan, cells: list[Cell], rows: list[dict]) -> list[Cell]:
    """The first phase's ``cells`` (rows: their results) plus the second phase (:func:`best_lr_follow`)."""
    follow = best_lr_follow(plan, cells, rows)
    return expand(plan, follow) if follow else list(cells)


def best_lr_follow(plan: Plan, cells: list[Cell], rows: list[dict]) -> list[Follow]:
    """The second phase: for each grid with best_lr_seeds, each (series, depth) of its cells whose first-seed
    cells have all finished gets cells for those seeds at its best_lr. A pure function of the results, so a
    resumed study finds the same ones."""
    follow: list[Follow] = []
    for grid in plan.study.grids:
        if not grid.best_lr_seeds:
            continue
        mine = [i for i, c in enumerate(cells) if grid.name in c.grids]
        firsts = first_seed([cells[i] for i in mine])
        for (series, depth), by_lr in lr_points([cells[i] for i in mine], [rows[i] for i in mine]).items():
            if any(r.get("status") not in ("ok", "stalled", "diverged") for r in by_lr.values()):
                continue  # a first-seed cell failed or is not run yet: no best lr so far
            best = best_lr(by_lr)
            if best is not None:
                cell = firsts[(series, depth, best)]
                follow += [
                    Follow(grid, {p: cell.axes[p] for p in grid.axes} | {"train.seed": s}) for s in grid.best_lr_seeds
                ]
    return follow


# --- seed groups ---------------------------------------------------------------------------


@dataclass
class SeedGroup:
    """The cells of one point (e.g. a (series, depth, lr)), one per seed, and their results.csv rows."""

    cells: list[Cell]
    rows: list[dict]

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def vals(self) -> list[float]:
        return [
            r["final_val_loss"]
            for r in self.rows
            if r.get("status") in ("ok", "stalled") and r.get("final_val_loss") is not None
        ]

    def count(self, status: str) -> int:
        return sum(r.get("status", "").startswith(status) for r in self.rows)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.vals) if self.vals else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.vals) if len(self.vals) > 1 else None

    @property
    def failed(self) -> bool:
        """Diverged or stalled in the majority of seeds."""
        return self.count("diverged") + self.count("stalled") > self.n / 2

    def text(self) -> str:
        if self.count("failed") == self.n:
            return "failed"
        parts = []
        if self.mean is not None:
            parts.append(f"{self.mean:.3f}" + (f" ± {self.std:.3f}" if self.std is not None else ""))
        for status, label in (("diverged", "div"), ("stalled", "stalled"), ("failed", "failed")):
            if self.count(status):
                parts.append(f"{label} ({self.count(status)}/{self.n})")
        return " ".join(parts)


def aggregate(cells: list[Cell], rows: list[dict], key) -> dict:
    """Group (cell, row) pairs by ``key(cell)`` (None: left out) into SeedGroups; cells not run yet are left out."""
    groups: dict = {}
    for cell, row in zip(cells, rows):
        k = key(cell)
        if k is not None and row.get("status") != "not run":
            groups.setdefault(k, SeedGroup([], [])).cells.append(cell)
            groups[k].rows.append(row)
    return groups


SCALING_AXES = ("model.span.scale", "model.span.c")  # the axes of a SpanNorm scaling ablation (as canonical() keys)


def scaling_series(c: Cell, depths: set[int]) -> str | None:
    """The SpanNorm scaling of a dense span cell (no extra axes but model.span.scale and span.c) at one of the
    scaling ablation's ``depths`` (:func:`scaling_depths`), e.g. "span span_scale=norm span_c=1" for the
    default span of another grid; else None."""
    if not _dense_span(c) or c.cfg.model.n_layers not in depths:
        return None
    span = c.cfg.model.span
    return series_label("span", {"model.span.scale": span.scale.value, "model.span.c": span.c})


def _dense_span(c: Cell) -> bool:
    return c.cfg.model.scheme.value == "span" and all(p in SCALING_AXES for p in canonical(c.extras))


def scaling_depths(cells: list[Cell]) -> set[int]:
    """The depths of the study's SpanNorm scaling ablation: those of its dense span cells in a grid with a
    model.span.scale or span.c axis (none: the study has no such grid)."""
    return {c.cfg.model.n_layers for c in cells if _dense_span(c) and any(p in canonical(c.axes) for p in SCALING_AXES)}
