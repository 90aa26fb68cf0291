"""Threads on an idle and on a loaded machine: `spannorm train --config tiny` (400 steps) with the CLI's fitted
threads (spannorm.threads) against fixed thread counts, alone and beside another training that uses torch's default
threads (every core, as the Python API does). Prints a Markdown table of the median tokens/s over REPS runs each.

    .venv/bin/python scripts/threads_load.py          # about 3 minutes on 2 cores
"""

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPS = 3
STEPS = 400
VARIANTS = {"fitted (default)": {}, "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}
VARIANTS[f"OMP_NUM_THREADS={os.cpu_count()} (torch's default)"] = {"OMP_NUM_THREADS": str(os.cpu_count())}
BACKGROUND = """
from spannorm.run_config import load_config
from spannorm.train import train
train(load_config("small", ["train.max_steps=1000000"]), {out!r}, progress=False)
"""


def tokens_per_s(env: dict, out: str) -> float:
    cmd = [
        sys.executable,
        "-m",
        "spannorm",
        "train",
        "--config",
        "tiny",
        "--out",
        out,
        "--set",
        f"train.max_steps={STEPS}",
    ]
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(cmd, env=base | env, capture_output=True, text=True, check=True)
    return float(re.search(r"([0-9,]+) tokens/s", done.stdout)[1].replace(",", ""))


def measure(tmp: str, label: str) -> dict[str, float]:
    got = {}
    for name, env in VARIANTS.items():
        runs = [tokens_per_s(env, f"{tmp}/{label}-{name}-{i}".replace(" ", "_")) for i in range(REPS)]
        got[name] = statistics.median(runs)
    return got


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        idle = measure(tmp, "idle")
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        bg = subprocess.Popen([sys.executable, "-c", BACKGROUND.format(out=f"{tmp}/bg")], env=env)
        try:
            time.sleep(15)  # (its start: data, model, the first steps)
            loaded = measure(tmp, "loaded")
        finally:
            bg.kill()
            bg.wait()
    print(f"| tiny preset, {STEPS} steps, tokens/s (median of {REPS}) | idle | beside a training on every core |")
    print("|---|---|---|")
    for name in VARIANTS:
        print(f"| {name} | {idle[name]:,.0f} | {loaded[name]:,.0f} |")


if __name__ == "__main__":
    main()
