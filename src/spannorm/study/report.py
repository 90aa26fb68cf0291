"""report.md of a study: its tables (mean ± std over seeds), each series at its best learning rate, the
learning-rate sensitivity of SpanNorm's scalings, the plots and the claims' verdicts."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import to_dict
from ..output import lr, md_table
from ..train import STALL_MARGIN
from .claims import Claim, trains_span
from .grid import CORE, Cell, Grid, Plan, canonical, series_label
from .results import (
    SCALING_AXES,
    STABLE_MARGIN,
    aggregate,
    best_lr,
    best_lr_points,
    scaling_depths,
    scaling_series,
    stable_lrs,
)
from .search import RECIPE_MARGIN, Search, search_report, transfer_report


def grid_table(grid: Grid, cells: list[Cell], rows: list[dict]) -> str:
    """Rows: scheme and the grid's other non-core axes; columns: depth × lr; entries: mean ± std over seeds, "not run"
    where the grid has cells that did not finish yet ("" where it has none). A sentence while none finished."""
    others = [p for p in grid.axes if p not in CORE]

    def label(c: Cell) -> str:
        return series_label(c.cfg.model.scheme.value, {p: c.axes[p] for p in others})

    planned = list(dict.fromkeys((label(c), *c.depth_lr) for c in cells if grid.name in c.grids))
    points = aggregate(cells, rows, lambda c: (label(c), *c.depth_lr) if grid.name in c.grids else None)
    if not points:
        return f"No cell of this grid has finished yet ({sum(grid.name in c.grids for c in cells)} planned)."
    labels = list(dict.fromkeys(k[0] for k in planned))
    cols = sorted({k[1:] for k in planned})

    def entry(key) -> str:
        return points[key].text() if key in points else "not run" if key in planned else ""

    return md_table(
        ["series"] + [f"L={d}, lr={rate:g}" for d, rate in cols],
        [[lab] + [entry((lab, *c)) for c in cols] for lab in labels],
    )


def best_lr_table(cells: list[Cell], rows: list[dict]) -> str:
    """Markdown: each (series, depth)'s best lr (best_lr), its val loss over all seeds, its stable range
    (stable_lrs), and the lrs that diverged or stalled; "" if no series has 2+ lrs at a depth."""
    points = best_lr_points(cells, rows)
    aggs = aggregate(cells, rows, lambda c: (c.series, *c.depth_lr))
    table = []
    for (series, depth), by_lr in sorted(points.items(), key=lambda kv: kv[0][1]):
        bad = (
            ", ".join(
                f"{lr(rate)} {'div' if r['status'] == 'diverged' else 'stalled'}"
                for rate, r in by_lr.items()
                if r.get("status") in ("diverged", "stalled")
            )
            or "—"
        )
        best = best_lr(by_lr)
        if best is None:
            table.append([series, str(depth), "none", "—", "—", bad])
            continue
        a, stable = aggs[(series, depth, best)], stable_lrs(by_lr)
        span = lr(stable[0]) + (f" – {lr(stable[-1])}" if len(stable) > 1 else "")
        table.append(
            [series, str(depth), lr(best), f"{a.text()} (n={a.n})", f"{span} ({len(stable)} of {len(by_lr)})", bad]
        )
    if not table:
        return ""
    return md_table(["series", "L", "best lr", "val loss at the best lr", "stable range", "diverged or stalled"], table)


def lr_sensitivity(cells: list[Cell], rows: list[dict]) -> str:
    """Markdown: which SpanNorm scaling, if any, trains at the highest learning rate as well as PreNorm.

    For every depth swept by a grid with a model.span.scale or span.c axis (:func:`scaling_depths`): each
    scaling's mean val loss at that grid's lowest and highest lr and the change between them, beside
    PreNorm's (dense, same depth). Every dense span cell at those depths takes part, labelled by its
    scaling, so the default span of another grid is one of the rows. A scaling *removes the
    sensitivity* if at the highest lr it trained (not diverged or stalled in most seeds) and its mean
    val loss is at most PreNorm's there. "" if the study has no such grid.
    """
    depths = scaling_depths(cells)
    label = {c.name: s for c in cells if (s := scaling_series(c, depths))}  # each cell once, whatever its grids
    points = aggregate(cells, rows, lambda c: (label[c.name], *c.depth_lr) if c.name in label else None)
    not_run = {
        (label[c.name], *c.depth_lr) for c, r in zip(cells, rows) if c.name in label and r.get("status") == "not run"
    }
    pre = aggregate(cells, rows, lambda c: ("pre", *c.depth_lr) if c.series == "pre" else None)
    lines = []
    for depth in sorted(depths):
        # the lrs of the ablation's grids (cells with a model.span.scale or span.c axis) at this depth
        lrs = sorted(
            {
                c.cfg.train.lr
                for c in cells
                if c.name in label
                and c.cfg.model.n_layers == depth
                and any(p in canonical(c.axes) for p in SCALING_AXES)
            }
        )
        if len(lrs) < 2:
            continue
        lo, hi = lrs[0], lrs[-1]
        ref = pre.get(("pre", depth, hi))
        table = []
        removes, missing = [], any(k[1] == depth for k in not_run)
        series = [("pre", pre)] + [(s, points) for s in dict.fromkeys(k[0] for k in points if k[1] == depth)]
        for name, src in series:
            row = _sensitivity_row(name, src, depth, (lo, hi), ref, not_run)
            table.append(row)
            removes += [name] if row[-1] == "yes" else []
            missing = missing or row[-1] == "not run yet"
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


def _sensitivity_row(name: str, src: dict, depth: int, lrs: tuple, ref, not_run: set) -> list[str]:
    """One series' row of :func:`lr_sensitivity`'s table at ``depth`` between ``lrs`` (lowest, highest), the
    verdict last: yes, no, (reference), not run yet, or no cell at the highest lr."""
    lo, hi = lrs
    a, b = src.get((name, depth, lo)), src.get((name, depth, hi))
    change = (
        f"{b.mean - a.mean:+.3f}"
        if a and b and a.mean is not None and b.mean is not None and not a.failed and not b.failed
        else "—"
    )
    if name == "pre":
        verdict = "(reference)"
    elif b is None and (name, depth, hi) not in not_run:
        verdict = f"no cell at lr={hi:g}"  # a series of another grid that does not sweep this lr
    elif b is None or ref is None or ref.mean is None:
        verdict = "not run yet"  # pre's or this cell's highest-lr cells
    else:
        verdict = "yes" if not b.failed and b.mean is not None and b.mean <= ref.mean else "no"
    cell_text = [
        g.text() if g else "not run" if name == "pre" or (name, depth, rate) in not_run else "—"
        for g, rate in ((a, lo), (b, hi))
    ]
    return [name, *cell_text, change, verdict]


def _diagonals(study) -> str:
    """The search rule's sentence for grids with ``diagonals: true`` (none: nothing)."""
    names = [f"`{g.name}`" for g in study.grids if g.diagonals]
    if not names:
        return ""
    return (
        f" In grid{'s' if len(names) > 1 else ''} {', '.join(names)} (`diagonals: true`) a neighbour is also one step "
        "away on both axes at once (8 around the best, the first cells a square of 9), so the best is bracketed "
        "diagonally too."
    )


