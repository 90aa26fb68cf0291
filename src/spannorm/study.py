"""``spannorm study``: a grid of training runs, their verdicts, tables, plots and the six claims.

A study is a directory::

    study.yaml      the resolved study config (loadable again with --config)
    cells/<name>/   one run directory per cell (config.yaml, metrics.jsonl, summary.json, ...)
                    plus probe.json (trained-model probe) and cell.json (wall time)
    init_probe.json probes of freshly initialized models at the study's depths (claims 1 and 2)
    results.csv     one row per cell
    report.md       tables (mean ± std over seeds), plots, and a verdict on each claim of SPANNORM.md
    plots/*.png

Every cell trains for the same number of tokens. A finished cell (summary.json present, same
config) is reused and an interrupted one resumes from its checkpoint, so a study can be stopped
and started again. Cells run in this process (``jobs=1``) or in ``jobs`` spawned worker processes.
A grid with ``best_lr_seeds`` adds a second phase: after all the grids' cells, those seeds at each of
its (series, depth) points' best lr (:func:`follow_ups`, found again from the cells on disk).
The report (tables, plots, the claims' verdicts) is written by :mod:`spannorm.study_report`.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, SpannormError, apply_overrides, read_yaml, require, to_dict
from .files import atomic_write_text, dumps, locked, read_json, sweep_temp
from .train import (
    RunConfig,
    load_run,
    resolve_config_path,
    resolve_shipped,
    run_config_from_dict,
    same_experiment,
    shipped_names,
)

STUDIES = resources.files("spannorm") / "configs" / "studies"
CORE = ("model.scheme", "model.n_layers", "train.lr", "train.seed")  # named in every cell's directory name
STUDY_KEYS = ("base", "set", "tokens_per_cell", "probe", "keep_checkpoints", "grids")
GRID_KEYS = ("name", "axes", "best_lr_seeds")
PROBE_BATCH = 4  # sequences in the probe batch (as `spannorm probe`)


@dataclass
class Grid:
    name: str  # label of the grid in results.csv and report.md
    axes: dict[str, list]  # dotted config path -> values; the grid is the cartesian product of the axes
    best_lr_seeds: list[int] = field(default_factory=list)  # seeds run again at each point's best lr (follow_ups)


@dataclass
class StudyConfig:
    tokens_per_cell: int  # every cell trains on this many tokens: max_steps = tokens / (batch_size · seq_len)
    grids: list[Grid]  # the study is the union of the grids' cells; identical cells run once
    base: str = "tiny"  # preset name or path of a run config YAML
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides applied to base (as --set)
    probe: bool = True  # probe each finished cell's final model into probe.json
    keep_checkpoints: bool = False  # keep finished cells' checkpoints (else deleted after the probe)

    def to_dict(self) -> dict:
        return {
            "base": self.base,
            "set": list(self.set),
            "tokens_per_cell": self.tokens_per_cell,
            "probe": self.probe,
            "keep_checkpoints": self.keep_checkpoints,
            "grids": [{"name": g.name, "axes": g.axes} | _seeds_dict(g) for g in self.grids],
        }


def _seeds_dict(g: Grid) -> dict:
    return {"best_lr_seeds": list(g.best_lr_seeds)} if g.best_lr_seeds else {}


@dataclass
class Cell:
    name: str  # directory name under cells/
    grids: list[str]  # the grids that contain this cell
    axes: dict[str, Any]  # every axis of its grids -> this cell's resolved value
    extras: dict[str, Any]  # non-core axes whose value differs from the base config
    cfg: RunConfig

    @property
    def series(self) -> str:
        """Scheme plus the non-default extra axes: one line in a plot, one row in the claims."""
        return " ".join([self.cfg.model.scheme.value] + [f"{_leaf(k)}={_fmt(v)}" for k, v in self.extras.items()])


# --- config --------------------------------------------------------------------------------


def study_names() -> list[str]:
    return shipped_names(STUDIES)


def resolve_study_path(name: str) -> Path:
    """A study YAML path, or the name of a study shipped in spannorm/configs/studies/."""
    return resolve_shipped(name, STUDIES, "shipped study", "studies")


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def study_from_dict(data: dict, where: Path | None = None) -> StudyConfig:
    """Validate a study mapping; a relative ``base`` path is looked up beside the study file ``where``."""
    for key in data:
        if key not in STUDY_KEYS:
            raise ConfigError(f"unknown key {key}; valid study keys: " + ", ".join(STUDY_KEYS))
    base = data.get("base", "tiny")
    require(isinstance(base, str) and base != "", "base", base, "a preset name or a run config YAML path")
    if where is not None and not Path(base).is_absolute() and (where.parent / base).is_file():
        base = str((where.parent / base).resolve())
    elif Path(base).is_file():
        base = str(Path(base).resolve())
    sets = data.get("set") or []
    require(
        isinstance(sets, list) and all(isinstance(s, str) for s in sets),
        "set",
        sets,
        "a list of KEY=VALUE strings, e.g. [model.d_model=64]",
    )
    tokens = data.get("tokens_per_cell")
    require(
        isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0,
        "tokens_per_cell",
        tokens,
        "a positive integer (the token budget of every cell)",
    )
    for key in ("probe", "keep_checkpoints"):
        require(isinstance(data.get(key, True), bool), key, data.get(key), "true or false")
    grids = data.get("grids")
    require(isinstance(grids, list) and len(grids) > 0, "grids", grids, "a non-empty list of {name, axes} mappings")
    out = []
    for i, g in enumerate(grids):
        require(isinstance(g, dict), f"grids[{i}]", g, "a mapping with keys name, axes")
        for key in g:
            if key not in GRID_KEYS:
                raise ConfigError(f"unknown key grids[{i}].{key}; valid grid keys: " + ", ".join(GRID_KEYS))
        name, axes = g.get("name"), g.get("axes")
        require(
            isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9._-]+", name or "") is not None,
            f"grids[{i}].name",
            name,
            "a name of letters, digits, '.', '_' or '-'",
        )
        require(name not in [o.name for o in out], f"grids[{i}].name", name, "a name no other grid has")
        require(
            isinstance(axes, dict) and len(axes) > 0,
            f"grids[{i}].axes",
            axes,
            "a non-empty mapping of dotted config paths to lists of values",
        )
        for path, values in axes.items():
            require(
                isinstance(path, str) and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", path) is not None,
                f"grids[{i}].axes key",
                path,
                "a dotted config path such as model.n_layers",
            )
            require(
                path != "train.max_steps",
                f"grids[{i}].axes key",
                path,
                "any config path but train.max_steps, which tokens_per_cell sets",
            )
            require(
                isinstance(values, list) and len(values) > 0 and all(_is_scalar(v) for v in values),
                f"grids[{i}].axes.{path}",
                values,
                "a non-empty list of scalar values",
            )
        seeds = g.get("best_lr_seeds", [])
        if "best_lr_seeds" in g:
            require(
                isinstance(seeds, list)
                and len(seeds) > 0
                and len(set(seeds)) == len(seeds)
                and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
                f"grids[{i}].best_lr_seeds",
                seeds,
                "a non-empty list of distinct integer seeds, e.g. [2, 3]",
            )
            for s in seeds:
                require(
                    s not in axes.get("train.seed", []),
                    f"grids[{i}].best_lr_seeds",
                    s,
                    f"a seed not in the grid's train.seed axis {axes.get('train.seed')}",
                )
            lrs = axes.get("train.lr")
            require(
                isinstance(lrs, list) and len(set(lrs)) >= 2,
                f"grids[{i}].axes.train.lr",
                lrs,
                "a list of 2 or more learning rates in a grid with best_lr_seeds",
            )
        out.append(Grid(name, dict(axes), list(seeds)))
    for s in sets:
        if s.partition("=")[0].strip() == "train.max_steps":
            raise ConfigError("set: train.max_steps is invalid here: tokens_per_cell sets every cell's steps")
    return StudyConfig(
        tokens_per_cell=tokens,
        grids=out,
        base=base,
        set=list(sets),
        probe=data.get("probe", True),
        keep_checkpoints=data.get("keep_checkpoints", False),
    )


def load_study(name: str, extra_sets: list[str] = ()) -> StudyConfig:
    """Load a study YAML (or shipped study name); ``extra_sets`` are appended to its ``set``."""
    path = resolve_study_path(name)
    study = study_from_dict(read_yaml(path), where=path)
    study.set += list(extra_sets)
    return study


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _set(d: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise ConfigError(f"axis {path!r} is invalid: {part} is not a section")
    d[leaf] = value


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)


def base_config(study: StudyConfig) -> dict:
    """The base run config as a plain dict, with ``set`` applied (not validated)."""
    return apply_overrides(read_yaml(resolve_config_path(study.base)), list(study.set))


def _steps(study: StudyConfig, cfg_dict: dict, what: str) -> int:
    cfg = run_config_from_dict(copy.deepcopy(cfg_dict))
    per_step = cfg.train.batch_size * cfg.train.seq_len
    if study.tokens_per_cell % per_step:
        raise ConfigError(
            f"tokens_per_cell={study.tokens_per_cell} is invalid{what}: expected a multiple of "
            f"train.batch_size × train.seq_len = {per_step} (e.g. "
            f"{max(1, round(study.tokens_per_cell / per_step)) * per_step})"
        )
    steps = study.tokens_per_cell // per_step
    if cfg.train.warmup_steps >= steps:
        raise ConfigError(
            f"train.warmup_steps={cfg.train.warmup_steps} is invalid{what}: expected fewer than "
            f"the {steps} steps that tokens_per_cell gives"
        )
    return steps


def expand(study: StudyConfig, follow: list[tuple[Grid, dict]] = ()) -> list[Cell]:
    """Every distinct cell of the study, in grid order; validates every cell's config.

    ``follow`` (from :func:`follow_ups`): (grid, axis point) pairs of the second phase, whose new
    cells come after all the grids' cells.
    """
    base = base_config(study)
    try:
        base_cfg = run_config_from_dict(copy.deepcopy(base))
    except ConfigError as e:
        raise ConfigError(f"base {study.base!r} with set {study.set}: {e}") from None
    _set(base, "train.max_steps", _steps(study, base, " for the base config"))
    base_flat = to_dict(base_cfg)
    by_config: dict[str, Cell] = {}
    by_name: dict[str, Cell] = {}

    def add(grid: Grid, point: dict) -> None:
        paths = list(point)
        what = f" in grid {grid.name!r} at " + ", ".join(f"{k}={_fmt(v)}" for k, v in point.items())
        d = copy.deepcopy(base)
        for path, value in point.items():
            _set(d, path, value)
        try:
            _set(d, "train.max_steps", _steps(study, d, what))
            cfg = run_config_from_dict(d)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if what in msg else f"{msg} ({what.strip()})") from None
        flat = to_dict(cfg)
        key = json.dumps(flat, sort_keys=True)
        resolved = {p: _get(flat, p) for p in paths}
        if key in by_config:
            cell = by_config[key]
            if grid.name not in cell.grids:
                cell.grids.append(grid.name)
            for p, v in resolved.items():
                cell.axes.setdefault(p, v)
            return
        extras = {p: v for p, v in resolved.items() if p not in CORE and v != _get(base_flat, p)}
        m, t = cfg.model, cfg.train
        name = f"{m.scheme.value}_L{m.n_layers}_lr{t.lr:g}_s{t.seed}" + "".join(
            f"_{_leaf(p)}-{_fmt(v)}" for p, v in extras.items()
        )
        name = re.sub(r"[^A-Za-z0-9._+-]", "-", name)
        if name in by_name:
            raise ConfigError(
                f"two different cells get the directory name {name!r} (grid {grid.name!r}); "
                "make their axis values differ in scheme, depth, lr, seed or an extra axis"
            )
        cell = Cell(name, [grid.name], resolved, extras, cfg)
        by_config[key] = by_name[name] = cell

    for i, grid in enumerate(study.grids):
        if "train.seed" not in grid.axes:  # the grid runs the base config's seed
            require(
                base_cfg.train.seed not in grid.best_lr_seeds,
                f"grids[{i}].best_lr_seeds",
                base_cfg.train.seed,
                "a seed other than the base config's train.seed (the grid has no train.seed axis)",
            )
        for values in itertools.product(*grid.axes.values()):
            add(grid, dict(zip(grid.axes, values)))
    for grid, point in follow:
        add(grid, point)
    return list(by_config.values())


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
        out.setdefault((c.series, c.cfg.model.n_layers, c.cfg.train.lr), c)
    return out


def lr_points(cells: list[Cell], rows: list[dict]) -> dict:
    """(series, depth) -> {lr: the first seed's results.csv row}, for best_lr and stable_lrs."""
    row_of = {c.name: r for c, r in zip(cells, rows)}
    out: dict = {}
    for (series, depth, lr), c in sorted(first_seed(cells).items(), key=lambda kv: kv[0][2]):
        out.setdefault((series, depth), {})[lr] = row_of[c.name]
    return out


def follow_ups(study: StudyConfig, cells: list[Cell], rows: list[dict]) -> list[Cell]:
    """The first phase's ``cells`` (rows: their results) plus the second phase: for each grid with
    best_lr_seeds, each (series, depth) of its cells whose first-seed cells have all finished gets cells
    for those seeds at its best_lr. A pure function of the results, so a resumed study finds the same ones."""
    follow = []
    for grid in study.grids:
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
                follow += [(grid, {p: cell.axes[p] for p in grid.axes} | {"train.seed": s}) for s in grid.best_lr_seeds]
    return expand(study, follow) if follow else list(cells)


# --- running -------------------------------------------------------------------------------


def run_cell(cfg_dict: dict, run_dir: str, probe: bool, keep_checkpoints: bool, threads: int | None = None) -> dict:
    """Train (or reuse, or resume) one cell, probe its final model, drop its checkpoints.

    Runs in a worker process when the study has ``jobs > 1``; everything it writes is atomic, so
    a kill at any point leaves a cell that the next run of the study reuses or resumes.
    """
    import torch

    from .compare import run_scheme
    from .probe_command import run_probe

    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    summary = run_scheme(run_config_from_dict(cfg_dict), run_dir, progress=False)
    reused = bool(summary.get("reused"))
    ckpts = run_dir / "checkpoints"
    if probe and not summary["diverged"] and not (run_dir / "probe.json").is_file() and (ckpts / "latest").is_file():
        row = run_probe(None, [], [], PROBE_BATCH, checkpoint=run_dir)[0]
        atomic_write_text(run_dir / "probe.json", dumps(row))
    if not keep_checkpoints and ckpts.exists():
        shutil.rmtree(ckpts)
    if not reused or not (run_dir / "cell.json").is_file():  # the wall time of the session that finished it
        atomic_write_text(run_dir / "cell.json", dumps({"wall_s": time.perf_counter() - t0}))
    return summary | {"reused": reused}


def _cell_threads(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def run_cells(study: StudyConfig, cells: list[Cell], out: Path, jobs: int, log) -> dict[str, str]:
    """Run every cell; returns {cell name: error} for the cells that failed (the others are on disk)."""
    from .data import prepare

    for cell in cells:  # a cell directory of another config is a user error: refuse before any training
        run_dir = out / "cells" / cell.name
        if (run_dir / "config.yaml").is_file() and not same_experiment(load_run(run_dir), cell.cfg):
            raise ConfigError(
                f"--out {str(out)!r} holds a cell {cell.name!r} with another config: "
                "choose another --out (or delete that cell)"
            )
    for data in {json.dumps(to_dict(c.cfg.data), sort_keys=True): c.cfg.data for c in cells}.values():
        prepare(data)  # once, here, before any worker starts
    failed: dict[str, str] = {}
    n = len(cells)

    def done(i: int, cell: Cell, summary: dict | None, error: str | None) -> None:
        if error is not None:
            failed[cell.name] = error
            log(f"[{i}/{n}] {cell.name}: FAILED: {error}")
            return
        val = summary["final_val_loss"]
        verdict = (
            f"diverged at step {summary['diverged_step']} ({summary['diverged_reason']})"
            if summary["diverged"]
            else "stalled"
            if summary.get("stalled")
            else "ok"
        )
        log(
            f"[{i}/{n}] {cell.name}: {'reused' if summary['reused'] else 'trained'}, val loss "
            f"{'—' if val is None else f'{val:.4f}'}, {verdict}"
        )

    def args(cell: Cell) -> tuple:
        return (to_dict(cell.cfg), str(out / "cells" / cell.name), study.probe, study.keep_checkpoints)

    if jobs == 1:
        for i, cell in enumerate(cells, 1):
            try:
                done(i, cell, run_cell(*args(cell)), None)
            except (SpannormError, RuntimeError, OSError, ValueError) as e:
                done(i, cell, None, f"{type(e).__name__}: {' '.join(str(e).split())}")
        return failed

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    old_term = _sigterm_interrupts()
    try:
        futures = {pool.submit(run_cell, *args(cell), threads=_cell_threads(jobs)): cell for cell in cells}
        for i, fut in enumerate(as_completed(futures), 1):
            try:
                done(i, futures[fut], fut.result(), None)
            except Exception as e:  # the worker's exception, or a dead worker (BrokenProcessPool)
                done(i, futures[fut], None, f"{type(e).__name__}: {' '.join(str(e).split())}")
    except BaseException:  # Ctrl-C or SIGTERM: stop the workers; their cells resume from a checkpoint next time
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    pool.shutdown()
    return failed


def _sigterm_interrupts():
    """Make SIGTERM interrupt like Ctrl-C, so that ``kill PID`` also stops the worker processes (a
    study started in the background with ``&`` ignores SIGINT). Returns the previous handler, or None
    where handlers cannot be set (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


# --- results -------------------------------------------------------------------------------

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
)  # the guard's columns: empty unless train.guard=true


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
    s = read_json(summary_path, "delete it and run the study again to write it again")
    cell_json = run_dir / "cell.json"
    wall = json.loads(cell_json.read_text())["wall_s"] if cell_json.is_file() else None
    t = cell.cfg.train
    row |= {k: s.get(k) for k in RESULT_COLUMNS if k in s}
    row |= {
        "tokens": s["steps"] * t.batch_size * t.seq_len,
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


# --- the study -----------------------------------------------------------------------------


def run_study(
    study: StudyConfig, out: Path, command: str, jobs: int = 1, log=print, report_only: bool = False
) -> list[dict]:
    """Run (or resume) every cell of ``study`` into ``out/cells``; write results.csv, plots and report.md.

    Cells run seed by seed and shallow depths first, so a study stopped early has covered every
    scheme; then the follow_ups of grids with best_lr_seeds, the same way. ``report_only``: train
    nothing; report the cells finished so far (the rest "not run").

    A study that trains holds the lock of ``out`` (a second one into it is refused) and first deletes the
    temporary files that kills left; ``report_only`` takes no lock (it trains nothing, and every file it
    writes is replaced atomically), so it can report on a study that is running.
    """
    require(isinstance(jobs, int) and jobs >= 1, "--jobs", jobs, "a positive integer")
    out = Path(out)
    cells = expand(study)  # validates before any file is written
    if report_only:
        return _run_study(study, cells, out, command, jobs, log, report_only)
    with locked(out, "--out"):
        sweep_temp(out, out / "plots", *out.glob("cells/*"))  # (each cell's checkpoints: when train resumes it)
        return _run_study(study, cells, out, command, jobs, log, report_only)


def _run_study(
    study: StudyConfig, cells: list[Cell], out: Path, command: str, jobs: int, log, report_only: bool
) -> list[dict]:
    """The body of :func:`run_study`."""
    from .study_report import (
        claims,
        init_probe,
        plot_ablation,
        plot_best_lr,
        plot_curves,  # it imports this module
        plot_grad_heatmaps,
        plot_similarity,
        plot_val,
        report,
    )

    before = {c.name for c in cells if (out / "cells" / c.name / "summary.json").is_file()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.yaml", yaml.safe_dump(study.to_dict(), sort_keys=False))
    log(f"study: {len(cells)} cells ({len(before)} finished before) -> {out / 'cells'}")
    failed: dict[str, str] = {}

    def run(todo: list[Cell]) -> None:
        if report_only:
            failed.update({c.name: "not run" for c in todo if c.name not in before})
        else:
            order = sorted(todo, key=lambda c: (c.cfg.train.seed, c.cfg.model.n_layers))  # stable: grid order otherwise
            failed.update(run_cells(study, order, out, jobs, log))

    run(cells)
    rows = [cell_result(c, out, failed.get(c.name)) for c in cells]
    if any(g.best_lr_seeds for g in study.grids):  # the second phase, found again from the first's results
        n = len(cells)
        cells = follow_ups(study, cells, rows)
        more = cells[n:]
        before |= {c.name for c in more if (out / "cells" / c.name / "summary.json").is_file()}
        log(
            f"best-lr seeds: {len(more)} cells at each series' best lr ({len(before & {c.name for c in more})} "
            "finished before)"
        )
        run(more)
        rows = [cell_result(c, out, failed.get(c.name)) for c in cells]
    write_results(out / "results.csv", cells, rows)
    cs, rs = cells, rows
    plots = []
    if cs:
        for name, make in (
            ("val_vs_depth.png", lambda p: plot_val(p, cs, rs, "depth")),
            ("val_vs_lr.png", lambda p: plot_val(p, cs, rs, "lr")),
            ("ablation.png", lambda p: plot_ablation(p, cs, rs)),
            ("best_lr.png", lambda p: plot_best_lr(p, cs, rs)),
            ("loss_curves.png", lambda p: plot_curves(p, cs, out)),
            ("grad_heatmaps.png", lambda p: plot_grad_heatmaps(p, cs, out)),
            ("similarity.png", lambda p: plot_similarity(p, cs, out)),
        ):
            if make(out / "plots" / name):
                plots.append(f"plots/{name}")
    depths = sorted({c.cfg.model.n_layers for c in cells})
    base = base_config(study)
    _set(base, "train.max_steps", cells[0].cfg.train.max_steps)
    init = init_probe(base, depths, out / "init_probe.json")
    not_run = sum(e == "not run" for e in failed.values())
    counts = {
        "trained": len([c for c in cells if c.name not in before and c.name not in failed]),
        "reused": len(before),
        "failed": len(failed) - not_run,
        "not run": not_run,
    }
    text = report(study, cs, rs, out, command, plots, claims(cs, rs, out, init), counts)
    atomic_write_text(out / "report.md", text)
    if failed and not report_only:
        raise SpannormError(
            f"{len(failed)} of {len(cells)} cells failed ({', '.join(sorted(failed))}); "
            f"see {out / 'results.csv'}; run the study again to retry them"
        )
    return rows
