"""``run_study``: a study from its config to report.md: the plan, the cells of both phases, results.csv,
the plots, the init probe, the claims and the report."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import SpannormError, require
from ..files import atomic_write_text, locked, no_links, sweep_temp
from ..webpage import html_report
from .archive import ARCHIVE, pack, unpack
from .cells import run_cells
from .claims import claims, init_probe, trains_span
from .grid import Cell, Plan, StudyConfig, expand, plan_study
from .plots import plot_study
from .report import report
from .results import best_lr_follow, cell_result, write_results
from .search import search_follow, searches
from .verdicts import verdicts_report


def run_study(
    study: StudyConfig,
    out: Path,
    command: str,
    jobs: int = 1,
    log=print,
    report_only: bool = False,
    launcher=None,
) -> list[dict]:
    """Run (or resume) every cell of ``study`` into ``out/cells``; write results.csv, plots and report.md.

    Cells run seed by seed and shallow depths first, so a study stopped early has covered every
    scheme; then the follow_ups of grids with best_lr_seeds, the same way. ``report_only``: train
    nothing; report the cells finished so far (the rest "not run"). ``launcher``: each cell a job of a cluster
    (:class:`spannorm.study.launch.Slurm`) instead of ``jobs`` processes here.

    A study that trains holds the lock of ``out`` (a second one into it is refused) and first deletes the
    temporary files that kills left; ``report_only`` takes no lock (it trains nothing, and every file it
    writes is replaced atomically), so it can report on a study that is running.
    """
    require(isinstance(jobs, int) and jobs >= 1, "--jobs", jobs, "a positive integer")
    out = Path(out)
    plan = plan_study(study)
    cells = expand(plan)  # validates before any file is written
    no_links(out, "--out")  # (nothing in a study directory is followed out of it)
    if report_only:
        unpack(out)
        return _run_study(plan, cells, out, command, jobs, log, report_only)
    with locked(out, "--out"):
        no_links(out, "--out")  # (again, under the lock)
        # (each cell's checkpoints: when train resumes it)
        sweep_temp(out, out / "plots", out / "cells", *out.glob("cells/*"))
        unpack(out)
        return _run_study(plan, cells, out, command, jobs, log, report_only, launcher)


def _write_outputs(
    plan: Plan,
    cells: list[Cell],
    rows: list[dict],
    out: Path,
    command: str,
    failed: dict,
    before: set,
    report_only: bool,
    log,
) -> None:
    """A study's outputs from its cells: results.csv, the archive, the plots, the init probe (made unless
    ``report_only``), report.md and report.html; ``failed``: the cells that failed or were not run, ``before``:
    those finished before this session."""
    write_results(out / "results.csv", cells, rows)
    if not report_only or not (out / ARCHIVE).is_file():  # (--report-only changes no cell: it packs a study once)
        pack(out)
    found = searches(plan, out, failed) if any(grid.search for grid in plan.study.grids) else []
    plots = plot_study(out, cells, rows, found)
    depths = sorted({c.cfg.model.n_layers for c in cells})
    init = init_probe(plan.base_cfg, depths, out / "init_probe.json", compute=not report_only)
    if init is None:  # (--report-only probes nothing: the claims that use the probes at init say so)
        log(
            f"spannorm: warning: {out / 'init_probe.json'} is missing or was made for another config or init recipe: "
            "--report-only probes nothing, so claims 1 and 2 are judged without the probes at init "
            "(run the study to make it)"
        )
    not_run = sum(e == "not run" for e in failed.values())
    counts = {
        "trained": len([c for c in cells if c.name not in before and c.name not in failed]),
        "reused": len(before),
        "failed": len(failed) - not_run,
        "not run": not_run,
        "init probes": init is not None,
    }
    init = init or []
    # (the fair study's R2-R6 judge confirmed bests: a study whose searches confirm nothing gets the generic claims)
    fair = verdicts_report(plan, found, out, failed, init) if any(g.confirm for g in plan.study.grids) else ""
    judged = claims(cells, rows, out, init) if trains_span(cells) else []  # (none judged without span: report._claims)
    text = report(plan, cells, rows, command, plots, judged, counts, found, fair)
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", html_report(text, out))


def _run_study(
    plan: Plan, cells: list[Cell], out: Path, command: str, jobs: int, log, report_only: bool, launcher=None
) -> list[dict]:
    """The body of :func:`run_study`."""
    study = plan.study
    before = {c.name for c in cells if (out / "cells" / c.name / "summary.json").is_file()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.yaml", yaml.safe_dump(study.to_dict(), sort_keys=False, allow_unicode=True))
    log(f"study: {len(cells)} cells ({len(before)} finished before) -> {out / 'cells'}")
    failed: dict[str, str] = {}

    def run(todo: list[Cell]) -> None:
        if report_only:
            failed.update({c.name: "not run" for c in todo if c.name not in before})
        else:
            order = sorted(todo, key=lambda c: (c.cfg.train.seed, c.cfg.model.n_layers))  # stable: grid order otherwise
            failed.update(run_cells(study, order, out, jobs, log, launcher))

    run(cells)
    rows = [cell_result(c, out, failed.get(c.name)) for c in cells]
    if any(grid.best_lr_seeds or grid.search for grid in study.grids):
        # the later phases, found again from the finished cells: the best-lr seeds, and each search, round by
        # round (a round's cells are those its searches ask for, given every cell finished before it)
        grid_cells, grid_rows, n, ran = cells, rows, len(cells), set()
        while True:
            follow = best_lr_follow(plan, grid_cells, grid_rows) + search_follow(searches(plan, out, failed))
            cells = grid_cells + expand(plan, follow)[n:] if follow else grid_cells
            finished = {c.name for c in cells[n:] if (out / "cells" / c.name / "summary.json").is_file()}
            before |= finished - ran
            todo = [c for c in cells[n:] if c.name not in failed and c.name not in finished]
            log(
                f"later phases: {len(cells) - n} cells so far ({len(before & finished)} finished before), "
                f"{len(todo)} to run"
            )
            if not todo:
                break
            run(todo)
            ran |= {c.name for c in todo}
            if report_only:
                break
        rows = [cell_result(c, out, failed.get(c.name)) for c in cells]
    _write_outputs(plan, cells, rows, out, command, failed, before, report_only, log)
    if failed and not report_only:
        raise SpannormError(
            f"{len(failed)} of {len(cells)} cells failed ({', '.join(sorted(failed))}); "
            f"see {out / 'results.csv'}; run the study again to retry them"
        )
    return rows
