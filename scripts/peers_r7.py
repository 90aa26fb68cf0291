"""Rule R7 of configs/studies/fair-peers-2026.yaml, applied: each 2026 peer (olmo2, mhc, ngpt) against span and pre of
the fair study at each depth where all three confirmation seeds of both have finished. Prints one line per pair.

    .venv/bin/python scripts/peers_r7.py [docs/fair-study/results.csv docs/fair-study/peers-2026/results.csv]
"""

import csv
import re
import statistics
import sys

from spannorm.study.verdicts import BETTER, WORSE, judge

CONFIRM = "_tokens-2097152"


def confirmations(path: str) -> dict:
    """(scheme, depth) -> (the 3 confirmation losses, the search's best seed-1 loss at the same point), at d_model 64
    without experts (the cells R7 compares); only points whose 3 seeds all trained (a diverged or stalled seed
    leaves R7 undecided there, as R2)."""
    rows = {r["name"]: r for r in csv.DictReader(open(path))}
    out = {}
    for name in rows:
        # (d_model 64, dense: no axis in the name but the lr, the seed and the init scale)
        m = re.fullmatch(r"([a-z0-9]+)_L(\d+)_lr[0-9.e-]+_s1(_init_scale-[0-9.]+)?" + CONFIRM, name)
        if not m:
            continue
        seeds = [rows.get(name.replace("_s1", f"_s{s}", 1)) for s in (1, 2, 3)]
        search = rows.get(name.removesuffix(CONFIRM))
        if search and all(r and r["status"] == "ok" for r in seeds):
            out[m[1], int(m[2])] = ([float(r["final_val_loss"]) for r in seeds], float(search["final_val_loss"]))
    return out


def main(fair: str = "docs/fair-study/results.csv", peers: str = "docs/fair-study/peers-2026/results.csv") -> None:
    base, new = confirmations(fair), confirmations(peers)
    for (x, depth), (losses, search) in sorted(new.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for ref in ("span", "pre"):
            if (ref, depth) not in base:
                continue
            ref_losses, ref_search = base[ref, depth]
            r = judge(ref_losses, losses, search - ref_search)  # (R2's rule, as the study applies it)
            verdict = {BETTER: f"{ref} better", WORSE: f"{x} better"}.get(r["verdict"], "no difference at this budget")
            print(
                f"L={depth} {x} {statistics.mean(losses):.3f} ± {statistics.stdev(losses):.3f} vs {ref} "
                f"{statistics.mean(ref_losses):.3f} ± {statistics.stdev(ref_losses):.3f}: "
                f"Δ = {r['delta']:+.3f} (s {r['spread']:.3f}), searches' Δ = {r['search_delta']:+.3f}: {verdict}"
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
