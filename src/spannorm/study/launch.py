"""Studies on a cluster (``spannorm study --launcher slurm``): each cell submitted as its own job through submitit.

The study directory, on a filesystem the cluster's nodes share, stays the single source of truth: the launcher
holds its lock while the jobs run (a second launcher is refused), a finished cell is reused (never submitted), and a
cell whose job the scheduler killed resumes from its checkpoint when the study is run again. Each job runs
:func:`spannorm.study.cells.run_cell`, the code a local study runs; submitit writes its own logs under
``OUT/slurm/``. Needs the ``cluster`` extra (``pip install 'spannorm[cluster]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, parse_yaml

CLUSTER = "slurm"  # submitit's cluster for --launcher slurm (the tests run the same path on submitit's "local")
DEFAULTS = {"timeout_min": 24 * 60, "cpus_per_task": 1}  # submitit's own default time limit is 5 minutes
POLL_S = 5.0  # seconds between looks at the jobs' states


def slurm_parameters(settings: list[str]) -> dict:
    """``--slurm KEY=VALUE`` settings (values as YAML) as submitit's executor parameters."""
    parameters = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm {setting!r} is invalid: expected KEY=VALUE, e.g. slurm_partition=gpu")
        parameters[key.strip()] = parse_yaml(value, f"--slurm {key.strip()}")
    return parameters


@dataclass
class Slurm:
    """The launcher: ``parameters`` are submitit's (slurm_partition, timeout_min, gpus_per_node, cpus_per_task,
    mem_gb, slurm_account, ...), over :data:`DEFAULTS`; each job trains with cpus_per_task threads."""

    parameters: dict = field(default_factory=dict)

    def executor(self, folder: Path, name: str):
        try:
            import submitit  # (here: an optional dependency, the cluster extra)
        except ImportError:
            raise ConfigError("--launcher slurm needs submitit: pip install 'spannorm[cluster]'") from None
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=CLUSTER)
        except RuntimeError as e:  # (no Slurm here: submitit finds no srun)
            raise ConfigError(
                f"--launcher slurm: {e} (run the study where Slurm is, or with --launcher local)"
            ) from None
        try:
            executor.update_parameters(**(DEFAULTS | self.parameters | {"name": name}))
        except (NameError, ValueError, TypeError) as e:  # (submitit: NameError for a parameter it does not know)
            raise ConfigError(f"--slurm: {str(e).splitlines()[0]}") from None
        return executor

    @property
    def threads(self) -> int:
        return int((DEFAULTS | self.parameters)["cpus_per_task"])

    def run(self, cells: list, out: Path, job: Callable, args: Callable, done: Callable) -> None:
        """Submit ``job(*args(cell))`` for every cell, then report each as it ends: ``done(i, cell, summary,
        error)``. An interrupt (Ctrl-C, SIGTERM) cancels the jobs still queued or running."""
        if not cells:
            return
        executor = self.executor(out / "slurm", f"spannorm-{out.name}")
        import submitit  # (here: an optional dependency, which executor() found)

        jobs = {executor.submit(job, *args(cell)): cell for cell in cells}
        try:
            for i, finished in enumerate(submitit.helpers.as_completed(list(jobs), poll_frequency=POLL_S), 1):
                try:
                    done(i, jobs[finished], finished.result(), None)
                except Exception as e:  # the job's exception, or the scheduler's end of it (its last line)
                    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                    done(i, jobs[finished], None, f"{type(e).__name__}: {lines[-1] if lines else 'no message'}")
        except BaseException:
            for j in jobs:
                j.cancel(check=False)
            raise