def _header(plan: Plan, cells: list[Cell], rows: list[dict], command: str, counts: dict) -> list[str]:
    """report.md's title, command, budget, interventions of the guard, training time and how to read entries."""
    study, t = plan.study, plan.base_cfg.train
    unigram = next((r["unigram_entropy"] for r in rows if r.get("unigram_entropy") is not None), None)
    lines = ["# spannorm study", ""] + ([f"> **Note.** {' '.join(study.note.split())}", ""] if study.note else [])
    lines += [
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
        f"not at least {STALL_MARGIN} nats below the unigram entropy of the training tokens"
        + (f" ({unigram:.3f} nats)" if unigram is not None else "")
        + ", i.e. the model learned little more than token frequencies.",
        "",
    ]
    return lines


def _failed(rows: list[dict]) -> list[str]:
    """The section naming each diverged, stalled and failed cell (none: no section)."""
    lines = []
    bad = [r for r in rows if r.get("status") not in ("ok", "not run")]
    if bad:
        lines += ["## Diverged, stalled and failed cells", ""]
        for r in bad:
            if r["status"] == "diverged":
                step = r.get("diverged_step")
                at = f"at step {step} of {r['max_steps']}" if step is not None else "by its end"
                detail = f"diverged {at} ({r['diverged_reason']})"
            elif r["status"] == "stalled":
                detail = f"stalled, final val loss {r['final_val_loss']:.4f}"
            else:
                detail = r["status"]
            lines.append(f"- `{r['name']}`: {detail}")
        lines.append("")
    return lines


