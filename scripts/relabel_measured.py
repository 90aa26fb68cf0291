"""Relabel a study's cells of the schemes whose recipe gained a measured factor (``schemes.Measured``).

A cell trained at init_scale s under the old recipe is the model the new recipe gives at s / factor: every std
is the same number (the factors are powers of two, so the products are exact). This script proves it for each
cell, with the init stds the cell recorded (init.json) against today's code at the new scale, and then renames
the cell and rewrites its config.yaml; a cell that fails the proof stops the script before anything is written.
A factor f removed is the recipe × 1/f (``post=2`` after post lost its 0.5). Run once after a factor changes,
then ``spannorm study --config ... --report-only`` (the search visits the relabelled cells; the ones it no longer
visits are left out of the report and its summary line's count: delete them):

    python scripts/relabel_measured.py docs/fair-study b2t=2
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


def relabel(study: Path, factors: dict[str, float]) -> list[tuple[Path, Path, dict]]:
    """The (old dir, new dir, new config) of every cell of ``factors``' schemes, each proven to be the same model."""
    moves = []
    for d in sorted(study.glob("cells/*")):
        run = RunDir(d)
        cfg = run.config()
        m = cfg.model
        if m.scheme.value not in factors or m.init.value != "recommended" or m.init_std is not None:
            continue
        new_scale = m.init_scale / factors[m.scheme.value]
        new = dataclasses.replace(cfg, model=dataclasses.replace(m, init_scale=new_scale))
        recorded = read_json(run.init_file, "restore it from git", init_problem)
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
    factors = {k: float(v) for k, v in (p.split("=") for p in pairs)}
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


if __name__ == "__main__":
    main()
