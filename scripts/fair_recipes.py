"""Apply fair-recipes.yaml's rule to its cells and check it against the code's width rules.

    .venv/bin/python scripts/fair_recipes.py [docs/fair-study/recipes]

Per scheme: the lower val loss over the two lrs of each width rule (seed 1; cells that diverged or stalled left
out); the rule with the lower one wins, fan-in within 0.01 nats. Prints a Markdown table and exits with 1 if a
scheme's `base_std.rule` in spannorm.schemes disagrees with the measurement.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from spannorm.model_config import Scheme
from spannorm.schemes import SCHEMES, WidthRule

TIE = 0.01  # nats: within this, the rule without a constant (fan-in)
# the pinned base stds at d_model 64: carried, GPT-2's 0.02 at 768 (OLMo 2's 0.02 at 4096), or fan-in
STD = {"0.069282": WidthRule.CARRIED, "0.16": WidthRule.CARRIED, "0.125": WidthRule.FAN_IN}


def best(rows: list[dict]) -> dict:
    """scheme -> {rule: (lowest val loss or None, its lr, the pinned σ)}."""
    out: dict = {}
    for r in rows:
        if r["status"] == "not run":  # (a partial study: that cell says nothing yet)
            continue
        rule = STD[r["model.init_std"]]
        val = float(r["final_val_loss"]) if r["status"] == "ok" else None
        cur = out.setdefault(r["model.scheme"], {}).get(rule, (None, None, r["model.init_std"]))
        if val is not None and (cur[0] is None or val < cur[0]):
            cur = (val, r["train.lr"], r["model.init_std"])
        out[r["model.scheme"]][rule] = cur
    return out


def choose(by_rule: dict) -> WidthRule:
    carried, fan_in = by_rule[WidthRule.CARRIED][0], by_rule[WidthRule.FAN_IN][0]
    if fan_in is None or (carried is not None and carried < fan_in - TIE):
        return WidthRule.CARRIED
    return WidthRule.FAN_IN


def _text(val: float | None, lr: str | None, std: str) -> str:
    return f"σ {float(std):.3g}: " + ("stalled or diverged at both lrs" if val is None else f"{val:.3f} (lr {lr})")


def main(folder: Path) -> int:
    rows = list(csv.DictReader((folder / "results.csv").open()))
    ok = True
    print("| scheme | carried c·sqrt(w/d) (σ at d = 64) | fan-in 1/sqrt(d) | chosen | in the code |")
    print("|---|---|---|---|---|")
    for scheme, by_rule in best(rows).items():
        if len(by_rule) < 2:
            print(f"| {scheme} | not run yet | not run yet | — | {SCHEMES[Scheme(scheme)].base_std.rule.value} |")
            continue
        chosen, code = choose(by_rule), SCHEMES[Scheme(scheme)].base_std.rule
        ok &= chosen is code
        carried, fan_in = (_text(*by_rule[rule]) for rule in (WidthRule.CARRIED, WidthRule.FAN_IN))
        print(f"| {scheme} | {carried} | {fan_in} | {chosen.value} | {code.value} |")
    if not ok:
        print("the code's width rules disagree with the measurement", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/fair-study/recipes")))
