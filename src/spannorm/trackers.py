"""Experiment trackers: a run's metrics and per-block diagnostics in TensorBoard or W&B (offline).

``metrics.jsonl`` and ``diagnostics.jsonl`` stay the record of a run; a tracker is a view of their
rows, fed by the trainer as it writes them (``train.trackers``) or afterwards by :func:`replay`
(``spannorm track RUN_DIR --to tensorboard``). Every number of a row is one scalar, named

    metrics/<key>                              loss, val_loss, lr, grad_norm, tokens_per_s (MoE: aux_loss, …)
    diagnostics/<key>                          one number: attn_entropy_max, logit_rms, head_in_rms, embed_rms, …
    diagnostics/<key>/block_NN                 a per-block list: grad_norm, stream_rms, attn_rms, ffn_rms, attn_entropy
    diagnostics/update_ratio/<role>/block_NN   per weight role (attn.qk, …, norm); update_ratio/embed, /head: one
    diagnostics/moe/block_NN/imbalance         MoE: per layer imbalance, dropped, fraction/expert_NN

at the row's step; a value that is null in the JSONL (no validation at that step, a NaN) or not a
number is left out. In TensorBoard a "spannorm" custom-scalars layout draws each per-block quantity
as one chart with a line per block (its CUSTOM SCALARS tab).

A run that continues from an earlier step (a resume from a checkpoint, a guard rollback) calls
``rewind(step)``: TensorBoard forgets what it was shown after that step (a SessionLog START event
there, TensorBoard's purge on restart); W&B's offline history is append-only, so there the steps
after it appear twice (each W&B run's x axis is the ``step`` it logs, not W&B's own counter).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError, to_dict
from .files import os_error
from .run import TRACKERS, RunDir

ITEMS = {"fraction": "expert"}  # what a list's entries are, when they are not blocks (MoE: a layer's experts)
SKIP = {"step", "layer"}  # the row's step is the x axis; an MoE entry's layer is its index


def scalars(prefix: str, value, item: str = "block") -> Iterator[tuple[str, float]]:
    """(name, number) for every finite number in ``value`` (a row, or a part of one), named by its
    path under ``prefix``: dict keys as they are, list entries as ``<item>_NN``."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield prefix, float(value)
    elif isinstance(value, dict):
        for key, v in value.items():
            if key not in SKIP:
                yield from scalars(f"{prefix}/{key}", v, ITEMS.get(key, "block"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from scalars(f"{prefix}/{item}_{i:02d}", v)


class Tracker:
    """What the trainer calls, with the rows it writes to the JSONL files; this one does nothing
    (``train.trackers: []``). A subclass implements :meth:`log` and, if it can, :meth:`rewind`."""

    def log_metrics(self, row: dict) -> None:
        """A row of metrics.jsonl (a loss row: the guard's skip/rollback rows are not logged)."""
        self.log(row["step"], dict(scalars("metrics", row)))

    def log_diagnostics(self, row: dict) -> None:
        """A row of diagnostics.jsonl."""
        self.log(row["step"], dict(scalars("diagnostics", row)))

    def log(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` at ``step``."""

    def rewind(self, step: int) -> None:
        """The run continues after ``step``: forget what was logged after it, where the tracker can."""

    def close(self) -> None:
        """Write everything out and release the tracker."""


class Trackers(Tracker):
    """Several trackers as one: each call goes to each."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, step, values):
        for t in self.trackers:
            t.log(step, values)

    def rewind(self, step):
        for t in self.trackers:
            t.rewind(step)

    def close(self):
        for t in self.trackers:
            t.close()


class TensorBoardTracker(Tracker):
    """Scalars in ``run_dir/tensorboard`` (``tensorboard --logdir RUN_DIR/tensorboard``)."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # (needs the tensorboard package: imported here)

        # purge_step: a START event there hides what an earlier session logged after start_step
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self.charts: set[str] = set()  # per-block quantities already in the custom-scalars layout

    def log(self, step, values):
        for name, v in values.items():
            self.writer.add_scalar(name, v, step)
        charts = {m.group(1) for name in values if (m := re.fullmatch(r"(.+)/block_\d+", name))}
        if not charts <= self.charts:
            self.charts |= charts
            layout = {c: ["Multiline", [re.escape(c) + r"/block_\d+$"]] for c in sorted(self.charts)}
            self.writer.add_custom_scalars({"spannorm": layout})

    def rewind(self, step):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    """An offline W&B run in ``run_dir/wandb`` (project spannorm, named after the run directory, the
    run's config as its config); ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it. ``quiet``: W&B prints
    nothing (its banner, run summary and sync hint are otherwise printed on stderr)."""

    def __init__(self, run_dir: Path, config: dict, quiet: bool = False):
        import wandb  # an optional dependency: imported only when this tracker is asked for

        folder = Path(run_dir) / "wandb"
        try:  # W&B writes to a temporary directory instead of a folder it cannot write: a write here first
            folder.mkdir(exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise os_error(e, f"{str(folder)!r}", "the W&B run is written there") from None
        if not os.access(folder, os.W_OK | os.R_OK):  # (W&B's own test: a read-only file system, for root too)
            raise ConfigError(f"W&B cannot write {str(folder)!r}: it is not writable (the W&B run is written there)")
        self.run = wandb.init(
            mode="offline",
            dir=str(run_dir),
            project="spannorm",
            name=Path(run_dir).resolve().name,
            config=config,
            settings=wandb.Settings(console="off", silent=quiet),  # the trainer's output stays the terminal's
        )
        if not Path(self.run.dir).resolve().is_relative_to(folder.resolve()):  # (W&B found it unwritable all the same)
            where = self.run.dir
            self.close()
            raise ConfigError(f"W&B cannot write {str(folder)!r} (it wrote to {where!r} instead): make it writable")
        self.run.define_metric("step")
        for prefix in ("metrics", "diagnostics"):
            self.run.define_metric(f"{prefix}/*", step_metric="step")

    def log(self, step, values):
        self.run.log({"step": step, **values})

    def close(self):
        import wandb

        self.run.finish()
        wandb.teardown()  # waits until W&B's service has written the run out: finish alone may return before


def check_trackers(names: list[str]) -> None:
    """A ConfigError for an unknown tracker name or a tracker whose package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"tracker {name!r} is unknown: expected {' or '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"tracker {name} needs {name}: pip install 'spannorm[{name}]'")


def make_trackers(names: list[str], run_dir: Path, config: dict, start_step: int = 0, quiet: bool = False) -> Tracker:
    """The trackers ``names`` (tensorboard, wandb; [] for none) of the run in ``run_dir`` with the
    config ``config`` (a dict, W&B's run config), which starts at ``start_step`` (a resume: the
    checkpoint's step); ``quiet``: they print nothing. A ConfigError for an unknown name or a missing
    package, before any is made."""
    check_trackers(names)
    made = []
    for name in dict.fromkeys(names):  # (each once)
        made.append(
            TensorBoardTracker(run_dir, start_step) if name == "tensorboard" else WandbTracker(run_dir, config, quiet)
        )
    return Trackers(made)


def replay(run_dir: Path, names: list[str]) -> tuple[int, int]:
    """Feed a run's metrics.jsonl and diagnostics.jsonl rows, in step order as the trainer logs them
    (a step's diagnostics before its metrics), to new trackers ``names``: (metrics rows, diagnostics rows).
    A TensorBoard folder already there is superseded (TensorBoard shows the replay only)."""
    run = RunDir(run_dir, "RUN_DIR")
    if not run.has_run():
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} is not a run directory (no config.yaml)")
    metrics, diagnostics = run.metrics(), run.diagnostics()
    config = to_dict(run.config())  # (validated, as every file read back: W&B's run config)
    rows = sorted([(r["step"], 0, r) for r in diagnostics] + [(r["step"], 1, r) for r in metrics], key=lambda x: x[:2])
    tracker = make_trackers(names, run_dir, config)
    try:
        for _, is_metrics, row in rows:
            (tracker.log_metrics if is_metrics else tracker.log_diagnostics)(row)
    finally:
        tracker.close()
    return len(metrics), len(diagnostics)
