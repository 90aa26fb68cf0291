"""The study-throughput table of docs/performance.md: the cells of two runs of docs/throughput/study.yaml (before
and after a change, on the same machine in one session), each cell's wall time and final val loss, and cells per
hour with --jobs 2 (two cells at a time: 2 × 3600 s over the mean cell time).

    .venv/bin/python scripts/throughput_table.py BEFORE_OUT AFTER_OUT [--committed docs/fair-study]
"""

import argparse
import json
import tarfile
from pathlib import Path


def cells(out: Path) -> dict[str, tuple[float, float]]:
    """{cell: (wall seconds, final val loss)} of a study's out directory."""
    rows = {}
    for cell in sorted((out / "cells").iterdir()):
        wall = json.loads((cell / "cell.json").read_text())["wall_s"]
        rows[cell.name] = (wall, json.loads((cell / "summary.json").read_text())["final_val_loss"])
    return rows


def committed(study: Path, names) -> dict[str, float]:
    """The final val losses of the same cells in a committed study's archive."""
    with tarfile.open(study / "cells.tar.xz") as tar:
        return {n: json.load(tar.extractfile(f"{n}/summary.json"))["final_val_loss"] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--committed", type=Path, default=Path("docs/fair-study"))
    args = ap.parse_args()
    before, after = cells(args.before), cells(args.after)
    names = sorted(before, key=lambda n: (int(n.split("_L")[1].split("_")[0]), n))
    fair = committed(args.committed, names)
    print("| cell | wall before | wall after | after / before | val loss before | val loss after | committed |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        (wb, vb), (wa, va) = before[n], after[n]
        print(f"| {n} | {wb:.0f} s | {wa:.0f} s | {wa / wb:.3f} | {vb:.4f} | {va:.4f} | {fair[n]:.4f} |")
    tb, ta = sum(w for w, _ in before.values()), sum(w for w, _ in after.values())
    per_hour = [2 * 3600 * len(names) / t for t in (tb, ta)]
    print(f"| all {len(names)} | {tb:.0f} s | {ta:.0f} s | {ta / tb:.3f} | | | |")
    print(f"\ncells per hour with --jobs 2: {per_hour[0]:.1f} before, {per_hour[1]:.1f} after ({tb / ta:.2f}x)")
    drift = max(abs(after[n][1] - before[n][1]) for n in names)
    print(f"largest val-loss change: {drift:.4f} nats")


if __name__ == "__main__":
    main()
