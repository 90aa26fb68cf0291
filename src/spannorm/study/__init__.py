"""``spannorm study``: a grid of training runs, their verdicts, tables, plots and the six claims.

A study is a directory::

    study.yaml      the resolved study config (loadable again with --config)
    cells/<name>/   one run directory per cell (config.yaml, metrics.jsonl, summary.json, ...)
                    plus probe.json (trained-model probe) and cell.json (wall time)
    cells.tar.xz    the finished cells in one archive, and manifest.json (what a repository commits: archive)
    init_probe.json probes of freshly initialized models at the study's depths (claims 1 and 2)
    results.csv     one row per cell
    report.md       tables (mean ± std over seeds), plots, and a verdict on each claim of SPANNORM.md
    report.html     report.md as one self-contained page (plots embedded, sortable tables)
    plots/*.png

Every cell trains for the same number of tokens. A finished cell (summary.json present, same
config) is reused and an interrupted one resumes from its checkpoint, so a study can be stopped
and started again. Cells run in this process (``jobs=1``) or in ``jobs`` spawned worker processes.
A grid with ``best_lr_seeds`` adds a second phase: after all the grids' cells, those seeds at each of
its (series, depth) points' best lr (:func:`follow_ups`, found again from the cells on disk).

The modules, each importing only the ones before it:

    launch    --launcher slurm: each cell a job of a Slurm cluster, through submitit
    grid      StudyConfig, Grid, loading and validation; the plan (the base config, resolved once); cells
    cells     running cells: reuse, resume, --jobs
    archive   cells.tar.xz: the finished cells packed, and unpacked where cells/ is missing
    results   results.csv, the best lr and stable range, the second phase, seed groups
    claims    the init probe and the six claims' verdicts
    plots     plots/*.png
    report    report.md (report.html from it: spannorm.webpage)
    run       run_study: all of the above, in order
"""

from .claims import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Claim, claims, init_probe
from .grid import Cell, Grid, Plan, StudyConfig, expand, load_study, plan_study, study_from_dict, study_names
from .report import best_lr_table, lr_sensitivity, report
from .results import best_lr, cell_result, follow_ups, stable_lrs
from .runner import run_study

__all__ = [
    "INCONCLUSIVE",
    "NOT_SUPPORTED",
    "SUPPORTED",
    "Cell",
    "Claim",
    "Grid",
    "Plan",
    "StudyConfig",
    "best_lr",
    "best_lr_table",
    "cell_result",
    "claims",
    "expand",
    "follow_ups",
    "init_probe",
    "load_study",
    "lr_sensitivity",
    "plan_study",
    "report",
    "run_study",
    "stable_lrs",
    "study_from_dict",
    "study_names",
]
