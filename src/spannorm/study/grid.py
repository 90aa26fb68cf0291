"""A study's config, its grids, and their expansion into cells.

:class:`StudyConfig` and :class:`Grid` are read with :func:`spannorm.config.from_dict` (key and type
checks) and check the rest themselves. :func:`plan_study` resolves the base run config once, with the
step count that ``tokens_per_cell`` gives; :func:`expand` turns the plan into the study's distinct cells.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from ..config import ConfigError, apply_overrides, from_dict, legacy_key, read_yaml, require, to_dict, upgrade_key
from ..output import value
from ..run_config import (
    Distributed,
    RunConfig,
    read_config_mapping,
    resolve_shipped,
    run_config_from_dict,
    shipped_names,
)

STUDIES = resources.files("spannorm") / "configs" / "studies"
CORE = ("model.scheme", "model.n_layers", "train.lr", "train.seed")  # named in every cell's directory name
PROBE_BATCH = 4  # sequences in the probe batch (as `spannorm probe`)


@dataclass
class SearchAxis:
    """One axis of a grid's search (:mod:`spannorm.study.search`): the values start · factor^k in [min, max]."""

    start: float  # the first centre
    min: float  # the search never goes below it (a stated limit)
    max: float  # nor above it
    factor: float = 2.0  # one step: × factor

    def check(self, where: str) -> None:
        require(self.factor > 1, f"{where}.factor", self.factor, "a number > 1")
        require(self.min > 0, f"{where}.min", self.min, "a positive number")
        require(
            self.min <= self.start <= self.max, f"{where}.start", self.start, f"a number in [{self.min}, {self.max}]"
        )

    def at(self, k: int) -> float | None:
        """The k-th value from the start (k may be negative), or None outside [min, max]."""
        v = float(f"{self.start * self.factor**k:.6g}")
        return v if self.min * (1 - 1e-9) <= v <= self.max * (1 + 1e-9) else None


@dataclass
class Confirm:
    """Confirmation cells at each searched point's best: other seeds, a larger budget."""

    seeds: list[int]  # seeds trained at the best (the search's seed may be among them: a new run at this budget)
    tokens_per_cell: int  # the budget of each confirmation cell
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides for these cells only (e.g. a longer warmup)

    def check(self, where: str) -> None:
        require(
            len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds),
            f"{where}.seeds",
            self.seeds,
            "a non-empty list of distinct integer seeds",
        )
        require(self.tokens_per_cell > 0, f"{where}.tokens_per_cell", self.tokens_per_cell, "a positive integer")
        check_sets(self.set, f"{where}.set:")


@dataclass
class Peer:
    """The best peer, added to a grid's model.scheme axis once it is known: of the ``among`` schemes' points
    of grid ``grid`` (an earlier grid with a search and confirm) whose other axes match ``at``, the one with the
    lowest mean confirmed val loss, once every one of them has finished its confirmation cells."""

    grid: str
    among: list[str]
    at: dict[str, Any] = field(default_factory=dict)


