"""A run's config: the model, the data and the training (:class:`RunConfig`), loaded from a preset or YAML file with
``--set`` overrides, and whether two configs describe the same experiment."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .config import ConfigError, apply_overrides, coerce_enum, from_dict, read_yaml, require, to_dict
from .data import DataConfig, absolute_corpus
from .device import DEVICE_FORMS, valid_device
from .model_config import ModelConfig

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
