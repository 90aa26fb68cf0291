"""The lr study's seed-1 final val losses as Markdown tables, one per depth (rates not yet run: "not yet").

python3 scripts/lr_study_tables.py [STUDY_DIR]     # default docs/lr-study
"""

import json
import sys
from pathlib import Path

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


def cell(study: Path, name: str) -> str:
    path = study / "cells" / name / "summary.json"
    if not path.is_file():
        return "not yet"
    s = json.loads(path.read_text())
    if s["diverged"]:
        return "diverged"
    return f"{s['final_val_loss']:.3f}" + (" stalled" if s["stalled"] else "")


def main() -> None:
    study = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/lr-study")
    for depth in (12, 48):
        print(f"\nL = {depth}, seed 1:\n")
        print("| series | " + " | ".join(f"{float(lr):g}" for lr in LRS) + " |\n|---|" + "---|" * len(LRS))
        for label, scheme, suffix in SERIES:
            row = [cell(study, f"{scheme}_L{depth}_lr{lr}_s1{suffix}") for lr in LRS]
            print(f"| {label} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
