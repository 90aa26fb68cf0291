"""Where one study cell's time goes: the first cell of a study config, trained alone in this process with one
thread (as under --jobs 2) and profiled with cProfile; prints the wall time and the cumulative top functions.

    .venv/bin/python scripts/cell_profile.py docs/throughput/study.yaml /tmp/cell [--set KEY=VALUE ...]
"""

import cProfile
import pstats
import shutil
import sys
import time

from spannorm.config import to_dict
from spannorm.study import expand, load_study, plan_study
from spannorm.study.cells import run_cell


def main() -> None:
    config, out, sets = sys.argv[1], sys.argv[2], [a for a in sys.argv[3:] if a != "--set"]
    study = load_study(config, sets)
    cell = expand(plan_study(study))[0]
    shutil.rmtree(out, ignore_errors=True)
    profile, t0 = cProfile.Profile(), time.perf_counter()
    profile.runcall(run_cell, to_dict(cell.cfg), out, study.probe, study.keep_checkpoints, threads=1)
    print(f"{cell.name}: {time.perf_counter() - t0:.1f} s")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(r"spannorm/(train|probe|probe_command)\.py", 12)


if __name__ == "__main__":
    main()
