"""A grid's search: per point of its axes, the best over one or two searched axes (say learning rate × init
scale), bracketed on each, then confirmation cells at that best.

The rule, fixed before the data. Each searched axis is a lattice start · factor^k within [min, max]; a cell
is a point plus one lattice value per axis, trained on the study's tokens_per_cell with the point's seed.
  1. The first cells are the start and its neighbours one step away on each axis (a cross of 5 cells for
     two axes). With ``warm_start`` (an axis of the grid, e.g. model.n_layers), a point starts at the best of
     the point with the previous value on that axis, once that one's search is done.
  2. The *best* is the cell with the lowest final val loss among those that neither diverged nor stalled
     (ties: the earlier lattice position). While any of its neighbours one step away on each axis is not
     yet trained, those are added; so the search moves until the best has been compared with a worse (or
     failed) cell on both sides of every axis: it is *bracketed*. A neighbour outside [min, max] is not
     added, and the report says which axis reached its limit. With ``diagonals`` (a grid's option) the
     neighbours are also those one step away on two axes at once (8 for two axes), and the first cells a
     square of 9: a best where the axes trade against each other is no longer missed.
  3. If no cell trained, the search steps down the first axis (a lower learning rate) from its lowest
     value tried, until one trains or the limit is reached.
  4. A point whose search is done gets ``confirm`` cells at its best: each of the confirm seeds, on the
     confirm budget, with the confirm overrides.
The search is a pure function of the finished cells on disk: a stopped study replays it to the same cells.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import upgrade_key
from ..output import md_table
from .grid import Cell, Follow, Grid, Peer, Plan, build_cell, canonical, leaf
from .results import cell_result

Coords = tuple[int, ...]
FINISHED = ("ok", "stalled", "diverged")


@dataclass
class Search:
    """One point's search: its cells by lattice coordinates, and where it stands."""

    grid: Grid
    point: dict  # the grid's axes -> this point's values
    tried: dict[Coords, tuple[Cell, dict]] = field(default_factory=dict)  # coords -> (cell, results.csv row)
    state: str = "waiting"  # waiting (for its warm start), running, done
    best: Coords | None = None
    limits: list[str] = field(default_factory=list)  # the axes whose limit stopped the bracket, in words

    def values(self, coords: Coords) -> dict:
        """The searched axes' values at ``coords``."""
        return {path: axis.at(k) for (path, axis), k in zip(self.grid.search.items(), coords)}


