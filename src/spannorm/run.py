"""A run's directory: what it holds and how it is read (its config: :mod:`spannorm.run_config`; its checkpoints'
format: :mod:`spannorm.checkpoint`).

A run directory::

    config.yaml         the resolved config (what --resume reloads)
    metrics.jsonl       one row per log step: step, loss, val_loss, lr, grad_norm, tokens_per_s;
                        MoE runs add aux_loss, z_loss (unweighted means over layers) and moe_imbalance;
                        with train.guard, a row whose interval had skipped steps adds skipped (their number),
                        and each intervention of the guard is a row of its own: step, kind (skip or rollback),
                        reason, and for a rollback to_step (the checkpoint's step; 0: the initial weights)
    diagnostics.jsonl   every probe_interval steps, one row (the step's forward and gradients, weights before it):
                          grad_norm, stream_rms        per block: gradient norm (before clipping), stream RMS
                          attn_rms, ffn_rms            per block: RMS of the raw branch outputs (SpanNorm: f, not s·f)
                          attn_entropy                 per block: mean causal attention entropy (nats), 1st sequence
                          attn_entropy_max             uniform-causal entropy, mean_t ln(t+1): the reference
                          update_ratio                 ‖ΔW‖/‖W‖ of this optimizer step: {role: [per block]} for
                                                       attn.qk, attn.v, attn.out, ffn.up, ffn.down, router (MoE),
                                                       norm (all norm gains of the block); embed, head (untied): one
                          logit_rms, head_in_rms       RMS of the logits (1st sequence) and of the head input
                          embed_rms, embed_cos         RMS of the embedding, mean pairwise cosine of its rows
                          moe                          MoE runs: per-layer expert load (see probe.py)
    summary.json        written when the run ends: final validation loss, diverged (step, reason), stalled, tokens/s;
                        with train.guard: guard_skipped, guard_rollbacks, guard_lr_scale
    checkpoints/        latest and step-N/ (spannorm.checkpoint): the weights, the optimizer, the RNGs and the state
                        of each of the trainer's parts, checked against their sha256. The newest
                        train.keep_checkpoints of them are kept, and a resume starts from the newest one that verifies
    data.json           the dataset it trains on (data.dataset_identity: its name holds a hash of the documents
                        and settings; its files' sha256): a resume and an eval of its validation split are
                        refused when data.corpus now gives other data
    init.json           the weight stds its model was initialized with (init_record): a study or compare refuses to
                        reuse a run whose recipe has changed in the code since
    tokenizer.json      the BPE tokenizer it was trained with (BPE runs): export, generate and eval use it, never
                        one trained again from the corpus as it is now
    run_id              the run's random id, also in each of its checkpoints' state.pt: a checkpoint of another
                        run (copied in) is refused
    .lock               held (flock) by the process that trains the run: a second one is refused

Nothing in a run directory is a symbolic link: a run that holds one is refused (it is never followed out of it).

Every JSON file is strict JSON: a non-finite number (a NaN loss) is written as null.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from pathlib import Path

import torch
import yaml

from . import checkpoint
from .config import (
    ConfigError,
    SpannormError,
    short,
    to_dict,
)
from .data import dataset_identity, prepare
from .files import (
    atomic_write_text,
    dumps,
    locked,
    no_links,
    read_json,
    read_jsonl,
    shape_problem,
    sweep_temp,
)
from .model_config import ModelConfig
from .run_config import RunConfig, read_run_config, same_experiment
from .schemes import weight_stds

# --- the run directory ---------------------------------------------------------------------

# what the files of a run hold ({key: kind}, see files.shape_problem), checked whenever one is read back
SUMMARY_FIELDS = {
    "scheme": "str",
    **dict.fromkeys(("steps", "tokens", "n_params", "guard_skipped", "guard_rollbacks"), "int"),
    **dict.fromkeys(("finished", "diverged", "stalled"), "bool"),
    **dict.fromkeys(("final_loss", "final_val_loss", "unigram_entropy", "tokens_per_s"), "number?"),
    "diverged_step": "int?",
    "diverged_reason": "str?",
    "guard_lr_scale": "number",
}
SUMMARY_REQUIRED = ("scheme", "steps", "final_val_loss", "diverged", "diverged_step", "diverged_reason", "tokens_per_s")
METRICS_FIELDS = {
    **dict.fromkeys(("step", "skipped", "to_step"), "int"),
    **dict.fromkeys(("loss", "val_loss", "lr", "grad_norm", "tokens_per_s"), "number?"),
    **dict.fromkeys(("aux_loss", "z_loss", "moe_imbalance"), "number?"),
    **dict.fromkeys(("kind", "reason"), "str"),
}
DIAGNOSTICS_FIELDS = {"step": "int", **dict.fromkeys(("grad_norm", "stream_rms", "attn_rms", "ffn_rms"), "numbers")}


def metrics_problem(row) -> str | None:
    """What is wrong with a row of metrics.jsonl: a loss row (step, loss, val_loss, ...) or a guard's (step, kind,
    reason)."""
    guard = isinstance(row, dict) and "kind" in row
    return shape_problem(row, METRICS_FIELDS, ("step", "kind", "reason") if guard else ("step", "loss", "val_loss"))


def summary_problem(summary) -> str | None:
    return shape_problem(summary, SUMMARY_FIELDS, SUMMARY_REQUIRED)


def init_record(cfg: ModelConfig) -> dict:
    """The init recipe of ``cfg`` as the code gives it now: each block's weight stds by role."""
    return {"weight_stds": [{r.value: std for r, std in weight_stds(cfg, i).items()} for i in range(cfg.n_layers)]}