@dataclass
class Grid:
    name: str  # label of the grid in results.csv and report.md
    axes: dict[str, list[Any]]  # dotted config path -> values; the grid is the cartesian product of the axes
    best_lr_seeds: list[int] = field(default_factory=list)  # seeds run again at each point's best lr (follow_ups)
    # per point of the axes, a search for the best over these axes (e.g. train.lr and model.init_scale), extended
    # while the best sits at an edge (spannorm.study.search); the axes themselves then hold one seed
    search: dict[str, SearchAxis] = field(default_factory=dict)
    # an axis of ``axes`` (e.g. model.n_layers): a point's search starts at the best of the point with the previous
    # value on it, once that one is done (the first value starts at the search's start)
    warm_start: str | None = None
    # the search also brackets its best diagonally (all 8 neighbours for two axes, not the cross of 4), so that a
    # best where one axis trades against the other (a smaller init that lets a higher lr train) is found
    diagonals: bool = False
    confirm: Confirm | None = None  # cells at each searched point's best (needs search)
    peer: Peer | None = None  # adds the best peer of an earlier grid to model.scheme (needs search)

    def _check_search(self, where: str) -> None:
        for path, axis in self.search.items():
            require(
                upgrade_key(path) not in canonical(self.axes) and path != "train.max_steps",
                f"{where}.search key",
                path,
                "a config path that is not one of the grid's axes (nor train.max_steps)",
            )
            axis.check(f"{where}.search.{path}")
        require(len(self.search) <= 2, f"{where}.search", list(self.search), "one or two axes")
        require(
            not (self.search and self.best_lr_seeds),
            f"{where}.best_lr_seeds",
            self.best_lr_seeds,
            "empty in a grid with a search (its confirm: seeds run at the best)",
        )
        require(
            self.warm_start is None or (self.search and upgrade_key(self.warm_start) in canonical(self.axes)),
            f"{where}.warm_start",
            self.warm_start,
            f"one of the grid's axes {list(self.axes)}, in a grid with a search",
        )
        if self.warm_start is not None:  # (the axis as the grid spells it)
            self.warm_start = next(p for p in self.axes if upgrade_key(p) == upgrade_key(self.warm_start))
        require(self.confirm is None or bool(self.search), f"{where}.confirm", "set", "a grid with a search (search:)")
        require(isinstance(self.diagonals, bool), f"{where}.diagonals", self.diagonals, "true or false")
        require(not self.diagonals or bool(self.search), f"{where}.diagonals", True, "false in a grid without a search")
        if self.confirm is not None:
            self.confirm.check(f"{where}.confirm")
        require(
            self.peer is None or (bool(self.search) and "model.scheme" in self.axes),
            f"{where}.peer",
            "set",
            "a grid with a search and a model.scheme axis",
        )

    def _check_axis(self, where: str, path: str, values: list) -> None:
        require(
            re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", path) is not None,
            f"{where}.axes key",
            path,
            "a dotted config path such as model.n_layers",
        )
        require(
            path != "train.max_steps",
            f"{where}.axes key",
            path,
            "any config path but train.max_steps, which tokens_per_cell sets",
        )
        require(  # (an old flat key and its new one: the same option)
            [upgrade_key(p) for p in self.axes].count(upgrade_key(path)) == 1,
            f"{where}.axes key",
            path,
            f"an option given once (its old flat key and {upgrade_key(path)} are the same option)",
        )
        require(
            len(values) > 0 and all(_is_scalar(v) for v in values),
            f"{where}.axes.{path}",
            values,
            "a non-empty list of scalar values",
        )

    def check(self, where: str) -> None:
        """Raise a ConfigError unless the grid is valid; ``where`` names it in errors (grids[0])."""
        require(
            re.fullmatch(r"[A-Za-z0-9._-]+", self.name) is not None,
            f"{where}.name",
            self.name,
            "a name of letters, digits, '.', '_' or '-'",
        )
        require(
            len(self.axes) > 0,
            f"{where}.axes",
            self.axes,
            "a non-empty mapping of dotted config paths to lists of values",
        )
        for path, values in self.axes.items():
            self._check_axis(where, path, values)
        self._check_search(where)
        if not self.best_lr_seeds:
            return
        require(
            len(set(self.best_lr_seeds)) == len(self.best_lr_seeds),
            f"{where}.best_lr_seeds",
            self.best_lr_seeds,
            "a list of distinct integer seeds, e.g. [2, 3]",
        )
        for s in self.best_lr_seeds:
            require(
                s not in self.axes.get("train.seed", []),
                f"{where}.best_lr_seeds",
                s,
                f"a seed not in the grid's train.seed axis {self.axes.get('train.seed')}",
            )
        lrs = self.axes.get("train.lr")
        require(
            isinstance(lrs, list) and len(set(lrs)) >= 2,
            f"{where}.axes.train.lr",
            lrs,
            "a list of 2 or more learning rates in a grid with best_lr_seeds",
        )


