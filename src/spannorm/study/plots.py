"""A study's plots (plots/*.png): validation loss against depth and lr, the best lrs, the SpanNorm scaling
ablation, training curves, per-block gradient norms and trained-model similarity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..plotting import figure_legend, integer_ticks, panel_grid, pyplot, save_figure, unigram_line
from ..run import RunDir, read_metrics
from .archive import kept_digits
from .grid import Cell, leaf, series_label
from .results import aggregate, best_lr, best_lr_points, first_seed, read_probe, scaling_depths, scaling_series
from .search import transfer_series

DPI = 90  # every plot's; tight (cropped to the drawn area) keeps a legend placed beside the axes
DECADES = 6  # the gradient heatmaps' colour range: 1e-6 of the largest norms and below are one colour, "vanished"


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
    points = aggregate(cells, rows, lambda c: (key(c), *c.depth_lr) if key(c) else None)
    series = list(dict.fromkeys(k[0] for k in points))
    panel_of = (lambda k: k[2]) if x == "depth" else (lambda k: k[1])
    x_of = (lambda k: k[1]) if x == "depth" else (lambda k: k[2])
    panels = sorted({panel_of(k) for k in points})
    if not panels:
        return False
    unigram = next((r["unigram_entropy"] for r in rows if r.get("unigram_entropy") is not None), None)
    plt = pyplot()
    fig, axes = panel_grid(plt, len(panels), 4.5, 3.8, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        unigram_line(ax, unigram)
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
    figure_legend(fig, axes)
    fig.suptitle("validation loss (mean ± std over seeds; diverged cells left out)", fontsize=9)
    save_figure(fig, path, dpi=DPI, tight=True)
    return True


SEARCHED = "model.init_scale"  # the axis a study's search varies besides lr (fair-study.yaml)


def is_searched(cells: list[Cell]) -> bool:
    """Whether the study searches init_scale: its plots then show each scheme at its best init scale."""
    return any(SEARCHED in c.extras for c in cells)


def setting(c: Cell) -> str:
    """What a cell varies besides scheme, depth, lr and the searched init scale ("" for the base setting, else
    e.g. "d_model=128"): one row of panels in a searched study's plots."""
    return series_label("", {k: v for k, v in c.extras.items() if k != SEARCHED}).strip()


def best_over_init(cells: list[Cell], rows: list[dict]) -> dict:
    """{(setting, scheme, depth, lr): (init_scale, SeedGroup)} of the best init scale at each point of the study's
    own budget (confirmation cells, with a budget of their own, left out): the lowest mean val loss among the
    scales that trained, else (every scale diverged or stalled) the lowest one."""
    groups = aggregate(
        cells,
        rows,
        lambda c: None if c.tokens else (setting(c), c.cfg.model.scheme.value, *c.depth_lr, c.cfg.model.init_scale),
    )
    best: dict = {}
    for (where, scheme, depth, lr, init), group in groups.items():
        rank = (group.failed, math.inf if group.mean is None else group.mean)
        k = (where, scheme, depth, lr)
        if k not in best or rank < best[k][0]:
            best[k] = (rank, init, group)
    return {k: (init, group) for k, (_, init, group) in best.items()}


def searched_points(cells: list[Cell], rows: list[dict], x: str) -> tuple[dict, list]:
    """What :func:`plot_searched` draws: {key: (lr, init_scale, SeedGroup)} and its panels. x='lr': a key is
    (setting, scheme, depth, lr), a panel (setting, depth); x='depth': a key is (setting, scheme, depth) at its
    best lr, a panel a setting with two or more depths."""
    best = best_over_init(cells, rows)
    if x == "lr":
        points = {k: (k[3], init, g) for k, (init, g) in best.items()}
        return points, sorted({(k[0], k[2]) for k in points})
    tops: dict = {}
    for (where, scheme, depth, lr), (init, group) in best.items():
        k = (where, scheme, depth)
        if group.mean is not None and (k not in tops or (group.failed, group.mean) < tops[k][:2]):
            tops[k] = (group.failed, group.mean, lr, init, group)
    points = {(w, sch, d): (lr, init, g) for (w, sch, d), (_, _, lr, init, g) in tops.items()}
    depths = {w: {k[2] for k in points if k[0] == w} for w in {k[0] for k in points}}
    return points, sorted(w for w in depths if len(depths[w]) > 1)