def _trained(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("final_val_loss") not in (None, "")


def _neighbours(grid: Grid, coords: Coords) -> tuple[list[Coords], list[str]]:
    """The lattice neighbours of ``coords`` one step away on each axis (and, with ``grid.diagonals``, on several
    at once, after those), and the limits that left some out."""
    out, limits = [], []
    axes = list(grid.search.values())
    for i, (path, axis) in enumerate(grid.search.items()):
        for step, bound in ((-1, "min"), (1, "max")):
            c = coords[:i] + (coords[i] + step,) + coords[i + 1 :]
            if axis.at(c[i]) is None:
                limits.append(f"{path} reached its limit {bound}={getattr(axis, bound):g}")
            else:
                out.append(c)
    if grid.diagonals:
        for steps in itertools.product((-1, 0, 1), repeat=len(axes)):
            c = tuple(k + s for k, s in zip(coords, steps))
            if sum(s != 0 for s in steps) > 1 and all(axis.at(k) is not None for axis, k in zip(axes, c)):
                out.append(c)
    return out, limits


def _replay(plan: Plan, search: Search, start: Coords, out: Path, failed: dict) -> None:
    """Run the rule over the cells on disk from ``start``: fills ``search.tried``, ``state``, ``best``."""
    grid = search.grid
    todo = [start] + _neighbours(grid, start)[0]
    while True:
        new = [c for c in todo if c not in search.tried]
        for c in new:
            cell = build_cell(plan, Follow(grid, search.point | search.values(c)))
            search.tried[c] = (cell, cell_result(cell, out, failed.get(cell.name)))
        if any(row.get("status") not in FINISHED for _, row in search.tried.values()):
            search.state = "running"
            return
        scored = {c: float(row["final_val_loss"]) for c, (_, row) in search.tried.items() if _trained(row)}
        if not scored:  # rule 3: nothing trained: a lower value of the first axis
            low = min(search.tried, key=lambda c: (c[0], c))
            down = (low[0] - 1,) + low[1:]
            if grid.search[next(iter(grid.search))].at(down[0]) is None:
                search.state, search.limits = (
                    "done",
                    [f"no cell trained down to the limit of {next(iter(grid.search))}"],
                )
                return
            todo = [down]
            continue
        search.best = min(scored, key=lambda c: (scored[c], c))
        ring, search.limits = _neighbours(grid, search.best)
        todo = [c for c in ring if c not in search.tried]
        if not todo:
            search.state = "done"
            return


def _points(axes: dict) -> list[dict]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def confirm_follow(search: Search) -> list[Follow]:
    """The confirmation cells ``search`` asks for: none until it is done with a best."""
    conf = search.grid.confirm
    if search.state != "done" or search.best is None or conf is None:
        return []
    at = search.point | search.values(search.best)
    return [
        Follow(search.grid, at | {"train.seed": seed}, conf.tokens_per_cell, tuple(conf.set)) for seed in conf.seeds
    ]


def confirmed(plan: Plan, search: Search, out: Path, failed: dict) -> list[dict] | None:
    """The results.csv rows of ``search``'s confirmation cells, or None while any is not finished (or it has none)."""
    follow = confirm_follow(search)
    if not follow:
        return None
    rows = [cell_result(c, out, failed.get(c.name)) for c in (build_cell(plan, f) for f in follow)]
    return rows if rows and all(r.get("status") in FINISHED for r in rows) else None


def mean_val(rows: list[dict]) -> float | None:
    vals = [float(r["final_val_loss"]) for r in rows if _trained(r)]
    return sum(vals) / len(vals) if vals else None


def best_peer(plan: Plan, peer: Peer, earlier: list[Search], out: Path, failed: dict) -> str | None:
    """``peer`` resolved (:class:`~spannorm.study.grid.Peer`) from the searches ``earlier``, or None while it is
    not known yet."""
    mine = [
        s
        for s in earlier
        if s.grid.name == peer.grid
        and s.point.get("model.scheme") in peer.among
        and all(canonical(s.point).get(upgrade_key(k)) == v for k, v in peer.at.items())
    ]
    scores = {}
    for s in mine:
        if s.state != "done":
            return None
        if s.best is None:
            continue  # nothing trained: not a candidate
        rows = confirmed(plan, s, out, failed)
        if rows is None:
            return None
        if (m := mean_val(rows)) is not None:
            scores[s.point["model.scheme"]] = m
    return min(scores, key=lambda k: (scores[k], k)) if scores else None


def searches(plan: Plan, out: Path, failed: dict | None = None) -> list[Search]:
    """Every searched point of the study, replayed against the cells in ``out`` (``failed``: cell name ->
    error of this session, whose cells count as not finished)."""
    failed = failed or {}
    result: list[Search] = []
    for grid in plan.study.grids:
        if not grid.search:
            continue
        axes = dict(grid.axes)
        if grid.peer is not None and (name := best_peer(plan, grid.peer, result, out, failed)) is not None:
            axes["model.scheme"] = list(dict.fromkeys(axes["model.scheme"] + [name]))
        done: dict[str, Search] = {}
        warm = grid.warm_start
        order = axes[warm] if warm else [None]
        for point in sorted(_points(axes), key=lambda p: order.index(p[warm]) if warm else 0):
            search = Search(grid, point)
            start: Coords | None = (0,) * len(grid.search)
            if warm and (i := order.index(point[warm])) > 0:
                prev = done[repr(point | {warm: order[i - 1]})]
                start = None if prev.state != "done" else (prev.best or start)
            if start is not None:
                _replay(plan, search, start, out, failed)
            done[repr(point)] = search
            result.append(search)
    return result


def search_follow(found: list[Search]) -> list[Follow]:
    """The cells the searches ask for: every cell tried, and the confirm cells of each point that is done."""
    follow = []
    for s in found:
        follow += [Follow(s.grid, s.point | s.values(c)) for c in s.tried] + confirm_follow(s)
    return follow


def confirm_cells(search: Search, cells: list[Cell]) -> list[Cell]:
    """The confirmation cells of ``search`` among ``cells`` (empty until its search is done)."""
    if search.state != "done" or search.best is None or search.grid.confirm is None:
        return []
    best = search.tried[search.best][0]
    conf = search.grid.confirm
    same = {p: best.axes[p] for p in best.axes if p != "train.seed"}
    return [
        c
        for c in cells
        if c.tokens == conf.tokens_per_cell
        and search.grid.name in c.grids
        and all(c.axes.get(p) == v for p, v in same.items())
    ]


# --- the report ------------------------------------------------------------------------------

RECIPE_MARGIN = 0.05  # nats: a recipe (the searched axes' start values) within this of the best does not handicap


def _label(search: Search) -> str:
    p = search.point
    rest = [f"{leaf(k)}={v}" for k, v in p.items() if k not in ("model.scheme", "model.n_layers", "train.seed")]
    return " ".join([str(p.get("model.scheme", "")), *rest]).strip() + (
        f", L={p['model.n_layers']}" if "model.n_layers" in p else ""
    )


def _entry(row: dict) -> str:
    status = row.get("status", "")
    if status == "ok":
        return f"{float(row['final_val_loss']):.3f}"
    if status == "stalled":
        return f"{float(row['final_val_loss']):.3f} stalled"
    return "div" if status == "diverged" else "…" if status in ("not run", "failed: no summary.json") else "failed"


def _confirm_text(search: Search, cells: list[Cell], row_of: dict) -> str:
    mine = confirm_cells(search, cells)
    vals = [float(row_of[c.name]["final_val_loss"]) for c in mine if _trained(row_of[c.name])]
    if not mine:
        return "—"
    n, bad = len(mine), sum(row_of[c.name].get("status") in ("diverged", "stalled") for c in mine)
    tail = f", {bad} diverged or stalled)" if bad else ")"
    if not vals:
        return f"none trained (0/{n}{tail}"
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "") + f" (n={len(vals)}/{n}{tail}"