@dataclass(kw_only=True)
class StudyConfig:
    base: str = "tiny"  # preset name or path of a run config YAML
    set: list[str] = field(default_factory=list)  # KEY=VALUE overrides applied to base (as --set)
    tokens_per_cell: int  # every cell trains on this many tokens: max_steps = tokens / tokens per step
    # processes per cell, under torchrun (cells whose train.distributed is ddp or fsdp); a step's tokens are
    # batch_size × seq_len × grad_accum_steps × nproc_per_cell
    nproc_per_cell: int = 1
    probe: bool = True  # probe each finished cell's final model into probe.json
    keep_checkpoints: bool = False  # keep finished cells' checkpoints (else deleted after the probe)
    grids: list[Grid]  # the study is the union of the grids' cells; identical cells run once
    note: str = ""  # printed at the top of report.md (e.g. why a study is superseded)

    def __post_init__(self):
        require(self.base != "", "base", self.base, "a preset name or a run config YAML path")
        require(
            self.tokens_per_cell > 0,
            "tokens_per_cell",
            self.tokens_per_cell,
            "a positive integer (the token budget of every cell)",
        )
        require(
            self.nproc_per_cell >= 1,
            "nproc_per_cell",
            self.nproc_per_cell,
            "a positive integer (processes per cell; more than 1 needs train.distributed ddp or fsdp)",
        )
        require(len(self.grids) > 0, "grids", self.grids, "a non-empty list of {name, axes} mappings")
        for i, grid in enumerate(self.grids):
            grid.check(f"grids[{i}]")
            if grid.peer is not None:
                earlier = {g.name: g for g in self.grids[:i]}
                source = earlier.get(grid.peer.grid)
                require(
                    source is not None and source.confirm is not None,
                    f"grids[{i}].peer.grid",
                    grid.peer.grid,
                    f"the name of an earlier grid with a search and confirm ({', '.join(earlier) or 'none'})",
                )
            require(
                grid.name not in [other.name for other in self.grids[:i]],
                f"grids[{i}].name",
                grid.name,
                "a name no other grid has",
            )
        check_sets(self.set, "set:")

    def to_dict(self) -> dict:
        """The study as YAML-safe data (study.yaml); a grid without best_lr_seeds leaves the key out."""
        data = to_dict(self)
        if not data["note"]:
            del data["note"]
        for grid in data["grids"]:
            for key, empty in (
                ("best_lr_seeds", []),
                ("search", {}),
                ("warm_start", None),
                ("diagonals", False),
                ("confirm", None),
                ("peer", None),
            ):
                if grid[key] == empty:
                    del grid[key]
        return data


def series_label(scheme: str, values: dict[str, Any]) -> str:
    """A series' name: the scheme, then ``leaf=value`` for each (dotted path: value) of ``values``
    (e.g. "span span_scale=none")."""
    return " ".join([scheme] + [f"{leaf(path)}={value(v)}" for path, v in values.items()])


@dataclass
class Cell:
    name: str  # directory name under cells/
    grids: list[str]  # the grids that contain this cell
    axes: dict[str, Any]  # every axis of its grids -> this cell's resolved value
    extras: dict[str, Any]  # non-core axes whose value differs from the base config
    cfg: RunConfig
    tokens: int | None = None  # its budget where it is not the study's tokens_per_cell (confirmation cells)

    @property
    def series(self) -> str:
        """Scheme plus the non-default extra axes (and a budget of its own): one line in a plot, one row in
        the claims."""
        label = series_label(self.cfg.model.scheme.value, self.extras)
        return label if self.tokens is None else f"{label} tokens={self.tokens}"

    @property
    def depth_lr(self) -> tuple[int, float]:
        """(depth, lr): where the cell sits within its series."""
        return self.cfg.model.n_layers, self.cfg.train.lr


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
    study = from_dict(StudyConfig, data, "")
    base = study.base
    if where is not None and not Path(base).is_absolute() and (where.parent / base).is_file():
        study.base = str((where.parent / base).resolve())
    elif Path(base).is_file():
        study.base = str(Path(base).resolve())
    return study


