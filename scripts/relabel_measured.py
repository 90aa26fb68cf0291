"""Relabel a study's cells of the schemes whose recipe gained or lost a factor (``schemes.Measured``, a depth rule).

A cell trained at init_scale s under the old recipe is the model the new recipe gives at s / factor: every std
is the same number (the factors are powers of two, so the products are exact). This script proves it for each
cell, with the init stds the cell recorded (init.json) against today's code at the new scale, and then renames
the cell and rewrites its config.yaml; a cell that fails the proof stops the script before anything is written.
``scheme=f`` names the factor (a factor f removed is the recipe × 1/f: ``post=2`` after post lost its 0.5); a bare
``scheme`` takes each cell's from its init.json (a factor that depends on the depth, as post's short-lived depth
rules did, or any change), and leaves the cells whose recipe did not change; then it remakes the study's archive.
Run once after a recipe changes, then ``spannorm study --config ... --report-only`` (the search visits the
relabelled cells; the ones it no longer visits are left out of the report and its summary line's count: delete
them, then run the study without --report-only, which trains what the search still needs and remakes the archive):

    python scripts/relabel_measured.py docs/fair-study b2t=2
    python scripts/relabel_measured.py docs/fair-study post
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import yaml

from spannorm.config import to_dict
from spannorm.files import atomic_write_text, read_json
from spannorm.output import value
from spannorm.run import RunDir, init_problem, init_record
from spannorm.study.archive import ARCHIVE, pack


def derived_scale(model, recorded: dict) -> float:
    """The init_scale at which today's recipe of ``model`` gives the stds ``recorded`` (block 0's first role)."""
    today = init_record(dataclasses.replace(model, init_scale=1.0))["weight_stds"][0]
    role, std = next(iter(recorded["weight_stds"][0].items()))
    return std / today[role]


def relabel(study: Path, factors: dict[str, float | None]) -> list[tuple[Path, Path, dict]]:
    """The (old dir, new dir, new config) of every cell of ``factors``' schemes whose label changes, each proven to
    be the same model (a factor None: each cell's from its init.json)."""
    moves = []
    for d in sorted(study.glob("cells/*")):
        run = RunDir(d)
        cfg = run.config()
        m = cfg.model
        if m.scheme.value not in factors or m.init.value != "recommended" or m.init_std is not None:
            continue
        recorded = read_json(run.init_file, "restore it from git", init_problem)
        factor = factors[m.scheme.value]
        new_scale = derived_scale(m, recorded) if factor is None else m.init_scale / factor
        if new_scale == m.init_scale:
            continue
        new = dataclasses.replace(cfg, model=dataclasses.replace(m, init_scale=new_scale))
        if recorded != init_record(new.model):
            sys.exit(f"{d}: its init stds are not today's at init_scale {value(new_scale)}; nothing written")
        old_suffix = f"_init_scale-{value(m.init_scale)}" if m.init_scale != 1.0 else ""
        head, tokens = re.fullmatch(r"(.*?)(_tokens-\d+)?", d.name).groups()
        if not head.endswith(old_suffix):
            sys.exit(f"{d}: its name does not end in {old_suffix!r}; nothing written")
        head = head[: len(head) - len(old_suffix)] + (f"_init_scale-{value(new_scale)}" if new_scale != 1.0 else "")
        moves.append((d, d.with_name(head + (tokens or "")), to_dict(new)))
    return moves


def main() -> None:
    study, *pairs = sys.argv[1:]
    factors = {k: float(v) if v else None for k, _, v in (p.partition("=") for p in pairs)}
    moves = relabel(Path(study), factors)
    for old, _, _ in moves:  # two steps: a new name may be another cell's old one
        old.rename(old.with_name(old.name + ".relabel"))
    for old, new, cfg in moves:
        staged = old.with_name(old.name + ".relabel")
        atomic_write_text(staged / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        if new.exists():
            sys.exit(f"{new} exists; {staged} holds {old.name}, relabelled")
        staged.rename(new)
        print(f"{old.name} -> {new.name}")
    if pack(Path(study)):  # (the archive a repository commits; --report-only does not remake one)
        print(f"{Path(study) / ARCHIVE} remade")


if __name__ == "__main__":
    main()
