"""Experiment trackers: a run's metrics and per-block diagnostics in TensorBoard or W&B (offline by default).

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
there, TensorBoard's purge on restart); W&B's history is append-only, so there the steps
after it appear twice (each W&B run's x axis is the ``step`` it logs, not W&B's own counter).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError, to_dict
from .files import atomic_write_text, dumps, os_error
from .run import RunDir
from .run_config import TRACKERS, run_config_from_dict

REPLAY_FILE = "replay.json"  # RUN_DIR/wandb/replay.json: the W&B run of the last `spannorm track --to wandb`

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
    """A W&B run in ``run_dir/wandb``, named after the run directory, the run's config as its config; mode and
    project from ``train.wandb_mode`` and ``train.wandb_project`` of ``config`` (offline: ``wandb sync
    RUN_DIR/wandb/offline-run-*`` uploads it later). ``run_id``: the W&B run's id, which a later session resumes
    (a resumed training continues its W&B run: resume="allow"). ``quiet``: W&B prints nothing (its banner, run
    summary and sync hint are otherwise printed on stderr)."""

    def __init__(self, run_dir: Path, config: dict, quiet: bool = False, run_id: str | None = None):
        import wandb  # an optional dependency: imported only when this tracker is asked for

        train = config.get("train", {})
        self.mode, project = train.get("wandb_mode", "offline"), train.get("wandb_project", "spannorm")
        folder = Path(run_dir) / "wandb"
        try:  # W&B writes to a temporary directory instead of a folder it cannot write: a write here first
            folder.mkdir(exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise os_error(e, f"{str(folder)!r}", "the W&B run is written there") from None
        if not os.access(folder, os.W_OK | os.R_OK):  # (W&B's own test: a read-only file system, for root too)
            raise ConfigError(f"W&B cannot write {str(folder)!r}: it is not writable (the W&B run is written there)")
        try:
            self.run = wandb.init(
                mode=self.mode,
                dir=str(run_dir),
                project=project,
                name=Path(run_dir).resolve().name,
                id=run_id,
                resume="allow" if run_id else None,
                config=config,
                settings=wandb.Settings(console="off", silent=quiet),  # the trainer's output stays the terminal's
            )
        except wandb.errors.Error as e:  # (online: no login, or no connection after W&B's retries)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"W&B train.wandb_mode={self.mode} failed: {first[:200]} (wandb login, or train.wandb_mode=offline)"
            ) from None
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


def check_trackers(names: list[str], wandb_mode: str = "offline") -> None:
    """A ConfigError for an unknown tracker name or a tracker whose package is not installed (W&B's: unless
    ``wandb_mode`` is disabled)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"tracker {name!r} is unknown: expected {' or '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None and not (name == "wandb" and wandb_mode == "disabled"):
            raise ConfigError(f"tracker {name} needs {name}: pip install 'spannorm[{name}]'")


def make_trackers(
    names: list[str],
    run_dir: Path,
    config: dict,
    start_step: int = 0,
    quiet: bool = False,
    run_id: str | None = None,
) -> Tracker:
    """The trackers ``names`` (tensorboard, wandb; [] for none) of the run in ``run_dir`` with the
    config ``config`` (a dict: W&B's run config, and its ``train.wandb_*`` settings; wandb_mode disabled leaves W&B
    out), which starts at ``start_step`` (a resume: the checkpoint's step); ``run_id``: W&B's run id; ``quiet``:
    they print nothing. A ConfigError for an unknown name or a missing package, before any is made."""
    mode = config.get("train", {}).get("wandb_mode", "offline")
    check_trackers(names, mode)
    made = []
    for name in dict.fromkeys(names):  # (each once)
        if name == "tensorboard":
            made.append(TensorBoardTracker(run_dir, start_step))
        elif mode != "disabled":
            made.append(WandbTracker(run_dir, config, quiet, run_id))
    return Trackers(made)


def replay(run_dir: Path, names: list[str], wandb: dict | None = None) -> tuple[int, int]:
    """Feed a run's metrics.jsonl and diagnostics.jsonl rows, in step order as the trainer logs them
    (a step's diagnostics before its metrics), to new trackers ``names``: (metrics rows, diagnostics rows).
    ``wandb``: train.wandb_mode / wandb_project instead of the run's (``{"wandb_mode": "online"}``). A replay
    supersedes the previous one: TensorBoard shows the replay only; W&B's previous replay (``RUN_DIR/wandb/
    replay.json`` names it) is removed once the new one is written, its local folder and, online, its run."""
    run = RunDir(run_dir, "RUN_DIR")
    if not run.has_run():
        raise ConfigError(f"RUN_DIR {str(run_dir)!r} is not a run directory (no config.yaml)")
    metrics, diagnostics = run.metrics(), run.diagnostics()
    config = to_dict(run.config())  # (validated, as every file read back: W&B's run config)
    config["train"] |= wandb or {}
    run_config_from_dict(config)  # (the settings given: checked as a config's, one line for a bad one)
    if "wandb" in names and config["train"]["wandb_mode"] == "disabled":
        raise ConfigError("--to wandb with train.wandb_mode=disabled replays nothing: --wandb-mode offline or online")
    rows = sorted([(r["step"], 0, r) for r in diagnostics] + [(r["step"], 1, r) for r in metrics], key=lambda x: x[:2])
    replay_id = f"{run.run_id() or 'run'}-replay-{uuid.uuid4().hex[:8]}"  # (a new W&B run each time: see _supersede)
    tracker = make_trackers(names, run_dir, config, run_id=replay_id)
    try:
        for _, is_metrics, row in rows:
            (tracker.log_metrics if is_metrics else tracker.log_diagnostics)(row)
    finally:
        tracker.close()
    for t in tracker.trackers:
        if isinstance(t, WandbTracker):
            _supersede(Path(run_dir) / "wandb", t)
    return len(metrics), len(diagnostics)


def _supersede(folder: Path, new: WandbTracker) -> None:
    """After a W&B replay into ``folder`` (RUN_DIR/wandb): replay.json names it, and the replay it names before is
    removed (its local folders; online, its run on the server too, or a warning that it is still there)."""
    record = folder / REPLAY_FILE
    try:
        old = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        old = {}  # (a damaged record: the previous replay is left where it is)
    run = new.run
    atomic_write_text(record, dumps({"id": run.id, "mode": new.mode, "project": run.project, "entity": run.entity}))
    if not isinstance(old, dict) or not re.fullmatch(r"[0-9a-z-]+", str(old.get("id"))) or old["id"] == run.id:
        return
    for path in folder.glob(f"*run-*-{old['id']}"):  # (offline-run-<time>-<id>, online's run-<time>-<id>)
        shutil.rmtree(path, ignore_errors=True)
    if old.get("mode") == "online":
        where = f"{old.get('entity')}/{old.get('project')}/{old['id']}"
        try:
            import wandb  # (installed: the new replay used it)

            wandb.Api().run(where).delete()
        except Exception as e:  # (offline now, no login, or deleted already: the new replay stands all the same)
            print(
                f"spannorm: the previous W&B replay {where} is still there ({type(e).__name__}): delete it on W&B",
                file=sys.stderr,
            )