def init_problem(record) -> str | None:
    return shape_problem(record, {}, ("weight_stds",))  # (any other damage: not the recipe of today, refused)


def data_problem(data) -> str | None:
    return shape_problem(data, {"dataset": "str", "corpus": "str"}, ("dataset",))


def diagnostics_problem(row) -> str | None:
    return shape_problem(row, DIAGNOSTICS_FIELDS, ("step", "grad_norm", "stream_rms"))


class RunDir:
    """A run directory (the layout is in this module's docstring). ``flag`` is the option that named it
    (--out, --checkpoint, ...): errors name it."""

    def __init__(self, path: Path | str, flag: str = "--out"):
        self.path, self.flag = Path(path), flag
        self.config_file = self.path / "config.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.diagnostics_file = self.path / "diagnostics.jsonl"
        self.summary_file = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"
        self.run_id_file = self.path / "run_id"
        self.data_file = self.path / "data.json"
        self.tokenizer_file = self.path / "tokenizer.json"
        self.init_file = self.path / "init.json"

    def __str__(self) -> str:
        return str(self.path)

    # config and summary

    def has_run(self) -> bool:
        self.check_links()
        return self.config_file.is_file()

    def check_links(self) -> None:
        """Refuse a run directory that holds a symbolic link (nothing in it is followed out of it)."""
        no_links(self.path, self.flag)

    def run_id(self) -> str | None:
        """The run's id (None: a run written before runs had one)."""
        if not self.run_id_file.is_file():
            return None
        run_id = self.run_id_file.read_bytes().strip()
        if not re.fullmatch(rb"[0-9a-f]{32}", run_id):
            raise SpannormError(
                f"{str(self.run_id_file)!r} is not the file spannorm writes (expected 32 hexadecimal digits): restore "
                "it, or delete it (its checkpoints are then not checked against it)"
            )
        return run_id.decode()

    def config(self) -> RunConfig:
        """The resolved config saved in the directory."""
        if not self.has_run():
            to_resume = " to resume" if self.flag == "--out" else ""
            raise ConfigError(f"{self.flag} {str(self.path)!r} holds no run{to_resume} (no config.yaml)")
        return read_run_config(self.config_file)

    def check_config(self, cfg: RunConfig, what: str) -> None:
        """Refuse a directory that holds a run of another config (``what`` names it in the error:
        "--out 'x' holds {what} with another config"); a directory without a run passes."""
        if self.has_run() and not same_experiment(self.config(), cfg):
            raise ConfigError(f"{what} with another config: choose another --out (or delete it)")
        if self.has_run() and self.init_file.is_file():
            fix = "restore it, or delete it (the run's init is then not checked)"
            if read_json(self.init_file, fix, init_problem) != init_record(cfg.model):
                raise ConfigError(
                    f"{what} initialized by another recipe: model.scheme={cfg.model.scheme.value}'s init stds have "
                    "changed in the code since it ran; delete it to train it with today's recipe"
                )

    def start(self, cfg: RunConfig, dataset: Path) -> None:
        """Write the config of a new run, its id, what it trains on (``dataset``, prepared from ``cfg.data``: its
        identity and its tokenizer) and its empty logs."""
        atomic_write_text(self.run_id_file, uuid.uuid4().hex)
        atomic_write_text(self.data_file, dumps(dataset_identity(dataset, cfg.data.corpus), indent=1))
        atomic_write_text(self.init_file, dumps(init_record(cfg.model), indent=1))
        if (dataset / "tokenizer.json").is_file():
            atomic_write_text(self.tokenizer_file, (dataset / "tokenizer.json").read_text())
        atomic_write_text(self.config_file, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_text(self.metrics_file, "")
        atomic_write_text(self.diagnostics_file, "")

    def dataset(self, cfg: RunConfig) -> Path:
        """The prepared dataset of the run's data (``cfg``: its config), refused in one line when it is not the
        one the run was trained on (its data.json; a run written before runs recorded it is not checked)."""
        dataset = prepare(cfg.data)
        if self.data_file.is_file():
            self.check_links()
            want = read_json(
                self.data_file, "restore it, or delete it (the run's data is then not checked)", data_problem
            )["dataset"]
            if (have := dataset.name) != want:
                raise ConfigError(
                    f"{self.flag} {str(self.path)!r} was trained on the dataset {want}, but data.corpus="
                    f"{short(cfg.data.corpus)} now gives {have}: the corpus changed since (a document added, "
                    "removed or edited); restore it, or train a new run on it"
                )
        return dataset

    def summary(self) -> dict | None:
        """The summary of a run that ended (None while it has not)."""
        self.check_links()
        if not self.summary_file.is_file():
            return None
        return read_json(
            self.summary_file,
            "delete it and resume the run to write it again",
            summary_problem,
        )

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.summary_file, dumps(summary, indent=1))

    @contextlib.contextmanager
    def lock(self):
        """Hold the directory's lock for the block (a second process is refused), after sweeping the temporary
        files a kill left."""
        with locked(self.path, self.flag):
            self.check_links()
            sweep_temp(self.path, self.checkpoints)
            yield

    # logs

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl with a loss (the guard's interventions: :meth:`interventions`)."""
        self.check_links()
        return [r for r in read_jsonl(self.metrics_file, metrics_problem) if "kind" not in r]

    def interventions(self) -> list[dict]:
        """The training guard's rows of metrics.jsonl: step, kind (skip or rollback), reason (, to_step)."""
        self.check_links()
        return [r for r in read_jsonl(self.metrics_file, metrics_problem) if "kind" in r]

    def diagnostics(self) -> list[dict]:
        """The rows of diagnostics.jsonl (each with the per-block lists of every row's length)."""
        self.check_links()
        rows = read_jsonl(self.diagnostics_file, diagnostics_problem)
        if len({(len(r["grad_norm"]), len(r["stream_rms"])) for r in rows}) > 1:
            raise SpannormError(f"{self.diagnostics_file} is not what spannorm writes: its rows have different depths")
        return rows

    def truncate_logs(self, step: int, keep_guard: bool = False) -> None:
        """Forget the rows of metrics.jsonl and diagnostics.jsonl past ``step`` (``keep_guard``: not the guard's)."""
        for path, check in ((self.metrics_file, metrics_problem), (self.diagnostics_file, diagnostics_problem)):
            rows = [r for r in read_jsonl(path, check) if r["step"] <= step or (keep_guard and "kind" in r)]
            atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))

    # checkpoints (the format: spannorm.checkpoint)

    def save_checkpoint(self, step: int, model: torch.nn.Module, state: dict, keep: int, write_weights=None) -> None:
        """Write checkpoint ``step`` of this run (:func:`spannorm.checkpoint.save`, with the run's id)."""
        checkpoint.save(self.checkpoints, step, model, {"run_id": self.run_id(), **state}, keep, write_weights)

    def find_checkpoint(self) -> Path | None:
        """The newest checkpoint of this run that verifies (:func:`spannorm.checkpoint.newest`)."""
        self.check_links()
        return checkpoint.newest(self.checkpoints, self.run_id())

    def load_weights(self, model: torch.nn.Module) -> Path:
        """Load the weights of the newest checkpoint that verifies into ``model`` (as a resume would);
        returns that checkpoint. Errors (no checkpoint, weights of another shape) are one line."""
        ckpt = self.find_checkpoint()
        if ckpt is None:
            raise SpannormError(f"{self.flag} {str(self.path)!r} has no checkpoint yet (no checkpoints/step-N)")
        try:
            checkpoint.load_weights(ckpt, model)
        except Exception as e:  # a missing file, or the weights of another config
            raise SpannormError(
                f"{self.flag} {str(self.path)!r}: cannot load its weights: {str(e).splitlines()[0]}"
            ) from None
        return ckpt


def load_run(run_dir: Path | str, flag: str = "--out") -> RunConfig:
    """The resolved config saved in a run directory (``flag``: the option that named it, for errors)."""
    return RunDir(run_dir, flag).config()


def read_metrics(run_dir: Path | str) -> list[dict]:
    """The rows of a run's metrics.jsonl with a loss."""
    return RunDir(run_dir).metrics()
