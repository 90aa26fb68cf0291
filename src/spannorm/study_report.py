"""The report of a ``spannorm study``: tables (mean ± std over seeds), plots, the learning-rate
sensitivity of SpanNorm's scalings, and a verdict on each of the six claims of SPANNORM.md.

Everything here reads a study directory (``cells/*/summary.json``, ``metrics.jsonl``,
``probe.json``) and writes nothing but plots, ``init_probe.json`` and the report text; the
training side is :mod:`spannorm.study`.
"""

from __future__ import annotations

import copy
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import to_dict
from .files import atomic_write_bytes, atomic_write_text, dumps, read_jsonl
from .run import run_config_from_dict
from .study import (
    CORE,
    PROBE_BATCH,
    STABLE_MARGIN,
    Cell,
    Grid,
    StudyConfig,
    _fmt,
    _leaf,
    _set,
    base_config,
    best_lr,
    first_seed,
    lr_points,
    stable_lrs,
)
from .train import STALL_MARGIN


@dataclass
class Agg:
    """A (series, depth, lr) point over its seeds."""

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
    """Group (cell, row) pairs by ``key(cell)`` (None: left out) into Agg points; cells not run yet are left out."""
    groups: dict = {}
    for cell, row in zip(cells, rows):
        k = key(cell)
        if k is not None and row.get("status") != "not run":
            groups.setdefault(k, Agg([], [])).cells.append(cell)
            groups[k].rows.append(row)
    return groups


def _depth_lr(cell: Cell) -> tuple[int, float]:
    return cell.cfg.model.n_layers, cell.cfg.train.lr


def grid_table(grid: Grid, cells: list[Cell], rows: list[dict]) -> str:
    """Rows: scheme and the grid's other non-core axes; columns: depth × lr; entries: mean ± std over seeds."""
    others = [p for p in grid.axes if p not in CORE]

    def label(c: Cell) -> str:
        return " ".join([c.cfg.model.scheme.value] + [f"{_leaf(p)}={_fmt(c.axes[p])}" for p in others])

    points = aggregate(cells, rows, lambda c: (label(c), *_depth_lr(c)) if grid.name in c.grids else None)
    labels = list(dict.fromkeys(k[0] for k in points))
    cols = sorted({k[1:] for k in points})
    return md_table(
        ["series"] + [f"L={d}, lr={lr:g}" for d, lr in cols],
        [[lab] + [points[(lab, *c)].text() if (lab, *c) in points else "" for c in cols] for lab in labels],
    )


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


# --- plots ---------------------------------------------------------------------------------


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # "tight" keeps a legend beside the axes
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plotted_series(cells: list[Cell]) -> list[str]:
    """The series that sweep depth (a plot of an ablation's one-depth series would only clutter)."""
    depths: dict[str, set] = {}
    for c in cells:
        depths.setdefault(c.series, set()).add(c.cfg.model.n_layers)
    return [s for s, d in depths.items() if len(d) > 1] or list(depths)


def plot_val(path: Path, cells: list[Cell], rows: list[dict], x: str, key=None, best: dict | None = None) -> bool:
    """Validation loss against depth (x='depth', one panel per lr) or lr (one panel per depth), one line
    per series: ``key(cell)`` (default: the series that sweep depth; None leaves a cell out). ``best``
    ({(series, depth): lr}, x='lr'): mark those lrs, and the points diverged or stalled in most seeds
    at the unigram line."""
    if key is None:
        swept = plotted_series(cells)
        key = lambda c: c.series if c.series in swept else None  # noqa: E731
    points = aggregate(cells, rows, lambda c: (key(c), *_depth_lr(c)) if key(c) else None)
    series = list(dict.fromkeys(k[0] for k in points))
    panel_of = (lambda k: k[2]) if x == "depth" else (lambda k: k[1])
    x_of = (lambda k: k[1]) if x == "depth" else (lambda k: k[2])
    panels = sorted({panel_of(k) for k in points})
    if not panels:
        return False
    unigram = next((r["unigram_entropy"] for r in rows if r.get("unigram_entropy") is not None), None)
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if unigram is not None:  # the level of a model that learned only token frequencies
            ax.axhline(unigram, color="0.6", linestyle="--", linewidth=1, label="unigram entropy (stalled)")
        for i, s in enumerate(series):
            color = f"C{i % 10}"  # the same in every panel
            ks = sorted(
                (k for k in points if k[0] == s and panel_of(k) == panel and points[k].mean is not None), key=x_of
            )
            if ks:
                ax.errorbar(
                    [x_of(k) for k in ks],
                    [points[k].mean for k in ks],
                    yerr=[points[k].std or 0.0 for k in ks],
                    marker="o",
                    capsize=3,
                    label=s,
                    color=color,
                )
            if best is None:
                continue
            bad = [x_of(k) for k in points if k[0] == s and panel_of(k) == panel and points[k].failed]
            if bad and unigram is not None:
                ax.plot(bad, [unigram] * len(bad), "x", color=color, markersize=9)
            b = points.get((s, panel, best.get((s, panel))))
            if b is not None and b.mean is not None:
                ax.plot([best[(s, panel)]], [b.mean], "*", color=color, markersize=14)
        if best is not None:  # legend entries of the marks
            ax.plot([], [], "k*", markersize=10, label="best lr")
            ax.plot([], [], "kx", label="diverged or stalled (drawn at the unigram line)")
        ax.set_title(f"lr {panel:g}" if x == "depth" else f"L = {panel}")
        ax.set_xlabel("depth L" if x == "depth" else "peak learning rate")
        ax.set_xscale("log")
        ticks = sorted({x_of(k) for k in points if panel_of(k) == panel})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_ylabel("final val loss (nats/token)")
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("validation loss (mean ± std over seeds; diverged cells left out)", fontsize=9)
    _save(fig, path)
    return True