def recipe_gap(search: Search) -> float | None:
    """At the best value of the first axis (the lr), the recipe's (the other axes at their start) val loss minus
    the best's: rule R1's number. None if there is no best or the recipe's cell there is not run; inf if it
    diverged or stalled (a recipe that does not train at the best lr handicaps its scheme most of all)."""
    if search.best is None:
        return None
    at = (search.best[0],) + (0,) * (len(search.best) - 1)
    row = search.tried.get(at, (None, {}))[1]
    if row.get("status") in ("diverged", "stalled"):
        return math.inf
    if not _trained(row):
        return None
    return float(row["final_val_loss"]) - float(search.tried[search.best][1]["final_val_loss"])


def recipe_text(search: Search) -> str:
    gap = recipe_gap(search)
    if gap is None:
        return "—"
    if gap == math.inf:
        return f"{search.tried[(search.best[0],) + (0,) * (len(search.best) - 1)][1]['status']} **handicap**"
    return f"{gap:+.3f}" + (" ok" if gap <= RECIPE_MARGIN else " **handicap**")


def _unique(found: list[Search]) -> list[Search]:
    """The searches, less those that tried the same cells as one before (a point two grids searched alike)."""
    seen: set = set()
    unique = []
    for s in found:
        same = frozenset(c.name for c, _ in s.tried.values())
        if not same or same not in seen:
            unique.append(s)
        seen.add(same)
    return unique