def _draw_scheme(ax, mine: dict, x_of, colour: str, fail_at: float, star: bool) -> None:
    """One scheme's line in a panel of :func:`plot_searched` (``mine``: its points there), a cross for each failed
    point, and (``star``) a star at its best, labelled with its init scale where it is not 1."""
    ks = sorted(mine, key=x_of)
    good = [k for k in ks if not mine[k][2].failed]
    if good:
        ax.plot([x_of(k) for k in good], [mine[k][2].mean for k in good], "o-", color=colour, label=ks[0][1])
    for k in ks:
        if mine[k][2].failed:
            ax.plot([x_of(k)], [fail_at], "x", color=colour, markersize=8)
    if star and good:
        best = min(good, key=lambda k: mine[k][2].mean)
        at = (x_of(best), mine[best][2].mean)
        ax.plot(*at, "*", color=colour, markersize=13)
        if mine[best][1] != 1.0:
            offset = {"xytext": (5, -10), "textcoords": "offset points"}
            ax.annotate(f"×{mine[best][1]:g}", at, fontsize=6, color=colour, **offset)


def plot_searched(path: Path, cells: list[Cell], rows: list[dict], x: str) -> bool:
    """A searched study's answer at a glance, one line per scheme (its colour the same everywhere), each point at
    the scheme's best init scale there. x='lr': val loss against lr, a panel per (setting, depth), a star at each
    scheme's best (labelled with its init scale where it is not 1); x='depth': each scheme's best over lr and
    init scale against depth, a panel per setting with two or more depths. Points that diverged or stalled are
    crosses on the unigram line, named beside it."""
    points, panels = searched_points(cells, rows, x)
    if not panels:
        return False
    schemes = list(dict.fromkeys(k[1] for k in points))
    colour = {scheme: f"C{i % 10}" for i, scheme in enumerate(schemes)}
    unigram = next((r["unigram_entropy"] for r in rows if r.get("unigram_entropy") is not None), None)
    trained = [g.mean for _, _, g in points.values() if not g.failed and g.mean is not None]
    low, high = min(trained, default=0.0) - 0.05, max(trained, default=1.0) + 0.15
    # the trained points fill the panels; the failed ones sit on the unigram line, or at the top edge above it
    fail_at = high - 0.03 if unigram is None or unigram > high else unigram
    base = next((f"d_model {c.cfg.model.d_model}" for c in cells if not setting(c)), "base")
    plt = pyplot()
    fig, axes = panel_grid(plt, len(panels), 4.5, 3.8, sharey=True)
    for ax, panel in zip(axes.flat, panels):
        if fail_at == unigram:
            unigram_line(ax, unigram)
        mine = {k: v for k, v in points.items() if (k[0] if x == "depth" else (k[0], k[2])) == panel}
        x_of = (lambda k: k[2]) if x == "depth" else (lambda k: k[3])
        failed: dict = {}
        for scheme in schemes:
            theirs = {k: v for k, v in mine.items() if k[1] == scheme}
            _draw_scheme(ax, theirs, x_of, colour[scheme], fail_at, x == "lr")
            for k in sorted(theirs, key=x_of):
                if theirs[k][2].failed:
                    failed.setdefault(x_of(k), []).append(scheme)
        for at, names in failed.items():  # the crosses, named
            offset = {"xytext": (0, -7), "textcoords": "offset points", "ha": "center", "va": "top"}
            ax.annotate("\n".join(names), (at, fail_at), fontsize=6, color="0.3", **offset)
        ax.set_ylim(low, high)
        ticks = sorted({x_of(k) for k in mine})
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        name = (panel if x == "depth" else panel[0]) or base
        ax.set_title(name if x == "depth" else f"{name}, L = {panel[1]}", fontsize=9)
        ax.set_xlabel("depth L" if x == "depth" else "peak learning rate")
        ax.set_ylabel("final val loss (nats/token)")
        ax.grid(alpha=0.3)
    if x == "lr":
        axes.flat[0].plot([], [], "k*", markersize=10, label="its best lr (×s: at init_scale s)")
    if any(g.failed for _, _, g in points.values()):
        where = "on the unigram line" if fail_at == unigram else "at the top edge"
        where += f"; unigram entropy {unigram:.2f}" if unigram and fail_at != unigram else ""
        axes.flat[0].plot([], [], "kx", label=f"diverged or stalled ({where}), named")
    figure_legend(fig, axes)
    what = "over lr and init_scale" if x == "depth" else "over init_scale at each lr"
    fig.suptitle(f"validation loss, each scheme at its best {what} (mean over seeds)", fontsize=9)
    save_figure(fig, path, dpi=DPI, tight=True)
    return True