def check_sets(sets: list[str], where: str) -> None:
    """Refuse an override of train.max_steps (``where``: "set:" or "--set"): tokens_per_cell sets the steps."""
    for s in sets:
        if s.partition("=")[0].strip() == "train.max_steps":
            raise ConfigError(f"{where} train.max_steps is invalid here: tokens_per_cell sets every cell's steps")


def load_study(name: str, extra_sets: list[str] = ()) -> StudyConfig:
    """Load a study YAML (or shipped study name); ``extra_sets`` are appended to its ``set``."""
    path = resolve_study_path(name)
    study = study_from_dict(read_yaml(path), where=path)
    check_sets(extra_sets, "--set")
    study.set += list(extra_sets)
    return study


# --- the plan: the base config, resolved once ----------------------------------------------


def _get(d: dict, path: str) -> Any:
    for part in upgrade_key(path).split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _set(d: dict, path: str, v: Any) -> None:
    *parents, name = upgrade_key(path).split(".")
    for part in parents:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise ConfigError(f"axis {path!r} is invalid: {part} is not a section")
    d[name] = v


def leaf(path: str) -> str:
    """What a cell's name, a series' label and a report call a config path: its last key, as the key was before
    the option groups (``model.span.scale`` or ``model.span_scale``: span_scale), so that a study names its cells
    as it did then, whichever spelling it uses."""
    return legacy_key(upgrade_key(path)).rsplit(".", 1)[-1]


def canonical(point: dict) -> dict:
    """A mapping of config paths (a point, a cell's axes or extras) with each path as it is now (:func:`upgrade_key`),
    to look a path up whichever spelling the study gave it."""
    return {upgrade_key(k): v for k, v in point.items()}


def _steps(study: StudyConfig, cfg: RunConfig, what: str, tokens: int | None = None) -> int:
    """The steps that train ``cfg`` on ``tokens`` tokens (default: the study's tokens_per_cell; ``what``: where,
    for errors)."""
    t, nproc, tokens = cfg.train, study.nproc_per_cell, tokens or study.tokens_per_cell
    if nproc > 1 and t.distributed is Distributed.NONE:
        raise ConfigError(
            f"nproc_per_cell={nproc} is invalid{what}: train.distributed is none; set it to ddp or fsdp "
            "(set: [train.distributed=ddp]) or use nproc_per_cell: 1"
        )
    per_step = t.batch_size * t.seq_len * t.grad_accum_steps * nproc
    if tokens % per_step:
        raise ConfigError(
            f"tokens_per_cell={tokens} is invalid{what}: expected a multiple of train.batch_size × "
            f"train.seq_len × train.grad_accum_steps × nproc_per_cell = {per_step} (e.g. "
            f"{max(1, round(tokens / per_step)) * per_step})"
        )
    steps = tokens // per_step
    if cfg.train.warmup_steps >= steps:
        raise ConfigError(
            f"train.warmup_steps={cfg.train.warmup_steps} is invalid{what}: expected fewer than "
            f"the {steps} steps that tokens_per_cell gives"
        )
    return steps


def _with_steps(cfg: RunConfig, steps: int) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))


@dataclass(frozen=True)
class Plan:
    """A study with its base run config resolved, once: what every cell starts from."""

    study: StudyConfig
    base: dict  # the base preset or YAML with the study's set applied, train.max_steps from tokens_per_cell
    base_cfg: RunConfig  # ``base``, validated


