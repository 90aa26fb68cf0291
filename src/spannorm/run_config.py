"""A run's config: the model, the data and the training (:class:`RunConfig`), loaded from a preset or YAML file with
``--set`` overrides, and whether two configs describe the same experiment."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .config import (
    BOOL,
    DEVICE_FORMS,
    POSITIVE_INT,
    POSITIVE_NUMBER,
    Bound,
    ConfigError,
    apply_overrides,
    check_bounds,
    coerce_enum,
    from_dict,
    int_at_least,
    moved_keywords,
    number_in,
    option,
    read_yaml,
    require,
    to_dict,
    upgrade_config,
    valid_device,
)
from .data_config import DataConfig, absolute_corpus
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
class GuardConfig:
    """``train.guard``: the training guard (``spannorm.train.TrainingGuard``), off unless enabled."""

    enabled: bool = option(
        False, "skip non-finite steps, roll back on repeated skips or a loss spike (off by default)", BOOL
    )
    skip_limit: int = option(3, "skipped (non-finite) steps in a row that make the guard roll back", int_at_least(1))
    spike_z: float = option(
        6.0,
        "a loss this many standard deviations above the window's mean rolls back; 0: off",
        Bound(lambda v: math.isfinite(v) and v >= 0, "a number >= 0 (0: no spike check)"),
    )
    window: int = option(
        50,
        "the losses (of steps taken) the spike's z-score is computed over; checked once full",
        int_at_least(2),
    )
    lr_factor: float = option(
        1.0,
        "each rollback multiplies the learning rate (from then on) by this, in (0, 1]",
        Bound(lambda v: 0 < v <= 1, "a number in (0, 1]"),
    )
    max_rollbacks: int = option(
        3, "rollbacks allowed in the run; then a skip streak makes the run diverged", int_at_least(0)
    )

    def __post_init__(self):
        check_bounds(self, "train.guard")


@moved_keywords("train")
@dataclass
class TrainConfig:
    """Optimization and bookkeeping: each field with its doc and its bound (spannorm config show prints them)."""

    seed: int = option(1337, "seeds the init and the data order", Bound(valid_seed, SEED_RANGE))
    batch_size: int = option(16, "sequences per step", POSITIVE_INT)
    seq_len: int = option(128, "tokens per sequence", POSITIVE_INT)
    max_steps: int = option(500, "optimizer steps in the run", POSITIVE_INT)
    lr: float = option(3e-3, "peak learning rate", POSITIVE_NUMBER)
    min_lr_ratio: float = option(
        0.1, "final learning rate as a fraction of lr (cosine decay)", number_in("[0, 1]", 0, 1)
    )
    warmup_steps: int = option(50, "linear warmup steps", int_at_least(0))
    weight_decay: float = option(
        0.1, "AdamW decoupled weight decay, on weight matrices only", Bound(lambda v: v >= 0, "a number >= 0")
    )
    beta1: float = option(0.9, "AdamW beta1", number_in("[0, 1)", 0, 1, high_open=True))
    beta2: float = option(0.95, "AdamW beta2", number_in("[0, 1)", 0, 1, high_open=True))
    grad_clip: float = option(
        1.0,
        "clip the global gradient norm to this value; 0 disables",
        Bound(lambda v: v >= 0, "a number >= 0 (0 disables clipping)"),
    )
    precision: Precision = option(Precision.FP32, "fp32 or bf16 (autocast)")
    device: str = option(
        "auto", "auto (CUDA when available, else CPU), cpu, cuda or cuda:N", Bound(valid_device, DEVICE_FORMS)
    )
    tf32: bool = option(False, "CUDA: fp32 matmuls in TF32 (faster, ~1e-3 relative error); fp32 means fp32 by default")
    log_interval: int = option(10, "steps between metrics rows", POSITIVE_INT)
    eval_interval: int = option(100, "steps between validation passes (and one at the end)", POSITIVE_INT)
    eval_batches: int = option(8, "validation batches per pass", POSITIVE_INT)
    ckpt_interval: int = option(100, "steps between checkpoints (and one at the end)", POSITIVE_INT)
    threads: int | None = option(
        None,
        "torch intra-op threads; None: the CLI's fit (spannorm.threads), the API's torch default",
        Bound(lambda v: v is None or v > 0, "a positive integer or null"),
    )
    compile: bool = option(False, "torch.compile each block of the training forward (probing steps, evaluation: eager)")
    probe_interval: int = option(
        50,
        "steps between rows of diagnostics.jsonl (per-block training diagnostics); 0: off",
        Bound(lambda v: v >= 0, "an integer >= 0 (0: off)"),
    )
    stop_on_divergence: bool = option(
        True,
        "after warmup, stop when the loss stays >= the first step's for 5 steps; a non-finite loss always stops "
        "(unless train.guard saves it)",
        BOOL,
    )
    keep_checkpoints: int = option(
        2,
        "the newest checkpoints kept (>= 2: a resume falls back to the previous one if the newest is damaged)",
        Bound(lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    )
    guard: GuardConfig = option(
        doc="training guard: skip non-finite steps, roll back on repeated skips or a loss spike", factory=GuardConfig
    )
    trackers: list[str] = option(
        doc="experiment trackers that mirror the logs: tensorboard, wandb",
        bound=Bound(lambda v: all(name in TRACKERS for name in v), f"a list of {', '.join(TRACKERS)}"),
        factory=list,
    )
    wandb_mode: str = option(
        "offline",
        "wandb's: offline (RUN_DIR/wandb, `wandb sync` later), online (needs a login), disabled",
        Bound(lambda v: v in WANDB_MODES, " or ".join(WANDB_MODES)),
    )
    wandb_project: str = option(
        "spannorm",
        "the W&B project (online: of your default entity, or WANDB_ENTITY's)",
        Bound(
            lambda v: isinstance(v, str) and 0 < len(v) <= 128 and not set(v) & set(WANDB_FORBIDDEN),
            f"a name of 1 to 128 characters without any of {WANDB_FORBIDDEN}",
        ),
    )
    grad_accum_steps: int = option(1, "micro-batches of batch_size per optimizer step, in each process", POSITIVE_INT)
    distributed: Distributed = option(
        Distributed.NONE,
        "under torchrun: none, ddp (every rank holds the model; the global batch: batch_size × ranks × accum) or "
        "fsdp (FSDP2: weights, gradients and optimizer state sharded over the ranks)",
    )
    dist_timeout_s: float = option(
        1800.0,
        "under torchrun: how long a rank waits for the others at a collective before the job fails (a hung rank)",
        Bound(
            lambda v: isinstance(v, (int, float)) and 0 < v <= MAX_DIST_TIMEOUT_S,
            f"a positive number of seconds, at most {MAX_DIST_TIMEOUT_S:,} (30 days)",
        ),
    )
    init_from: str | None = option(
        None,
        "a run directory or a spannorm export folder: a new run starts from its weights",
        Bound(
            lambda v: v is None or (isinstance(v, str) and v != ""),
            "a run directory, a spannorm export folder, or null",
        ),
    )

    def __post_init__(self):
        self.precision = coerce_enum(Precision, "train.precision", self.precision)
        self.distributed = coerce_enum(Distributed, "train.distributed", self.distributed)
        if not isinstance(self.guard, GuardConfig):  # (given as a mapping: its fields)
            self.guard = from_dict(GuardConfig, self.guard, "train.guard")
        check_bounds(self, "train")


@dataclass
class RunConfig:
    model: ModelConfig = option(doc="the model (vocab_size comes from data)", factory=ModelConfig)
    data: DataConfig = option(doc="corpus and tokenizer", factory=DataConfig)
    train: TrainConfig = option(doc="optimization and bookkeeping", factory=TrainConfig)


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
    """Validate a nested dict into a RunConfig (old flat keys read: :func:`upgrade_config`); model.vocab_size is
    derived from the tokenizer."""
    data = upgrade_config(data)
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
    """Load a preset or YAML file and apply ``section.key=value`` overrides (either with the old flat keys, or both)."""
    return run_config_from_dict(read_config_mapping(config, overrides))


def read_config_mapping(config: str | Path, overrides: list[str] = ()) -> dict:
    """The mapping of a preset or YAML file, upgraded (:func:`upgrade_config`), with ``overrides`` applied."""
    return apply_overrides(upgrade_config(read_yaml(resolve_config_path(str(config)))), list(overrides))


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