def plot_curves(path: Path, cells: list[Cell], out: Path) -> bool:
    """Training loss curves (lines) and validation loss (dots), one panel per (depth, lr), one colour per series
    (the smallest seed), one y scale: from the lowest loss to 1.1 × the highest first loss (a spike above it is
    cut, and says so)."""
    series = plotted_series(cells)
    firsts = {k: c for k, c in first_seed(cells).items() if k[0] in series}
    curves = {k: read_metrics(out / "cells" / c.name) for k, c in firsts.items()}
    panels = sorted({k[1:] for k, rows in curves.items() if rows})  # (a panel whose cells have not run: none)
    if not panels:
        return False
    finite = [r["loss"] for rows in curves.values() for r in rows if r["loss"] is not None and math.isfinite(r["loss"])]
    starts = [rows[0]["loss"] for rows in curves.values() if rows and rows[0]["loss"] is not None]
    top = 1.1 * max((x for x in starts if math.isfinite(x)), default=max(finite, default=1.0))
    plt = pyplot()
    fig, axes = panel_grid(plt, len(panels), 4.5, 3.5)  # (one y scale: the limits set on every panel below)
    for ax, panel in zip(axes.flat, panels):
        for i, s in enumerate(series):
            rows = curves.get((s, *panel))
            if not rows:
                continue
            color = f"C{i % 10}"  # the same in every panel
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, linewidth=1, label=s)
            val = [r for r in rows if r.get("val_loss") is not None]
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o", color=color, markersize=3)
        ax.set_ylim(min(finite, default=0.0) * 0.95, top)
        ax.set_title(f"L = {panel[0]}, lr {panel[1]:g}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes.flat[0].plot([], [], "o", color="0.3", markersize=3, label="validation loss (dots)")
    figure_legend(fig, axes)
    fig.suptitle(f"training loss (lines) and validation loss (dots); cut above {top:.2f}", fontsize=9)
    save_figure(fig, path, dpi=DPI, tight=True)
    return True


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


def plot_ablation(path: Path, cells: list[Cell], rows: list[dict]) -> bool:
    """Validation loss against lr for each SpanNorm scaling (the default span of another grid too), beside
    PreNorm, at the ablation's depths."""
    depths = scaling_depths(cells)
    return bool(depths) and plot_val(
        path,
        cells,
        rows,
        "lr",
        key=lambda c: (
            scaling_series(c, depths) or ("pre" if c.series == "pre" and c.cfg.model.n_layers in depths else None)
        ),
    )


def _deepest(cells: list[Cell]) -> int:
    return max(c.cfg.model.n_layers for c in cells)


def plot_grad_heatmaps(path: Path, cells: list[Cell], out: Path) -> bool:
    """log10 per-block gradient norm (block × step) of each series at the deepest depth, one column per lr."""
    series = plotted_series(cells)
    depth = _deepest(cells)
    firsts = {k: c for k, c in first_seed(cells).items() if k[0] in series and k[1] == depth}
    heatmaps = {}
    for k, c in firsts.items():
        rows = RunDir(out / "cells" / c.name).diagnostics()
        if rows:
            norms = np.array([kept_digits(r["grad_norm"]) for r in rows], dtype=float).T  # (the archive's digits)
            norms = np.log10(np.maximum(norms, 1e-30))
            heatmaps[k] = (norms, rows[0]["step"], rows[-1]["step"])
    if not heatmaps:
        return False
    names = [s for s in series if any(k[0] == s for k in heatmaps)]
    lrs = sorted({k[2] for k in heatmaps})
    finite = np.concatenate([norms[np.isfinite(norms)] for norms, _, _ in heatmaps.values()])
    # one scale for every panel, its top at the 98th percentile and at most DECADES below it: a vanished gradient
    # (1e-28) would otherwise stretch it so far that every healthy run shows one colour
    vmax = float(np.percentile(finite, 98)) if finite.size else 1.0
    vmin = max(float(np.percentile(finite, 2)), vmax - DECADES) if finite.size else vmax - DECADES
    plt = pyplot()
    size = (4 * len(lrs) + 1, 2.2 * len(names) + 0.8)
    fig, axes = plt.subplots(len(names), len(lrs), figsize=size, squeeze=False)
    im = None
    for i, s in enumerate(names):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            if (s, depth, lr) not in heatmaps:
                ax.axis("off")
                continue
            norms, first, last = heatmaps[(s, depth, lr)]
            im = ax.imshow(
                norms,
                aspect="auto",
                origin="lower",
                vmin=vmin,
                vmax=vmax,
                extent=(first, max(last, first + 1), 0.5, norms.shape[0] + 0.5),
            )
            ax.set_title(f"{s}, lr {lr:g}", fontsize=8)
            ax.tick_params(labelsize=6)
            # ticks on the outer panels only (the panels share their axes' ranges; ticks are most of the drawing)
            if j == 0:
                ax.set_ylabel("block", fontsize=7)
                integer_ticks(ax.yaxis)
            else:
                ax.set_yticks([])
            if i < len(names) - 1:
                ax.set_xticks([])
    fig.subplots_adjust(hspace=0.5, right=0.85, top=1 - 0.7 / fig.get_figheight(), bottom=0.5 / fig.get_figheight())
    fig.colorbar(im, ax=axes, shrink=0.8, extend="both", label=f"log10 grad norm (at most {DECADES} decades)")
    title = f"per-block gradient norm during training, L = {depth} (x: step)"
    fig.suptitle(title, fontsize=9, y=1 - 0.25 / fig.get_figheight())
    save_figure(fig, path, dpi=DPI, layout=False)  # laid out above, by hand: no tight_layout, no cropping
    return True


def plot_similarity(path: Path, cells: list[Cell], out: Path) -> bool:
    """Series × block heatmaps at the deepest depth from probe.json: adjacent cosine and layer drop
    (mean over seeds), one column per lr."""
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
    quantities = (
        ("adjacent_cosine", "cosine(block l, block l+1)", "viridis", depth - 1),
        ("layer_drop", "val loss increase without block l (nats)", "magma", depth),
    )
    grids = {}
    for key, _, _, width in quantities:
        for lr in lrs:
            grid = np.full((len(names), width), np.nan)
            for r, s in enumerate(names):
                ps = [p[key] for p in probes.get((s, lr), []) if p.get(key)]
                if ps:
                    grid[r] = np.mean(np.array(ps, dtype=float), axis=0)
            grids[key, lr] = grid
    plt = pyplot()
    fig, axes = plt.subplots(2, len(lrs), figsize=(5 * len(lrs) + 1, 0.35 * len(names) * 2 + 2.5), squeeze=False)
    for i, (key, title, cmap, width) in enumerate(quantities):
        # one scale per row, so that its panels compare by colour; from its 2nd to its 98th percentile, so that a
        # few extreme cells do not wash the others out
        values = np.concatenate([grids[key, lr][np.isfinite(grids[key, lr])] for lr in lrs])
        vmin, vmax = (float(np.percentile(values, 2)), float(np.percentile(values, 98))) if values.size else (0, 1)
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            im = ax.imshow(
                grids[key, lr],
                aspect="auto",
                cmap=cmap,
                interpolation="nearest",
                vmin=vmin,
                vmax=max(vmax, vmin + 1e-9),
                extent=(0.5, width + 0.5, len(names) - 0.5, -0.5),
            )
            ax.set_yticks(range(len(names)), names if j == 0 else [], fontsize=7)  # (the rows: the same series)
            integer_ticks(ax.xaxis)
            ax.set_xlabel("block l", fontsize=8)
            ax.set_title(f"{title}, L = {depth}, lr {lr:g}", fontsize=8)
        fig.colorbar(im, ax=list(axes[i]), extend="both")
    save_figure(fig, path, dpi=DPI, layout=False, tight=True)
    return True


def plot_transfer(path: Path, found: list) -> bool:
    """Final val loss against lr, a panel per series of ``search.transfer_series`` that has a finished cell, a line
    per value of the warm-start axis (a width, a depth), each best starred: the optimum staying put or moving as the
    model grows. ``found``: the study's searches."""
    panels = [
        (name, rest, [s for s in by_value.values() if _finished(s)])
        for name, series in transfer_series(found).items()
        for rest, by_value in series.items()
    ]
    panels = [p for p in panels if p[2]]
    if not panels:
        return False
    plt = pyplot()
    fig, axes = panel_grid(plt, len(panels), 4.2, 3.4)
    for ax, (name, rest, series) in zip(axes.flat, panels):
        lrs = set()
        for s in series:
            axis = s.grid.warm_start
            colour = f"C{s.grid.axes[axis].index(s.point[axis]) % 10}"
            done = _finished(s)
            lrs |= {d[0] for d in done}
            label = f"{leaf(axis)}={s.point[axis]}"
            ax.plot([d[0] for d in done], [d[1] for d in done], marker="o", color=colour, label=label)
            ax.plot([d[0] for d in done if d[2]], [d[1] for d in done if d[2]], "*", color=colour, markersize=14)
        title = " ".join(
            str(v) if k in ("model.scheme", "model.parametrization") else f"{leaf(k)}={v}"
            for k, v in rest
            if k != "train.seed"
        )
        ax.set_title(f"{title} ({name}; ★ best)", fontsize=9)
        ax.set_xscale("log")
        ax.set_xticks(sorted(lrs), [f"{x:g}" for x in sorted(lrs)], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final val loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=DPI, tight=True)
    return True


def _finished(search) -> list[tuple[float, float, bool]]:
    """(lr, final val loss, is the best) of each cell a one-axis search trained, by lr."""
    return sorted(
        (search.values(k)[next(iter(search.grid.search))], float(row["final_val_loss"]), k == search.best)
        for k, (_, row) in search.tried.items()
        if row.get("status") == "ok" and row.get("final_val_loss") not in (None, "")
    )


def plot_study(out: Path, cells: list[Cell], rows: list[dict], found: list = ()) -> list[str]:
    """Write every plot the study has data for into ``out/plots``; returns their paths relative to ``out``.
    ``found``: the study's searches (``spannorm.study.search``), for the transfer plot."""
    if not cells:
        return []
    searched = is_searched(cells)
    plots = {
        "val_vs_depth.png": lambda path: (plot_searched if searched else plot_val)(path, cells, rows, "depth"),
        "val_vs_lr.png": lambda path: (plot_searched if searched else plot_val)(path, cells, rows, "lr"),
        "ablation.png": lambda path: plot_ablation(path, cells, rows),
        "best_lr.png": lambda path: not searched and plot_best_lr(path, cells, rows),  # (searched: in val_vs_lr)
        "loss_curves.png": lambda path: plot_curves(path, cells, out),
        "grad_heatmaps.png": lambda path: plot_grad_heatmaps(path, cells, out),
        "similarity.png": lambda path: plot_similarity(path, cells, out),
        "transfer.png": lambda path: plot_transfer(path, found),
    }
    written = []
    for name, plot in plots.items():
        if plot(out / "plots" / name):
            written.append(f"plots/{name}")
        else:  # (one an earlier report drew would be read as this one's)
            (out / "plots" / name).unlink(missing_ok=True)
    return written