def _claims(claim_list: list[tuple[str, Claim]], counts: dict, verdicts: str, has_span: bool) -> list[str]:
    """The claims' section: each verdict by the generic rules, or (a study that searches and confirms its bests:
    ``verdicts``) by its study file's; none where the study trains no span cell (``has_span``): every claim compares
    span with another scheme (a recipe's check, R1, is in the Searches table)."""
    lines = ["## Claims (SPANNORM.md)", ""]
    if not has_span:  # (its study file's rules too are judged on span's cells)
        return lines + [
            "This study trains no SpanNorm (`span`) cell, so it judges none of SPANNORM.md's claims: each compares "
            "span with PreNorm or PostNorm (the studies that train span judge them).",
        ]
    lines += [
        "Each verdict comes from the stated rule applied to this study's cells (and, for claims 1 and 2, to "
        "`init_probe.json`, probes of fresh models at the study's depths and size). *Inconclusive* means the "
        "data do not decide.",
        "",
    ]
    if not counts.get("init probes", True):
        lines += [
            "**`init_probe.json` is missing or was made for another config or init recipe: this `--report-only` run "
            "probed nothing, so claims 1 and 2 are judged without the probes at init.** Run the study (it trains only "
            "the cells not run yet) to make it.",
            "",
        ]
    if verdicts:  # the generic rules compare series at equal (depth, lr): not the comparison a confirmed search makes
        lines += [
            "This study searches each series' own best (above), so its claims are judged by the rules written in "
            "its study file (R1–R6), on the confirmation cells at each series' best, not by the generic rules "
            "that compare series at equal (depth, lr). *Pending*: a side's confirmation cells have not all "
            "finished.",
            "",
            verdicts,
        ]
    else:
        for i, (title, c) in enumerate(claim_list, 1):
            lines += [f"{i}. **{title}: {c.verdict}.** {c.evidence}", f"   - Rule: {c.rule}."]
    return lines


def _configs(plan: Plan) -> list[str]:
    """The base config and the study config, as YAML."""
    study, lines = plan.study, []
    lines += [
        "",
        "## Base config",
        "",
        "```yaml",
        yaml.safe_dump(to_dict(plan.base_cfg), sort_keys=False).rstrip(),
        "```",
        "",
        "## Study config",
        "",
        "```yaml",
        yaml.safe_dump(study.to_dict(), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return lines


def _searches(study, found: list[Search], cells: list[Cell], rows: list[dict]) -> list[str]:
    """The searches' section: the rule, then each point's best (none: no section)."""
    lines = []
    if found:
        lines += [
            "## Searches",
            "",
            "Each point's best over its searched axes, by the rule of `spannorm.study.search` (fixed before the "
            "data): start with a cross around the start (or, with `warm_start`, around the best of the point "
            "before it); the best is the lowest final val loss among cells neither diverged nor stalled; while a "
            "neighbour of the best one step away on any axis is not trained, train it. *Bracketed*: the best was "
            "compared with a worse or failed cell on both sides of every axis; otherwise the axis limit that "
            f"stopped it.{_diagonals(study)} *Recipe − best*: at the best lr, the recipe's own init scale against "
            f"the best (within {RECIPE_MARGIN} nats: ok). *Confirmation*: mean ± std of the confirm seeds at the "
            "best, on the confirm budget. Below the table, every cell each search tried (the best in bold; … not "
            "finished).",
            "",
            search_report(found, cells, rows),
            "",
        ]
    if transfer := transfer_report(found):
        lines += [
            "## Transfer",
            "",
            "How each series' best learning rate moves along its grid's warm-start axis (the rule, fixed before the "
            "data: `spannorm.study.search.transfer_report`): *transfers* if the best at the last value is within "
            "one lattice step of the best at the first, both bracketed; *moves* otherwise; — while either end is "
            "still searched.",
            "",
            transfer,
            "",
        ]
    return lines


def _per_scheme(cells: list[Cell], rows: list[dict]) -> list[str]:
    """Each scheme at its best learning rate, and the lr sensitivity of SpanNorm's scalings (where there are)."""
    lines = []
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
    return lines


def report(
    plan: Plan,
    cells: list[Cell],
    rows: list[dict],
    command: str,
    plots: list[str],
    claim_list: list[tuple[str, Claim]],
    counts: dict,
    found: list[Search] = (),
    verdicts: str = "",
) -> str:
    """The text of report.md: ``cells`` and their ``rows`` (results.csv), ``plots`` (paths relative to the
    study directory), the claims' verdicts, ``counts`` of cells trained, reused, failed and not run, and the
    grids' searches (``found``) with their ``verdicts`` (:func:`spannorm.study.verdicts.verdicts_report`)."""
    study = plan.study
    lines = _header(plan, cells, rows, command, counts)
    for grid in study.grids:
        if not grid.search:
            lines += [f"## Grid `{grid.name}`", "", grid_table(grid, cells, rows), ""]
    lines += _searches(study, found, cells, rows)
    lines += _failed(rows)
    lines += _per_scheme(cells, rows)
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    lines += _claims(claim_list, counts, verdicts, trains_span(cells))
    lines += _configs(plan)
    return "\n".join(lines)