def search_report(found: list[Search], cells: list[Cell], rows: list[dict]) -> str:
    """Markdown: one summary row per searched point, then each point's search history (every cell it tried); a
    point that another grid searched with the same cells (e.g. a warm start's first value) is shown once."""
    found = _unique(found)
    if not found:
        return ""
    row_of = {c.name: r for c, r in zip(cells, rows)}
    # the searched axes of every grid, in order (a grid may search fewer: its rows show — for the others)
    paths = list(dict.fromkeys(p for s in found for p in s.grid.search))
    leaves = [leaf(p) for p in paths]
    summary = []
    for s in found:
        best = s.values(s.best) if s.best is not None else {}
        val = _entry(s.tried[s.best][1]) if s.best is not None else "—"
        bracket = (
            "waiting"
            if s.state == "waiting"
            else "running"
            if s.state == "running"
            else ("yes" if not s.limits else "; ".join(s.limits))
        )
        summary.append(
            [_label(s), *[f"{best[p]:g}" if p in best else "—" for p in paths], val, bracket]
            + ([recipe_text(s) if len(s.grid.search) > 1 else "—"] if len(paths) > 1 else [])
            + [_confirm_text(s, cells, row_of)]
        )
    head = ["point", *[f"best {name}" for name in leaves], "val loss there (search seed)", "bracketed"]
    if len(paths) > 1:
        start = next(s.grid.search[paths[1]].start for s in found if paths[1] in s.grid.search)
        head += [f"recipe ({leaves[1]}={start:g}) − best, at the best {leaves[0]}"]
    head += ["confirmation: val loss"]
    return "\n".join([md_table(head, summary), "", *(_history(s) for s in found if s.tried)]).rstrip()


def _history(s: Search) -> str:
    """Markdown: every cell a search tried, on its own axes (lr across; a second axis down), the best in bold."""
    axes = list(s.grid.search.values())
    names = [leaf(p) for p in s.grid.search]
    xs = sorted({c[0] for c in s.tried})
    ys = sorted({c[1] for c in s.tried}) if len(axes) > 1 else [None]
    table = []
    for y in ys:
        cells_y = []
        for x in xs:
            c = (x,) if y is None else (x, y)
            e = _entry(s.tried[c][1]) if c in s.tried else ""
            cells_y.append(f"**{e}**" if c == s.best else e)
        table.append(([f"{axes[1].at(y):g}"] if y is not None else [""]) + cells_y)
    head = [f"{names[1]} \\ {names[0]}" if len(axes) > 1 else ""] + [f"{axes[0].at(x):g}" for x in xs]
    return f"{_label(s)} ({len(s.tried)} cells; {s.state}):\n\n{md_table(head, table)}\n"


def transfer_series(found: list[Search]) -> dict[str, dict[tuple, dict]]:
    """The searches of each grid that searches one axis (the lr) with a ``warm_start``: by grid name, then by series
    (the point less the warm-start axis, as (key, value) pairs), then by the warm-start axis's value."""
    grids: dict[str, dict[tuple, dict]] = {}
    for s in found:
        if s.grid.warm_start is not None and len(s.grid.search) == 1:
            rest = tuple((k, v) for k, v in s.point.items() if k != s.grid.warm_start)
            grids.setdefault(s.grid.name, {}).setdefault(rest, {})[s.point[s.grid.warm_start]] = s
    return grids


def transfer_report(found: list[Search]) -> str:
    """Markdown: for each grid of :func:`transfer_series`, how the best moves along the warm-start axis (a width, a
    depth): a table per grid, a row per series with the best at each of its values and the move from the first value
    to the last in lattice steps; *transfers*: at most one step (a factor of the lattice's ``factor``), both ends
    bracketed. Empty if no grid is such."""
    lines = []
    for name, series in transfer_series(found).items():
        grid = next(iter(next(iter(series.values())).values())).grid
        (path, lattice), axis = next(iter(grid.search.items())), grid.warm_start
        values = grid.axes[axis]
        rows = []
        for rest, by_value in series.items():
            bests = [
                by_value[v].values(by_value[v].best)[path] if by_value[v].best is not None else None for v in values
            ]
            ends = (by_value[values[0]], by_value[values[-1]])
            done = all(s.state == "done" and s.best is not None and not s.limits for s in ends)
            steps = round(math.log(bests[-1] / bests[0], lattice.factor)) if done else None
            verdict = "—" if steps is None else "transfers" if abs(steps) <= 1 else "moves"
            label = " ".join(f"{leaf(k)}={v}" for k, v in rest if k != "train.seed")
            best_text = [f"{b:g}" if b is not None else "…" for b in bests]
            rows.append([label, *best_text, "—" if steps is None else f"{steps:+d}", verdict])
        along = leaf(axis)
        head = ["series", *(f"best {leaf(path)}, {along}={v}" for v in values), "move (steps)", "verdict"]
        lines += [f"Grid {name} (along {along}):", "", md_table(head, rows), ""]
    return "\n".join(lines).rstrip()
