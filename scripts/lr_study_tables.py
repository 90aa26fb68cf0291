"""The lr study's seed-1 final val losses as Markdown tables, one per depth (rates not yet run: "not yet"),
then issue 13's acceptance rule applied to the cells on disk.

.venv/bin/python scripts/lr_study_tables.py [STUDY_DIR]     # default docs/lr-study

The rule, as issue 13 wrote it before the study ran, at each depth (12 and 48):
1. the SpanNorm default is not stalled (nor diverged) at any rate where pre is not;
2. at its best rate its val loss, the mean of seeds 1-3, is below pre's at pre's best rate;
3. against the bar, `multiplier`: a wider stable range (the rates within 0.05 nats of the series' own best,
   not stalled) without a higher best-rate loss (mean of 3 seeds).
The best rate and the stable range are the study report's (spannorm.study.results.best_lr, stable_lrs).
"""

import json
import statistics
import sys
from pathlib import Path

from spannorm.study.results import best_lr, stable_lrs

LRS = ["0.0005", "0.001", "0.002", "0.004", "0.008", "0.016"]
SERIES = [
    ("span `init`", "span", "_span_scale-init"),
    ("span `multiplier`", "span", "_span_scale-multiplier"),
    ("span (default, `norm`)", "span", ""),
    ("pre", "pre", ""),
    ("post", "post", ""),
    ("deepnorm", "deepnorm", ""),
    ("b2t", "b2t", ""),
    ("peri", "peri", ""),
    ("lns", "lns", ""),
]
SEEDS = (1, 2, 3)


def summary(study: Path, scheme: str, depth: int, lr: str, seed: int, suffix: str) -> dict | None:
    path = study / "cells" / f"{scheme}_L{depth}_lr{lr}_s{seed}{suffix}" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def trained(s: dict | None) -> bool:
    return s is not None and not s["diverged"] and not s["stalled"]


def row(s: dict) -> dict:
    """A summary as the study's results.csv row says it (what best_lr and stable_lrs read)."""
    return {"final_val_loss": s["final_val_loss"], "status": "ok" if trained(s) else "stalled or diverged"}


def cell(s: dict | None) -> str:
    if s is None:
        return "not yet"
    if s["diverged"]:
        return "diverged"
    return f"{s['final_val_loss']:.3f}" + (" stalled" if s["stalled"] else "")


class Series:
    """One series at one depth: its seed-1 cells, best rate, stable range and best-rate seeds."""

    def __init__(self, study: Path, scheme: str, suffix: str, depth: int):
        self.first = {lr: summary(study, scheme, depth, lr, 1, suffix) for lr in LRS}
        self.trained = [lr for lr in LRS if trained(self.first[lr])]
        by_lr = {float(lr): row(s) for lr, s in self.first.items() if s is not None}
        best = best_lr(by_lr)
        self.best = None if best is None else next(lr for lr in LRS if float(lr) == best)
        self.stable = [lr for lr in LRS if float(lr) in stable_lrs(by_lr)]
        runs = [summary(study, scheme, depth, self.best, seed, suffix) for seed in SEEDS] if self.best else []
        self.at_best = [s["final_val_loss"] for s in runs if s is not None and not s["diverged"]]

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.at_best) if len(self.at_best) == len(SEEDS) else None

    def describe(self) -> str:
        if self.best is None:
            return "no rate trained"
        vals = self.at_best
        spread = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):.3f}{spread} (n={len(vals)}) at {float(self.best):g}"


def span_range(lrs: list[str]) -> str:
    return f"{float(lrs[0]):g} – {float(lrs[-1]):g} ({len(lrs)} of {len(LRS)})" if lrs else "none"


def verdict(study: Path, depth: int) -> list[str]:
    """Issue 13's rule at ``depth``: one line per part, each ending in pass, FAIL or pending."""
    norm, pre, mult = (
        Series(study, s, x, depth) for s, x in (("span", ""), ("pre", ""), ("span", "_span_scale-multiplier"))
    )
    missing = [lr for lr in LRS if norm.first[lr] is None or pre.first[lr] is None]
    worse = [lr for lr in LRS if trained(pre.first[lr]) and not trained(norm.first[lr]) and norm.first[lr] is not None]
    one = "FAIL" if worse else "pending" if missing else "pass"
    lines = [
        f"1. not stalled where pre is not: pre trains at {len(pre.trained)} of {len(LRS)} rates, the default at "
        f"{len(norm.trained)}; rates where pre trains and the default does not: {', '.join(worse) or 'none'} — {one}"
    ]
    two = "pending" if norm.mean is None or pre.mean is None else "pass" if norm.mean < pre.mean else "FAIL"
    lines.append(f"2. best rate against pre's: default {norm.describe()}, pre {pre.describe()} — {two}")
    wider = len(norm.stable) > len(mult.stable)
    three = (
        "pending" if norm.mean is None or mult.mean is None else "pass" if wider and norm.mean <= mult.mean else "FAIL"
    )
    lines.append(
        f"3. against `multiplier`: stable range {span_range(norm.stable)} against {span_range(mult.stable)}; "
        f"rates that train {len(norm.trained)} against {len(mult.trained)}; best rate {norm.describe()} against "
        f"{mult.describe()} — {three}"
    )
    return lines


def main() -> None:
    study = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/lr-study")
    for depth in (12, 48):
        print(f"\nL = {depth}, seed 1:\n")
        print("| series | " + " | ".join(f"{float(lr):g}" for lr in LRS) + " |\n|---|" + "---|" * len(LRS))
        for label, scheme, suffix in SERIES:
            row = [cell(summary(study, scheme, depth, lr, 1, suffix)) for lr in LRS]
            print(f"| {label} | " + " | ".join(row) + " |")
    for depth in (12, 48):
        print(f"\nIssue 13's rule at L = {depth}:\n")
        print("\n".join(verdict(study, depth)))


if __name__ == "__main__":
    main()
