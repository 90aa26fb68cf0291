"""A run: its config (model, data, train) and its directory.

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
    checkpoints/latest  name of the newest complete checkpoint directory
    checkpoints/step-N/ model.safetensors; state.pt: the step, the optimizer, the RNGs and the state of each of
                        the trainer's parts (divergence monitor, training guard, throughput meter, validation);
                        manifest.json (sha256). The newest train.keep_checkpoints of them are kept, and a resume
                        starts from the newest one whose files match their sha256
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
import enum
import hashlib
import json
import math
import os
import re
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from .config import (
    ConfigError,
    SpannormError,
    apply_overrides,
    coerce_enum,
    from_dict,
    read_yaml,
    require,
    short,
    to_dict,
)
from .data import DataConfig, absolute_corpus, dataset_identity, prepare
from .device import DEVICE_FORMS, rng_state, set_rng_state, valid_device
from .files import (
    atomic_dir,
    atomic_write_text,
    dumps,
    locked,
    no_links,
    read_json,
    read_jsonl,
    remove_dir,
    shape_problem,
    sweep_temp,
)
from .model_config import ModelConfig
from .schemes import weight_stds

MAX_DIST_TIMEOUT_S = 30 * 24 * 3600  # torch.distributed's timeouts overflow beyond finite, bounded values
SEED_RANGE = "an integer in [0, 2**64)"  # what torch.manual_seed takes


def valid_seed(seed) -> bool:
    return isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**64


TRACKERS = ("tensorboard", "wandb")  # train.trackers: each needs the package, and the spannorm extra, of its name
WANDB_MODES = ("offline", "online", "disabled")  # train.wandb_mode (disabled: train.trackers' wandb is left out)
WANDB_FORBIDDEN = "/\\#?%:"  # characters W&B refuses in a project name


class Distributed(str, enum.Enum):
    """How the processes torchrun starts share the training (one process: none, whatever is set)."""

    NONE = "none"  # one process
    DDP = "ddp"  # DistributedDataParallel: every rank holds the whole model, gradients are averaged
    FSDP = "fsdp"  # FSDP2 (fully_shard, per block): weights, gradients and optimizer state sharded over the ranks


class Precision(str, enum.Enum):
    """Numeric precision of the forward/backward pass (weights and optimizer stay fp32)."""

    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast (fast on CPUs with AMX)


@dataclass
class TrainConfig:
    seed: int = 1337  # seeds the init and the data order
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    max_steps: int = 500  # optimizer steps in the run
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr (cosine decay)
    warmup_steps: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on weight matrices only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this value; 0 disables
    precision: Precision = Precision.FP32  # fp32 or bf16 (autocast)
    device: str = "auto"  # auto (CUDA when available, else CPU), cpu, cuda or cuda:N
    tf32: bool = False  # CUDA: fp32 matmuls in TF32 (faster, ~1e-3 relative error); fp32 means fp32 by default
    log_interval: int = 10  # steps between metrics rows
    eval_interval: int = 100  # steps between validation passes (and one at the end)
    eval_batches: int = 8  # validation batches per pass
    ckpt_interval: int = 100  # steps between checkpoints (and one at the end)
    threads: int | None = (
        None  # torch intra-op threads; None: the CLI's fit (spannorm.threads), the API's torch default
    )
    compile: bool = False  # torch.compile each block of the training forward (probing steps, evaluation: eager)
    probe_interval: int = 50  # steps between rows of diagnostics.jsonl (per-block training diagnostics); 0: off
    # after warmup, stop when the loss stays >= the first step's for 5 steps;
    # a non-finite loss always stops (unless train.guard saves it)
    stop_on_divergence: bool = True
    keep_checkpoints: int = (
        2  # the newest checkpoints kept (>= 2: a resume falls back to the previous one if the newest is damaged)
    )
    guard: bool = False  # training guard: skip non-finite steps, roll back on repeated skips or a loss spike
    guard_skip_limit: int = 3  # skipped (non-finite) steps in a row that make the guard roll back
    guard_spike_z: float = 6.0  # a loss this many standard deviations above the window's mean rolls back; 0: off
    guard_window: int = 50  # the losses (of steps taken) the spike's z-score is computed over; checked once full
    guard_lr_factor: float = 1.0  # each rollback multiplies the learning rate (from then on) by this, in (0, 1]
    guard_max_rollbacks: int = 3  # rollbacks allowed in the run; then a skip streak makes the run diverged
    trackers: list[str] = field(default_factory=list)  # experiment trackers that mirror the logs: tensorboard, wandb
    wandb_mode: str = (
        "offline"  # wandb's: offline (RUN_DIR/wandb, `wandb sync` later), online (needs a login), disabled
    )
    wandb_project: str = "spannorm"  # the W&B project (online: of your default entity, or WANDB_ENTITY's)
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimizer step, in each process
    distributed: Distributed = Distributed.NONE  # under torchrun: ddp (the global batch: batch_size × ranks × accum)
    # under torchrun: how long a rank waits for the others at a collective before the job fails (a hung rank)
    dist_timeout_s: float = 1800.0
    init_from: str | None = None  # a run directory or a spannorm export folder: a new run starts from its weights

    def __post_init__(self):
        self.precision = coerce_enum(Precision, "train.precision", self.precision)
        self.distributed = coerce_enum(Distributed, "train.distributed", self.distributed)
        for name in self.trackers:
            require(name in TRACKERS, "train.trackers", self.trackers, f"a list of {', '.join(TRACKERS)}")
        require(self.wandb_mode in WANDB_MODES, "train.wandb_mode", self.wandb_mode, " or ".join(WANDB_MODES))
        project = self.wandb_project
        ok = isinstance(project, str) and 0 < len(project) <= 128 and not set(project) & set(WANDB_FORBIDDEN)
        require(ok, "train.wandb_project", project, f"a name of 1 to 128 characters without any of {WANDB_FORBIDDEN}")
        for name in (
            "batch_size",
            "grad_accum_steps",
            "seq_len",
            "max_steps",
            "log_interval",
            "eval_interval",
            "eval_batches",
            "ckpt_interval",
        ):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"train.{name}", value, "a positive integer")
        require(
            isinstance(self.dist_timeout_s, (int, float)) and 0 < self.dist_timeout_s <= MAX_DIST_TIMEOUT_S,
            "train.dist_timeout_s",
            self.dist_timeout_s,
            f"a positive number of seconds, at most {MAX_DIST_TIMEOUT_S:,} (30 days)",
        )
        require(valid_seed(self.seed), "train.seed", self.seed, SEED_RANGE)
        require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            "train.warmup_steps",
            self.warmup_steps,
            "an integer >= 0",
        )
        require(math.isfinite(self.lr) and self.lr > 0, "train.lr", self.lr, "a positive number")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        require(0 <= self.beta1 < 1, "train.beta1", self.beta1, "a number in [0, 1)")
        require(0 <= self.beta2 < 1, "train.beta2", self.beta2, "a number in [0, 1)")
        require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")
        require(self.threads is None or self.threads > 0, "train.threads", self.threads, "a positive integer or null")
        require(
            self.init_from is None or (isinstance(self.init_from, str) and self.init_from != ""),
            "train.init_from",
            self.init_from,
            "a run directory, a spannorm export folder, or null",
        )
        require(self.probe_interval >= 0, "train.probe_interval", self.probe_interval, "an integer >= 0 (0: off)")
        require(
            isinstance(self.stop_on_divergence, bool),
            "train.stop_on_divergence",
            self.stop_on_divergence,
            "true or false",
        )
        require(valid_device(self.device), "train.device", self.device, DEVICE_FORMS)
        require(
            isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 2,
            "train.keep_checkpoints",
            self.keep_checkpoints,
            "an integer >= 2",
        )
        require(isinstance(self.guard, bool), "train.guard", self.guard, "true or false")
        for name, low in (("guard_skip_limit", 1), ("guard_window", 2), ("guard_max_rollbacks", 0)):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"train.{name}",
                value,
                f"an integer >= {low}",
            )
        require(
            math.isfinite(self.guard_spike_z) and self.guard_spike_z >= 0,
            "train.guard_spike_z",
            self.guard_spike_z,
            "a number >= 0 (0: no spike check)",
        )
        require(0 < self.guard_lr_factor <= 1, "train.guard_lr_factor", self.guard_lr_factor, "a number in (0, 1]")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the model (vocab_size comes from data)
    data: DataConfig = field(default_factory=DataConfig)  # corpus and tokenizer
    train: TrainConfig = field(default_factory=TrainConfig)  # optimization and bookkeeping


PRESETS = resources.files("spannorm") / "configs"


def shipped_names(folder) -> list[str]:
    """Names of the YAML files shipped in a package folder (without .yaml)."""
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_shipped(name: str, folder, what: str, plural: str) -> Path:
    """A YAML path, or the name of a YAML file shipped in ``folder`` (a ``what``)."""
    path = Path(name)
    if (path.exists() and not path.is_dir()) or path.suffix in (".yaml", ".yml"):  # (a pipe: --config <(...))
        return path
    if name in shipped_names(folder):
        return Path(str(folder / f"{name}.yaml"))
    raise ConfigError(
        f"--config {name!r} is neither a YAML file nor a {what}; {plural}: " + ", ".join(shipped_names(folder))
    )


def preset_names() -> list[str]:
    return shipped_names(PRESETS)


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a preset shipped in spannorm/configs/."""
    return resolve_shipped(name, PRESETS, "preset", "presets")


