"""How many threads a command's torch work should use: the cores this process may use that other processes are not
busy on, measured when it starts.

torch's default is every core. Beside another torch job that also takes every core, both spin against each other:
the tiny preset then trains 8× slower with the default than with one thread (docs/performance.md). The CLI's
commands therefore start with :func:`fit_threads` unless the user chose (``train.threads``, or ``OMP_NUM_THREADS``
in the environment); the Python API keeps torch's default.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

SAMPLE_S = 0.1  # how long the machine's load is looked at: a tenth of a second at start
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" (microseconds) or "max PERIOD"


def usable_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # (no cgroup v2, or no quota: the affinity decides)
        pass
    return max(1, cores)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all the machine's CPUs since boot (/proc/stat), or None where there is none."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(sample_s: float = SAMPLE_S) -> float:
    """How many of the machine's cores other processes keep busy, over ``sample_s`` seconds (this one sleeps)."""
    first = _cpu_times()
    time.sleep(sample_s)
    second = _cpu_times()
    if first is None or second is None or second[1] <= first[1]:
        return 0.0
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def fit_threads() -> int:
    """The usable cores less those other processes are busy on (rounded), at least one."""
    usable = usable_cores()
    return max(1, min(usable, round(usable - busy_cores())))