def plot_curves(path: Path, cells: list[Cell], out: Path) -> bool:
    """Training loss curves, one panel per (depth, lr), one line per series (the smallest seed)."""
    from .run import read_metrics

    series = plotted_series(cells)
    firsts = {k: c for k, c in first_seed(cells).items() if k[0] in series}
    panels = sorted({k[1:] for k in firsts})
    if not panels:
        return False
    plt = _plt()
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        top = 0.0
        for s in series:
            if (s, *panel) in firsts:
                rows = read_metrics(out / "cells" / firsts[(s, *panel)].name)
                ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=s)
                if rows and rows[0]["loss"] is not None and math.isfinite(rows[0]["loss"]):
                    top = max(top, rows[0]["loss"])
        if top:
            ax.set_ylim(top=top * 1.1)
        ax.set_title(f"L = {panel[0]}, lr {panel[1]:g}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)
    return True


def best_lr_points(cells: list[Cell], rows: list[dict]) -> dict:
    """(series, depth) -> {lr: the first seed's row} for the points with 2+ lrs run (cells not run left out)."""
    done = [i for i, r in enumerate(rows) if r.get("status") != "not run"]
    points = lr_points([cells[i] for i in done], [rows[i] for i in done])
    return {k: v for k, v in points.items() if len(v) >= 2}


def _lr(x: float) -> str:
    """A learning rate as 1e-3 or 2.5e-3."""
    mantissa, exp = f"{x:.3e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def best_lr_table(cells: list[Cell], rows: list[dict]) -> str:
    """Markdown: each (series, depth)'s best lr (best_lr), its val loss over all seeds, its stable range
    (stable_lrs), and the lrs that diverged or stalled; "" if no series has 2+ lrs at a depth."""
    points = best_lr_points(cells, rows)
    aggs = aggregate(cells, rows, lambda c: (c.series, *_depth_lr(c)))
    table = []
    for (series, depth), by_lr in sorted(points.items(), key=lambda kv: kv[0][1]):
        bad = (
            ", ".join(
                f"{_lr(lr)} {'div' if r['status'] == 'diverged' else 'stalled'}"
                for lr, r in by_lr.items()
                if r.get("status") in ("diverged", "stalled")
            )
            or "—"
        )
        best = best_lr(by_lr)
        if best is None:
            table.append([series, str(depth), "none", "—", "—", bad])
            continue
        a, stable = aggs[(series, depth, best)], stable_lrs(by_lr)
        span = _lr(stable[0]) + (f" – {_lr(stable[-1])}" if len(stable) > 1 else "")
        table.append(
            [series, str(depth), _lr(best), f"{a.text()} (n={a.n})", f"{span} ({len(stable)} of {len(by_lr)})", bad]
        )
    if not table:
        return ""
    return md_table(["series", "L", "best lr", "val loss at the best lr", "stable range", "diverged or stalled"], table)


def plot_best_lr(path: Path, cells: list[Cell], rows: list[dict]) -> bool:
    """Validation loss against lr for each series with 2+ lrs, one panel per depth, its best lr marked."""
    points = best_lr_points(cells, rows)
    best = {k: best_lr(v) for k, v in points.items()}
    return bool(points) and plot_val(
        path,
        cells,
        rows,
        "lr",
        best=best,
        key=lambda c: c.series if (c.series, c.cfg.model.n_layers) in points else None,
    )


def _deepest(cells: list[Cell]) -> int:
    return max(c.cfg.model.n_layers for c in cells)


def plot_grad_heatmaps(path: Path, cells: list[Cell], out: Path) -> bool:
    """log10 per-block gradient norm (block × step) of each series at the deepest depth, one column per lr."""
    import numpy as np

    series = plotted_series(cells)
    depth = _deepest(cells)
    firsts = {k: c for k, c in first_seed(cells).items() if k[0] in series and k[1] == depth}
    grids = {}
    for k, c in firsts.items():
        rows = read_jsonl(out / "cells" / c.name / "diagnostics.jsonl")
        if rows:
            grid = np.log10(np.maximum(np.array([r["grad_norm"] for r in rows], dtype=float).T, 1e-30))
            grids[k] = (grid, rows[0]["step"], rows[-1]["step"])
    if not grids:
        return False
    names = [s for s in series if any(k[0] == s for k in grids)]
    lrs = sorted({k[2] for k in grids})
    finite = np.concatenate([g[np.isfinite(g)] for g, _, _ in grids.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-3.0, 1.0)
    plt = _plt()
    fig, axes = plt.subplots(len(names), len(lrs), figsize=(4 * len(lrs) + 1, 2.2 * len(names) + 0.8), squeeze=False)
    im = None
    for i, s in enumerate(names):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            if (s, depth, lr) not in grids:
                ax.axis("off")
                continue
            grid, first, last = grids[(s, depth, lr)]
            im = ax.imshow(
                grid,
                aspect="auto",
                origin="lower",
                vmin=vmin,
                vmax=vmax,
                extent=(first, max(last, first + 1), 0.5, grid.shape[0] + 0.5),
            )
            ax.set_title(f"{s}, lr {lr:g}", fontsize=8)
            ax.set_ylabel("block", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.subplots_adjust(hspace=0.5, right=0.85)
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 grad norm")
    fig.suptitle(f"per-block gradient norm during training, L = {depth} (x: step)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def read_probe(out: Path, cell: Cell) -> dict | None:
    path = out / "cells" / cell.name / "probe.json"
    return json.loads(path.read_text()) if path.is_file() else None


def plot_similarity(path: Path, cells: list[Cell], out: Path) -> bool:
    """Series × block heatmaps at the deepest depth from probe.json: adjacent cosine and layer drop
    (mean over seeds), one column per lr."""
    import numpy as np

    series = plotted_series(cells)
    depth = _deepest(cells)
    probes: dict = {}
    for c in cells:
        if c.series in series and c.cfg.model.n_layers == depth and (p := read_probe(out, c)):
            probes.setdefault((c.series, c.cfg.train.lr), []).append(p)
    if not probes:
        return False
    names = [s for s in series if any(k[0] == s for k in probes)]
    lrs = sorted({k[1] for k in probes})
    plt = _plt()
    fig, axes = plt.subplots(2, len(lrs), figsize=(5 * len(lrs) + 1, 0.35 * len(names) * 2 + 2.5), squeeze=False)
    for j, lr in enumerate(lrs):
        for i, (key, title, cmap) in enumerate(
            (
                ("adjacent_cosine", "cosine(block l, block l+1)", "viridis"),
                ("layer_drop", "val loss increase without block l", "magma"),
            )
        ):
            width = depth - 1 if key == "adjacent_cosine" else depth
            grid = np.full((len(names), width), np.nan)
            for r, s in enumerate(names):
                ps = [p[key] for p in probes.get((s, lr), []) if p.get(key)]
                if ps:
                    grid[r] = np.mean(np.array(ps, dtype=float), axis=0)
            ax = axes[i][j]
            im = ax.imshow(
                grid,
                aspect="auto",
                cmap=cmap,
                interpolation="nearest",
                extent=(0.5, width + 0.5, len(names) - 0.5, -0.5),
            )
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xlabel("block l", fontsize=8)
            ax.set_title(f"{title}, L = {depth}, lr {lr:g}", fontsize=8)
            fig.colorbar(im, ax=ax)
    _save(fig, path)
    return True


# --- init probe (claims 1 and 2) -----------------------------------------------------------

INIT_VARIANTS = {
    "pre": {"scheme": "pre"},
    "post": {"scheme": "post"},
    "span": {"scheme": "span"},
    "span span_scale=none": {"scheme": "span", "span_scale": "none"},
}


def init_probe(study_base: dict, depths: list[int], path: Path) -> list[dict]:
    """``diagnostics.probe`` of fresh models (pre, post, span, span without scaling) at the study's depths
    and model size; cached in ``path`` for the same inputs."""
    import dataclasses

    import torch

    from .data import TokenData, prepare
    from .model import build_model
    from .probe import probe

    cfg = run_config_from_dict(copy.deepcopy(study_base))
    key = {
        "model": to_dict(cfg.model),
        "data": to_dict(cfg.data),
        "seed": cfg.train.seed,
        "seq_len": cfg.train.seq_len,
        "depths": depths,
        "variants": INIT_VARIANTS,
    }
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["runs"]
    x, y = next(TokenData(prepare(cfg.data), cfg.train.seq_len).val_batches(PROBE_BATCH, 1))
    runs = []
    for label, change in INIT_VARIANTS.items():
        for depth in depths:
            torch.manual_seed(cfg.train.seed)
            model = build_model(dataclasses.replace(cfg.model, n_layers=depth, **change))
            row = probe(model, x, y)
            runs.append(
                {
                    "variant": label,
                    **{
                        k: row[k]
                        for k in ("depth", "stream_rms", "presum_rms", "grad_ratio_first_last", "skip_gain_measured")
                    },
                }
            )
    atomic_write_text(path, dumps({"key": key, "runs": runs}))
    return runs


# --- claims --------------------------------------------------------------------------------

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass
class Claim:
    verdict: str
    evidence: str
    rule: str


def _series_name(scheme: str, extras: dict) -> str:
    return " ".join([scheme] + [f"{_leaf(k)}={_fmt(v)}" for k, v in extras.items()])


def _max_presum(p: dict) -> float:
    return max(v for block in p["presum_rms"] for v in block.values())


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def claim_stability(points: dict, extras: dict) -> Claim:
    post, span = _series_name("post", extras), _series_name("span", extras)
    rule = (
        f"supported if at every (depth, lr) where {post} diverged or stalled in most seeds, {span} trained "
        "(neither diverged nor stalled in most seeds); inconclusive if there is no such point"
    )
    bad = sorted(k[1:] for k, a in points.items() if k[0] == post and a.failed)
    if not any(k[0] == post for k in points) or not any(k[0] == span for k in points):
        return Claim(INCONCLUSIVE, f"the study has no {post} or no {span} cells", rule)
    if not bad:
        return Claim(INCONCLUSIVE, f"{post} neither diverged nor stalled at any (depth, lr)", rule)
    ev, ok = [], []
    for d, lr in bad:
        p, s = points[(post, d, lr)], points.get((span, d, lr))
        trained = s is not None and not s.failed
        ok.append(trained)
        ev.append(
            f"L={d}, lr={lr:g}: {post} {p.text()}; {span} "
            + ("(no cell)" if s is None else s.text() + (" — trained" if trained else " — failed too"))
        )
    return Claim(SUPPORTED if all(ok) else NOT_SUPPORTED, "; ".join(ev), rule)


def _best_lr(points: dict, pre: str, span: str) -> str:
    """Evidence beside the rule: each depth's best (lowest mean val loss) lr of either series, among those
    that trained."""
    best = {}
    for (series, d, lr), a in points.items():
        if series in (pre, span) and a.mean is not None and not a.failed:
            if (series, d) not in best or a.mean < best[(series, d)][0]:
                best[(series, d)] = (a.mean, lr)
    depths = sorted({d for s, d in best if (pre, d) in best and (span, d) in best})
    return (
        ""
        if not depths
        else ". At each depth's best lr: "
        + "; ".join(
            f"L={d}: {pre} {best[(pre, d)][0]:.3f} (lr={best[(pre, d)][1]:g}), {span} {best[(span, d)][0]:.3f} "
            f"(lr={best[(span, d)][1]:g})"
            for d in depths
        )
    )


def claim_quality(points: dict, extras: dict) -> Claim:
    pre, span = _series_name("pre", extras), _series_name("span", extras)
    rule = (
        f"at each (depth, lr) with finite losses for both, {span} wins if its mean val loss is below {pre}'s "
        "by more than the larger seed std, loses if above by more; supported if it wins at more than half of "
        "the points, not supported if it loses at half or more, else inconclusive; needs 2+ seeds"
    )
    common = sorted(k[1:] for k in points if k[0] == span and (pre, *k[1:]) in points)
    rows, wins, losses, one_seed = [], 0, 0, False
    for d, lr in common:
        a, b = points[(pre, d, lr)], points[(span, d, lr)]
        if a.mean is None or b.mean is None:
            rows.append(f"L={d}, lr={lr:g}: {pre} {a.text()}, {span} {b.text()}")
            continue
        if a.std is None or b.std is None:
            one_seed = True
        noise = max(a.std or 0.0, b.std or 0.0)
        diff = a.mean - b.mean
        wins += diff > noise
        losses += -diff > noise
        spread = "one seed" if a.std is None and b.std is None else f"std {noise:.3f}"
        rows.append(f"L={d}, lr={lr:g}: {pre} {a.mean:.3f}, {span} {b.mean:.3f} (Δ={diff:+.3f}, {spread})")
    scored = sum(
        1 for d, lr in common if points[(pre, d, lr)].mean is not None and points[(span, d, lr)].mean is not None
    )
    if not scored:
        return Claim(INCONCLUSIVE, "; ".join(rows) or f"no (depth, lr) with both {pre} and {span}", rule)
    ev = (
        f"{span} lower at {wins}/{scored}, higher at {losses}/{scored}: "
        + "; ".join(rows)
        + _best_lr(points, pre, span)
    )
    if one_seed:
        return Claim(INCONCLUSIVE, "fewer than 2 finite seeds somewhere, so the seed noise is unknown; " + ev, rule)
    verdict = SUPPORTED if wins > scored / 2 else NOT_SUPPORTED if losses >= scored / 2 else INCONCLUSIVE
    return Claim(verdict, ev, rule)


def claim_collapse(cells: list[Cell], out: Path, extras: dict, ok: set[str]) -> Claim:
    pre, span = _series_name("pre", extras), _series_name("span", extras)
    rule = (
        f"at the deepest depth with probes of both that trained (neither diverged nor stalled: a stalled model's "
        f"layers say nothing about collapse), per lr (mean over seeds): {span} is less collapsed if its "
        "mean adjacent cosine over the deeper half of the blocks is lower AND its mean layer-drop loss increase "
        f"there is higher than {pre}'s; supported if so at more than half of the lrs, not supported if both "
        "favour PreNorm at half or more, else inconclusive"
    )
    probes: dict = {}
    for c in cells:
        if c.series in (pre, span) and c.name in ok and (p := read_probe(out, c)) and p.get("layer_drop"):
            probes.setdefault((c.series, *_depth_lr(c)), []).append(p)
    depths = sorted({k[1] for k in probes if (pre, *k[1:]) in probes and (span, *k[1:]) in probes})
    if not depths:
        return Claim(INCONCLUSIVE, f"no depth with trained-model probes of both {pre} and {span}", rule)
    depth = depths[-1]
    lrs = sorted(
        {k[2] for k in probes if k[1] == depth and (pre, depth, k[2]) in probes and (span, depth, k[2]) in probes}
    )

    def deep(ps: list[dict], key: str) -> float:
        return statistics.fmean(statistics.fmean(p[key][len(p[key]) // 2 :]) for p in ps)

    ev, good, bad = [], 0, 0
    for lr in lrs:
        a, b = probes[(pre, depth, lr)], probes[(span, depth, lr)]
        cos_a, cos_b = deep(a, "adjacent_cosine"), deep(b, "adjacent_cosine")
        drop_a, drop_b = deep(a, "layer_drop"), deep(b, "layer_drop")
        good += cos_b < cos_a and drop_b > drop_a
        bad += cos_b >= cos_a and drop_b <= drop_a
        ev.append(
            f"L={depth}, lr={lr:g}: adjacent cosine {pre} {cos_a:.3f} vs {span} {cos_b:.3f}, "
            f"layer drop {pre} {drop_a:.4f} vs {span} {drop_b:.4f}"
        )
    verdict = SUPPORTED if good > len(lrs) / 2 else NOT_SUPPORTED if bad >= len(lrs) / 2 else INCONCLUSIVE
    return Claim(verdict, "; ".join(ev), rule)


def _left_out(cells: list[Cell], out: Path, ok: set[str], schemes: tuple[str, ...], value) -> str:
    """Evidence from the probes of diverged or stalled cells, which the trained-model rules leave out."""
    bad = [
        f"{c.name} {_g(value(p))}"
        for c in cells
        if c.name not in ok and not c.extras and c.cfg.model.scheme.value in schemes and (p := read_probe(out, c))
    ]
    return ("; left out, diverged or stalled: " + ", ".join(bad)) if bad else ""


def claim_signal(cells: list[Cell], out: Path, init: list[dict], ok: set[str]) -> Claim:
    rule = (
        "needs 2+ depths; supported if SpanNorm's largest pre-norm-sum RMS (probes of the cells that trained, "
        "i.e. neither diverged nor stalled; mean over lrs and seeds) at the deepest depth is at most 2× that at the "
        "shallowest AND PreNorm's final stream RMS grows "
        "by at least 1.5× from the shallowest to the deepest; not supported if SpanNorm's grows by more than 2×; "
        "else inconclusive (init numbers are shown beside, for reference)"
    )
    trained: dict = {}
    for c in cells:
        if not c.extras and c.name in ok and c.cfg.model.scheme.value in ("pre", "span") and (p := read_probe(out, c)):
            trained.setdefault((c.cfg.model.scheme.value, c.cfg.model.n_layers), []).append(p)
    span_max = {d: statistics.fmean(_max_presum(p) for p in ps) for (s, d), ps in trained.items() if s == "span"}
    pre_rms = {d: statistics.fmean(p["stream_rms"][-1] for p in ps) for (s, d), ps in trained.items() if s == "pre"}
    init_span = {r["depth"]: _max_presum(r) for r in init if r["variant"] == "span"}
    init_pre = {r["depth"]: r["stream_rms"][-1] for r in init if r["variant"] == "pre"}
    ev = (
        "trained: span max pre-norm-sum RMS "
        + ", ".join(f"L={d}: {v:.3g}" for d, v in sorted(span_max.items()))
        + "; pre final stream RMS "
        + ", ".join(f"L={d}: {v:.3g}" for d, v in sorted(pre_rms.items()))
        + ". At init: span "
        + ", ".join(f"L={d}: {v:.3g}" for d, v in sorted(init_span.items()))
        + "; pre "
        + ", ".join(f"L={d}: {v:.3g}" for d, v in sorted(init_pre.items()))
        + _left_out(cells, out, ok, ("span",), _max_presum)
    )
    if len(span_max) < 2 or len(pre_rms) < 2:
        return Claim(INCONCLUSIVE, "fewer than 2 depths with trained probes of both pre and span. " + ev, rule)
    lo, hi = min(span_max), max(span_max)
    span_growth = span_max[hi] / span_max[lo]
    pre_growth = pre_rms[max(pre_rms)] / pre_rms[min(pre_rms)]
    ev = f"span grows {span_growth:.2f}×, pre {pre_growth:.2f}× (L={lo}→{hi}). " + ev
    if span_growth > 2:
        return Claim(NOT_SUPPORTED, ev, rule)
    return Claim(SUPPORTED if pre_growth >= 1.5 else INCONCLUSIVE, ev, rule)


def claim_gradients(cells: list[Cell], out: Path, init: list[dict], ok: set[str]) -> Claim:
    rule = (
        "supported if SpanNorm's first/last-block gradient-norm ratio stays within 10× of 1 at every depth "
        "(init probes, and probes of the cells that trained, i.e. neither diverged nor stalled) AND, at the deepest "
        "depth, PostNorm's or unscaled SpanNorm's is at least "
        "100× away from 1 (init or trained); not supported if SpanNorm's leaves the 10× band; else inconclusive"
    )
    deepest = max((r["depth"] for r in init), default=0)
    span_r = [r["grad_ratio_first_last"] for r in init if r["variant"] == "span"]
    other_r = [
        r["grad_ratio_first_last"]
        for r in init
        if r["variant"] in ("post", "span span_scale=none") and r["depth"] == deepest
    ]
    ev = ["at init: " + ", ".join(f"{r['variant']} L={r['depth']}: {_g(r['grad_ratio_first_last'])}" for r in init)]
    trained_span, trained_other = [], []
    for c in cells:
        scheme = c.cfg.model.scheme.value
        if (p := read_probe(out, c)) is None:
            continue
        if scheme == "span" and not c.extras and c.name in ok:
            trained_span.append(p["grad_ratio_first_last"])
        elif c.cfg.model.n_layers == deepest and (
            (scheme == "post" and not c.extras) or (scheme == "span" and c.extras == {"model.span_scale": "none"})
        ):
            trained_other.append(p["grad_ratio_first_last"])
    span_r += trained_span
    other_r += trained_other
    ev.append(
        "trained: span "
        + (", ".join(_g(x) for x in trained_span) or "—")
        + f"; post and unscaled span at L={deepest} "
        + (", ".join(_g(x) for x in trained_other) or "—")
        + _left_out(cells, out, ok, ("span",), lambda p: p["grad_ratio_first_last"])
    )

    def off(x: float) -> float:
        return abs(math.log10(x)) if x and math.isfinite(x) and x > 0 else math.inf

    if not span_r:
        return Claim(INCONCLUSIVE, "no probe of span", rule)
    if max(off(x) for x in span_r) > 1:
        return Claim(NOT_SUPPORTED, "; ".join(ev), rule)
    return Claim(SUPPORTED if other_r and max(off(x) for x in other_r) >= 2 else INCONCLUSIVE, "; ".join(ev), rule)


SCALING_AXES = ("model.span_scale", "model.span_c")  # the axes of a SpanNorm scaling ablation


def scaling_series(c: Cell) -> str | None:
    """The SpanNorm scaling of a cell in a span_scale/span_c grid (e.g. "span span_scale=init span_c=1"), else None."""
    if not any(p in c.axes for p in SCALING_AXES) or c.cfg.model.scheme.value != "span":
        return None
    return f"span span_scale={c.cfg.model.span_scale.value} span_c={_fmt(c.cfg.model.span_c)}"


def plot_ablation(path: Path, cells: list[Cell], rows: list[dict]) -> bool:
    """Validation loss against lr for each SpanNorm scaling, beside PreNorm, at the ablation's depths."""
    depths = {c.cfg.model.n_layers for c in cells if scaling_series(c)}
    return bool(depths) and plot_val(
        path,
        cells,
        rows,
        "lr",
        key=lambda c: scaling_series(c) or ("pre" if c.series == "pre" and c.cfg.model.n_layers in depths else None),
    )


def lr_sensitivity(cells: list[Cell], rows: list[dict]) -> str:
    """Markdown: which SpanNorm scaling, if any, trains at the highest learning rate as well as PreNorm.

    For every depth swept by a grid with a span_scale or span_c axis: each scaling's mean val loss
    at the lowest and highest lr and the change between them, beside PreNorm's (dense, same depth).
    A scaling *removes the sensitivity* if at the highest lr it trained (not diverged or stalled in
    most seeds) and its mean val loss is at most PreNorm's there. "" if the study has no such grid.
    """
    points = aggregate(cells, rows, lambda c: (scaling_series(c), *_depth_lr(c)) if scaling_series(c) else None)
    not_run = {c.cfg.model.n_layers for c, r in zip(cells, rows) if scaling_series(c) and r.get("status") == "not run"}
    pre = aggregate(cells, rows, lambda c: ("pre", *_depth_lr(c)) if c.series == "pre" else None)
    lines = []
    for depth in sorted({k[1] for k in points}):
        lrs = sorted({k[2] for k in points if k[1] == depth})
        if len(lrs) < 2:
            continue
        lo, hi = lrs[0], lrs[-1]
        ref = pre.get(("pre", depth, hi))
        table = []
        removes, missing = [], depth in not_run
        series = [("pre", pre)] + [(s, points) for s in dict.fromkeys(k[0] for k in points if k[1] == depth)]
        for name, src in series:
            a, b = src.get((name, depth, lo)), src.get((name, depth, hi))
            change = (
                f"{b.mean - a.mean:+.3f}"
                if a and b and a.mean is not None and b.mean is not None and not a.failed and not b.failed
                else "—"
            )
            if name == "pre":
                verdict = "(reference)"
            elif b is None or ref is None or ref.mean is None:
                verdict, missing = "not run yet", True  # pre's or this cell's highest-lr cells
            else:
                ok = not b.failed and b.mean is not None and b.mean <= ref.mean
                verdict = "yes" if ok else "no"
                removes += [name] if ok else []
            table.append([name, a.text() if a else "not run", b.text() if b else "not run", change, verdict])
        summary = (
            f"Scalings that remove the sensitivity at L={depth} (train at lr={hi:g} with a val loss at most "
            f"PreNorm's{f' {ref.mean:.3f}' if ref and ref.mean is not None else ''}): "
            + (", ".join(f"`{s}`" for s in removes) if removes else "**none**")
            + (" so far; some cells are not run yet" if missing else "")
            + "."
        )
        if any(k[1] == depth and "span_scale=none" in k[0] for k in points):
            summary += " With span_scale=none, span_c is not used: those rows are the same model, trained again."
        lines += [
            f"At L={depth}, between lr={lo:g} and lr={hi:g}:",
            "",
            md_table(["series", f"lr={lo:g}", f"lr={hi:g}", "change", f"trains at lr={hi:g} as well as pre"], table),
            "",
            summary,
            "",
        ]
    return "\n".join(lines).rstrip()


def claims(cells: list[Cell], rows: list[dict], out: Path, init: list[dict]) -> list[tuple[str, Claim]]:
    """The six claims of SPANNORM.md, each with a verdict from an explicit rule over the study's data."""
    points = aggregate(cells, rows, lambda c: (c.series, *_depth_lr(c)))
    ok = {c.name for c, r in zip(cells, rows) if r.get("status") == "ok"}  # trained: neither diverged nor stalled
    dense = {}
    moe_values = sorted(
        {
            c.extras["model.n_experts"]
            for c in cells
            if isinstance(c.extras.get("model.n_experts"), int) and c.extras["model.n_experts"] > 0
        }
    )
    result = [
        ("Bounded forward signal", claim_signal(cells, out, init, ok)),
        ("Bounded gradients", claim_gradients(cells, out, init, ok)),
        ("Stability where PostNorm diverges or stalls", claim_stability(points, dense)),
        ("Quality: lower validation loss than PreNorm at equal compute", claim_quality(points, dense)),
        ("Less collapse after training", claim_collapse(cells, out, dense, ok)),
    ]
    moe_rule = (
        "claims 3–5 restricted to the MoE cells (a model.n_experts axis > 0; claim 3 only if the MoE cells "
        "include post): supported if all are, not supported if any is not, else inconclusive"
    )
    if not moe_values:
        result.append(("All of the above in MoE models", Claim(INCONCLUSIVE, "the study has no MoE cells", moe_rule)))
    else:
        sub = []
        for k in moe_values:
            ex = {"model.n_experts": k}
            has_post = any(key[0] == _series_name("post", ex) for key in points)
            sub += ([claim_stability(points, ex)] if has_post else []) + [
                claim_quality(points, ex),
                claim_collapse(cells, out, ex, ok),
            ]
        verdicts = [c.verdict for c in sub]
        verdict = (
            SUPPORTED
            if all(v == SUPPORTED for v in verdicts)
            else NOT_SUPPORTED
            if NOT_SUPPORTED in verdicts
            else INCONCLUSIVE
        )
        result.append(
            (
                "All of the above in MoE models",
                Claim(verdict, " | ".join(f"{c.verdict}: {c.evidence}" for c in sub), moe_rule),
            )
        )
    return result


# --- the study -----------------------------------------------------------------------------


def report(
    study: StudyConfig,
    cells: list[Cell],
    rows: list[dict],
    out: Path,
    command: str,
    plots: list[str],
    claim_list: list[tuple[str, Claim]],
    counts: dict,
) -> str:
    base = base_config(study)
    _set(base, "train.max_steps", cells[0].cfg.train.max_steps if cells else None)
    base_cfg = run_config_from_dict(copy.deepcopy(base))
    t = base_cfg.train
    unigram = next((r["unigram_entropy"] for r in rows if r.get("unigram_entropy") is not None), None)
    lines = [
        "# spannorm study",
        "",
        f"Command: `{command}`",
        "",
        f"{len(cells)} cells: {counts['trained']} trained in this session, {counts['reused']} reused, "
        f"{counts['failed']} failed"
        + (f", **{counts['not run']} not run yet** (a partial report)" if counts.get("not run") else "")
        + f". Every cell trains on {study.tokens_per_cell:,} tokens "
        f"({t.max_steps} steps × {t.batch_size} × {t.seq_len} tokens in the base config; cells that change "
        "batch_size or seq_len get their own step count). Base config: "
        f"`{study.base}` with set {study.set or '[]'} (below).",
        "",
    ]
    guarded = [r for r in rows if r.get("guard_skipped") or r.get("guard_rollbacks")]
    if guarded:  # the training guard (train.guard) saved steps: say where, since it changes what was trained
        lines += [
            "The training guard (`train.guard`) intervened in "
            + ", ".join(
                f"{r['name']} ({r['guard_skipped']} steps skipped, {r['guard_rollbacks']} rollbacks)" for r in guarded
            )
            + "; each cell's metrics.jsonl has a row per intervention.",
            "",
        ]
    walls = [r["wall_s"] for r in rows if r.get("wall_s") is not None]
    if walls:
        lines += [
            f"Training time: the {len(walls)} finished cells' wall times sum to {sum(walls) / 3600:.2f} h "
            "(a cell resumed from a checkpoint counts only its last part); `--jobs N` runs N cells at once.",
            "",
        ]
    lines += [
        "Entries are the final validation loss, mean ± std over seeds (sample std; diverged cells left out). "
        "*div (k/n)*: k of n seeds diverged — the training loss became non-finite, or was at or above the first "
        "step's loss after warmup, and the run was stopped there. *stalled (k/n)*: the final validation loss is "
        f"within {STALL_MARGIN} nats of the unigram entropy of the training tokens"
        + (f" ({unigram:.3f} nats)" if unigram is not None else "")
        + ", i.e. the model learned little more than token frequencies.",
        "",
    ]
    for grid in study.grids:
        lines += [f"## Grid `{grid.name}`", "", grid_table(grid, cells, rows), ""]
    bad = [r for r in rows if r.get("status") not in ("ok", "not run")]
    if bad:
        lines += ["## Diverged, stalled and failed cells", ""]
        for r in bad:
            if r["status"] == "diverged":
                detail = f"diverged at step {r['diverged_step']} of {r['max_steps']} ({r['diverged_reason']})"
            elif r["status"] == "stalled":
                detail = f"stalled, final val loss {r['final_val_loss']:.4f}"
            else:
                detail = r["status"]
            lines.append(f"- `{r['name']}`: {detail}")
        lines.append("")
    if best := best_lr_table(cells, rows):
        lines += [
            "## Each scheme at its best learning rate",
            "",
            "The rule, fixed before the data: for each series and depth, the *best lr* is the one whose first "
            "seed's final validation loss is the lowest among the cells that neither diverged nor stalled "
            "(*none* if all did). The val loss there is the mean ± std over every seed run at that lr (n seeds; "
            "a grid with `best_lr_seeds` runs those seeds at the best lr after the grid). The *stable range* "
            f"is the lrs whose first seed trained (neither diverged nor stalled) to within {STABLE_MARGIN} nats "
            "of the best lr's, lowest – highest (k of the lrs tried); the last column lists the lrs whose first "
            "seed diverged or stalled.",
            "",
            best,
            "",
        ]
    if sens := lr_sensitivity(cells, rows):
        lines += [
            "## Learning-rate sensitivity of SpanNorm's scalings",
            "",
            "The prototype in SPANNORM.md found SpanNorm ahead of PreNorm at the lower lr and behind it at the "
            "higher one. Which scaling, if any, removes that sensitivity:",
            "",
            sens,
            "",
        ]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    lines += [
        "## Claims (SPANNORM.md)",
        "",
        "Each verdict comes from the stated rule applied to this study's cells (and, for claims 1 and 2, to "
        "`init_probe.json`, probes of fresh models at the study's depths and size). *Inconclusive* means the "
        "data do not decide.",
        "",
    ]
    for i, (title, c) in enumerate(claim_list, 1):
        lines += [f"{i}. **{title}: {c.verdict}.** {c.evidence}", f"   - Rule: {c.rule}."]
    lines += [
        "",
        "## Base config",
        "",
        "```yaml",
        yaml.safe_dump(to_dict(base_cfg), sort_keys=False).rstrip(),
        "```",
        "",
        "## Study config",
        "",
        "```yaml",
        yaml.safe_dump(study.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