def run_config_from_dict(data: dict) -> RunConfig:
    """Validate a nested dict into a RunConfig; model.vocab_size is derived from the tokenizer."""
    sections = ("model", "data", "train")
    for key in data:
        if key not in sections:
            raise ConfigError(f"unknown key {key}; valid top-level keys: " + ", ".join(sections))
    data_cfg = from_dict(DataConfig, data.get("data"), "data")
    model = data.get("model") or {}
    if isinstance(model, dict):  # (a non-mapping is reported by from_dict)
        model = dict(model)
        vocab = model.get("vocab_size", data_cfg.model_vocab_size)
        require(
            vocab == data_cfg.model_vocab_size,
            "model.vocab_size",
            vocab,
            f"{data_cfg.model_vocab_size}, the tokenizer's vocabulary (set data.tokenizer/data.vocab_size)",
        )
        model["vocab_size"] = data_cfg.model_vocab_size
    return RunConfig(
        model=from_dict(ModelConfig, model, "model"),
        data=data_cfg,
        train=from_dict(TrainConfig, data.get("train"), "train"),
    )


def load_config(config: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load a preset or YAML file and apply ``section.key=value`` overrides."""
    return run_config_from_dict(apply_overrides(read_yaml(resolve_config_path(str(config))), list(overrides)))


def read_run_config(path: Path) -> RunConfig:
    """The config a run saved (its config.yaml, an exported folder's spannorm_run.yaml), which holds each section
    as a mapping: an empty or partial file is a damaged one, not a run of the default config."""
    data = read_yaml(path)
    for section in ("model", "data", "train"):
        if not isinstance(data.get(section), dict):
            raise ConfigError(
                f"{str(path)!r} is not the config of a run: its {section} section is missing or not a mapping "
                "(a run saves model, data and train)"
            )
    return run_config_from_dict(data)


# train.*: where and how a run computes (its numbers move by float rounding at most) and who watches it
NOT_IDENTITY = ("device", "threads", "compile", "trackers", "wandb_mode", "wandb_project", "dist_timeout_s")


def same_experiment(a: RunConfig, b: RunConfig) -> bool:
    """Whether two configs describe the same run, wherever and however it computes and whatever watches it: equal
    but for ``train.device``, ``threads``, ``compile``, the trackers' settings and ``train.dist_timeout_s`` (a run, a
    compare or a study started on one device, or eager, may resume on another, or compiled)."""

    def key(cfg: RunConfig) -> dict:
        d = to_dict(cfg)
        d["train"] = {k: v for k, v in d["train"].items() if k not in NOT_IDENTITY}
        d["data"]["corpus"] = absolute_corpus(d["data"]["corpus"])  # (a relative path: where it is now)
        return d

    return key(a) == key(b)


# --- the run directory ---------------------------------------------------------------------

CHECKPOINT = re.compile(r"step-(\d+)")
SHARDS_METADATA = "dcp/.metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint's files


def checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint directory (step-0000040: 40)."""
    return int(CHECKPOINT.fullmatch(ckpt.name)[1])


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

    # checkpoints

    def checkpoint_dirs(self) -> list[Path]:
        """The checkpoint directories, newest first (a symbolic link is none: it may lead out of the run)."""
        dirs = [
            p
            for p in self.checkpoints.glob("step-*")
            if CHECKPOINT.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
        ]
        return sorted(dirs, key=checkpoint_step, reverse=True)

    def save_checkpoint(self, step: int, model: torch.nn.Module, state: dict, keep: int, write_weights=None) -> None:
        """Write checkpoint ``step``: the weights and ``state`` (optimizer, RNGs, the trainer's parts), and keep
        the newest ``keep`` (newer ones than ``step`` are the damaged ones a resume fell back past: deleted).
        Optimizer tensors are saved where they live and loaded onto the device of the run that resumes.
        ``write_weights(tmp)``: how the weights are written into the checkpoint's directory (default
        model.safetensors; a sharded run: the ranks' shards in dcp/)."""
        name = f"step-{step:07d}"
        if (self.checkpoints / name).exists():  # a damaged one a resume fell back past
            remove_dir(self.checkpoints / name)
        with atomic_dir(self.checkpoints / name) as tmp:
            if write_weights is None:
                _save_weights(model, tmp / "model.safetensors")
            else:
                write_weights(tmp)
            _save_state({"step": step, "run_id": self.run_id(), **state}, tmp / "state.pt")
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            atomic_write_text(tmp / "manifest.json", json.dumps({f: _digest(tmp / f) for f in files}))
        atomic_write_text(self.checkpoints / "latest", name)
        dirs = self.checkpoint_dirs()
        newer = [d for d in dirs if checkpoint_step(d) > step]
        for old in newer + [d for d in dirs if checkpoint_step(d) <= step][keep:]:
            remove_dir(old)

    def find_checkpoint(self) -> Path | None:
        """The newest checkpoint whose files verify (None if the run has none yet); a damaged newer one is
        reported on stderr and passed over; if every one is damaged, an error. A ``latest`` that names no
        checkpoint directory there, and a checkpoint of another run, are refused (a resume would start again
        at step 0, or continue another run)."""
        self.check_links()
        latest = self.checkpoints / "latest"
        if latest.is_file():
            name = latest.read_text(errors="replace").strip()
            if not CHECKPOINT.fullmatch(name):
                raise SpannormError(f"{str(latest)!r} names {name!r}, not a checkpoint directory of this run: refused")
            if not (self.checkpoints / name).is_dir():
                raise SpannormError(
                    f"{str(latest)!r} names {name!r}, which is missing or not a directory: refused (put it back, "
                    "or delete checkpoints/latest to continue from the newest checkpoint there)"
                )
        damaged = []
        for ckpt in self.checkpoint_dirs():
            if (problem := damage(ckpt)) is None:
                self.check_owner(ckpt)
                for bad, why in damaged:
                    print(
                        f"spannorm: warning: checkpoint {str(bad)!r} is corrupt or truncated ({why}); "
                        f"using {ckpt.name}",
                        file=sys.stderr,
                    )
                return ckpt
            damaged.append((ckpt, problem))
        if damaged:
            ckpt, why = damaged[0]
            older = f" (and the {len(damaged) - 1} older ones)" if len(damaged) > 1 else ""
            raise SpannormError(f"checkpoint {str(ckpt)!r}{older} is corrupt or truncated: {why}")
        return None

    def check_owner(self, ckpt: Path) -> None:
        """Refuse a checkpoint that another run wrote (its state.pt holds another run id)."""
        if (mine := self.run_id()) is None:  # (a run from before runs had ids: its checkpoints have none)
            return
        try:
            theirs = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu", mmap=True).get("run_id")
        except Exception as e:  # (damage() checked the file's sha256: this is a file of another program)
            raise SpannormError(f"checkpoint {str(ckpt)!r} cannot be read: {type(e).__name__}") from None
        if theirs != mine:
            raise SpannormError(
                f"checkpoint {str(ckpt)!r} was written by another run (run id {theirs}, this run's is {mine}): "
                "refused; delete it"
            )

    def load_weights(self, model: torch.nn.Module) -> Path:
        """Load the weights of the newest checkpoint that verifies into ``model`` (as a resume would);
        returns that checkpoint. Errors (no checkpoint, weights of another shape) are one line."""
        ckpt = self.find_checkpoint()
        if ckpt is None:
            raise SpannormError(f"{self.flag} {str(self.path)!r} has no checkpoint yet (no checkpoints/step-N)")
        try:
            if sharded(ckpt):
                load_shards(ckpt, model)
            else:
                load_model(model, str(ckpt / "model.safetensors"))
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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def safetensors_os_errors(path: Path):
    """Within the block, an I/O error that safetensors reports as a SafetensorError of its own ("... (os error
    28)": a full disk) is raised as the OSError it is, naming ``path``."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        if (m := re.search(r"\(os error (\d+)\)", str(e))) is None:
            raise
        raise OSError(int(m[1]), os.strerror(int(m[1])), str(path)) from None


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """safetensors' save_model; an I/O error (a full disk) is raised as the OSError it is."""
    with safetensors_os_errors(path):
        save_model(model, str(path))


def _save_state(state: dict, path: Path) -> None:
    """torch.save through a Python file, so that an I/O error (a full disk) is raised as the OSError it is (torch
    raises a RuntimeError of its own on the way out, and a path gives only that)."""
    try:
        with open(path, "wb") as f:
            torch.save(state, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint directory's files (None: each matches its sha256 in manifest.json)."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        digests = {str(f): str(d) for f, d in manifest.items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return f"cannot read manifest.json ({type(e).__name__})"
    for needed in ("state.pt", "model.safetensors" if not sharded(ckpt) else SHARDS_METADATA):
        if needed not in digests:
            return f"manifest.json does not list {needed}"
    for fname, digest in digests.items():
        path = ckpt / fname
        if ".." in Path(fname).parts or not path.is_file() or _digest(path) != digest:
            return f"{fname} is missing or does not match its sha256"
    return None


def sharded(ckpt: Path) -> bool:
    """Whether a checkpoint holds its weights and optimizer as the shards of a sharded run (dcp/)."""
    return (ckpt / "dcp").is_dir()


def save_shards(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the weights and the optimizer state (torch.distributed.checkpoint)."""
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load_shards(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into ``model`` (and ``opt``), sharded over any
    number of ranks or whole in one process: torch.distributed.checkpoint reshards."""
    no_dist = not dist.is_initialized()
    if no_dist:  # (one process reading a sharded checkpoint is what is meant: torch's warning says nothing)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    if opt is None:
        msd = get_model_state_dict(model)
        dcp.load({"model": msd}, checkpoint_id=str(ckpt / "dcp"), no_dist=no_dist)
        set_model_state_dict(model, msd)
        return
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt / "dcp"), no_dist=no_dist)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_checkpoint(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    """Restore a verified checkpoint (:meth:`RunDir.find_checkpoint`): the weights, the optimizer and the RNGs;
    returns its whole state (the step and the trainer's parts). A sharded checkpoint loads into a model sharded
    over any number of ranks or whole; a whole one (model.safetensors) into a whole model."""
    bad = f"checkpoint {str(ckpt)!r} is corrupt or truncated"
    try:
        device = next(model.parameters()).device
        state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
        if sharded(ckpt):
            load_shards(ckpt, model, opt)
            missing = unexpected = []
        else:
            missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False, device=str(device))
            opt.load_state_dict(state["optimizer"])  # moves the optimizer state onto the parameters' device
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        set_rng_state(device, state.get("device_rng"))
    except Exception as e:  # any failure here means the files do not fit this run
        raise SpannormError(f"{bad} or does not match the run's config: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise SpannormError(f"{bad} or does not match the run's config: missing {missing}, unexpected {unexpected}")
    return state


def rng_states(model: torch.nn.Module, gen: torch.Generator) -> dict:
    """The RNG states a checkpoint saves: the data order's, torch's and the model's device's."""
    device = next(model.parameters()).device
    return {"data_rng": gen.get_state(), "torch_rng": torch.get_rng_state(), "device_rng": rng_state(device)}