def plan_study(study: StudyConfig) -> Plan:
    """Resolve and validate ``study``'s base config (and the best_lr_seeds that depend on its seed)."""
    base = read_config_mapping(study.base, study.set)
    try:
        base_cfg = run_config_from_dict(copy.deepcopy(base))
    except ConfigError as e:
        raise ConfigError(f"base {study.base!r} with set {study.set}: {e}") from None
    steps = _steps(study, base_cfg, " for the base config")
    _set(base, "train.max_steps", steps)
    for i, grid in enumerate(study.grids):
        if "train.seed" not in grid.axes:  # the grid runs the base config's seed
            require(
                base_cfg.train.seed not in grid.best_lr_seeds,
                f"grids[{i}].best_lr_seeds",
                base_cfg.train.seed,
                "a seed other than the base config's train.seed (the grid has no train.seed axis)",
            )
        if grid.confirm is not None:  # checked now, not hours later when the search reaches it
            what = f" for grids[{i}].confirm"
            try:
                cfg = run_config_from_dict(apply_overrides(copy.deepcopy(base), list(grid.confirm.set)))
            except ConfigError as e:
                raise ConfigError(f"grids[{i}].confirm.set {grid.confirm.set}: {e}") from None
            _steps(study, cfg, what, grid.confirm.tokens_per_cell)
    return Plan(study, base, _with_steps(base_cfg, steps))


class Follow(NamedTuple):
    """A cell of a later phase: its grid, its point (config path -> value), and for confirmation cells their
    budget and overrides."""

    grid: Grid
    point: dict
    tokens: int | None = None  # None: the study's tokens_per_cell
    sets: tuple[str, ...] = ()  # KEY=VALUE overrides applied after the point


def build_cell(plan: Plan, follow: Follow) -> Cell:
    """The cell of one (grid, point[, budget, overrides]); validates its config."""
    grid, point, tokens, sets = follow
    what = f" in grid {grid.name!r} at " + ", ".join(f"{k}={value(v)}" for k, v in point.items())
    d = copy.deepcopy(plan.base)
    for path, v in point.items():
        _set(d, path, v)
    try:
        cfg = run_config_from_dict(apply_overrides(d, list(sets)))
        cfg = _with_steps(cfg, _steps(plan.study, cfg, what, tokens))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if what in msg else f"{msg} ({what.strip()})") from None
    flat, base_flat = to_dict(cfg), to_dict(plan.base_cfg)
    resolved = {p: _get(flat, p) for p in point}
    extras = {p: v for p, v in resolved.items() if p not in CORE and v != _get(base_flat, p)}
    m, t = cfg.model, cfg.train
    name = f"{m.scheme.value}_L{m.n_layers}_lr{t.lr:g}_s{t.seed}" + "".join(
        f"_{leaf(p)}-{value(v)}" for p, v in extras.items()
    )
    name += f"_tokens-{tokens}" if tokens else ""
    return Cell(re.sub(r"[^A-Za-z0-9._+-]", "-", name), [grid.name], resolved, extras, cfg, tokens)


def expand(plan: Plan, follow: list[Follow] = ()) -> list[Cell]:
    """Every distinct cell of the study, in grid order; validates every cell's config.

    ``follow`` (from :func:`spannorm.study.results.follow_ups` and :func:`spannorm.study.search.search_follow`):
    the cells of later phases, which come after all the grids' cells. A grid with a search has no cells of
    its own: its search gives them. Cells of the same config are one cell, of every grid that names it.
    """
    by_config: dict[str, Cell] = {}
    by_name: dict[str, Cell] = {}

    def add(f: Follow) -> None:
        cell = build_cell(plan, f)
        key = json.dumps(to_dict(cell.cfg), sort_keys=True)
        if key in by_config:
            same = by_config[key]
            if f.grid.name not in same.grids:
                same.grids.append(f.grid.name)
            for p, v in cell.axes.items():
                same.axes.setdefault(p, v)
            return
        if cell.name in by_name:
            raise ConfigError(
                f"two different cells get the directory name {cell.name!r} (grid {f.grid.name!r}); "
                "make their axis values differ in scheme, depth, lr, seed or an extra axis"
            )
        by_config[key] = by_name[cell.name] = cell

    for grid in plan.study.grids:
        if not grid.search:
            for values in itertools.product(*grid.axes.values()):
                add(Follow(grid, dict(zip(grid.axes, values))))
    for f in follow:
        add(Follow(*f))
    return list(by_config.values())
