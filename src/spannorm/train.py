"""Training: run config, AdamW with warmup + cosine, checkpoints, resume, metrics.

A run is a directory::

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
                          moe                          MoE runs: per-layer expert load (see diagnostics.py)
    summary.json        written when the run ends: final validation loss, diverged (step, reason), stalled, tokens/s;
                        with train.guard: guard_skipped, guard_rollbacks, guard_lr_scale
    checkpoints/latest  name of the newest complete checkpoint directory
    checkpoints/step-N/ model.safetensors, state.pt (optimizer, RNG, step, divergence guard, training guard,
                        last validation loss), manifest.json (sha256); the newest train.keep_checkpoints of them
                        are kept, and a resume starts from the newest one whose files match their sha256
    .lock               held (flock) by the process that trains the run: a second one is refused

Every JSON file is strict JSON: a non-finite number (a NaN loss) is written as null.

The training guard (``train.guard``, off by default): a step whose loss or global gradient norm is not finite
is skipped (no update); ``guard_skip_limit`` skipped steps in a row, or a loss spike after warmup (a z-score
>= ``guard_spike_z`` over the last ``guard_window`` losses), roll the weights, optimizer and guard back to the
newest checkpoint (the initial weights if none) while the data keeps its place, so the batches consumed since
are not replayed; the learning rate is then multiplied by ``guard_lr_factor`` (for the rest of the run). After
``guard_max_rollbacks`` rollbacks, a skip streak makes the run diverged (a spike is left to the divergence
verdict). When it does not fire, the guard changes no number of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from .config import ConfigError, SpannormError, apply_overrides, coerce_enum, from_dict, read_yaml, require, to_dict
from .data import DataConfig, TokenData, prepare
from .device import DEVICE_FORMS, rng_state, set_rng_state, set_tf32, to_device, valid_device
from .device import autocast as device_autocast
from .device import resolve as resolve_device
from .files import atomic_dir, atomic_write_text, dumps, locked, os_error, read_json, read_jsonl, remove_dir, sweep_temp
from .model import LM, build_model
from .model_config import ModelConfig
from .probe import forward_stats, grad_norms, snapshot, taps, update_ratios


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
    threads: int | None = None  # torch intra-op threads; None: torch's default
    compile: bool = False  # torch.compile the training forward (probing steps and evaluation stay eager)
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

    def __post_init__(self):
        self.precision = coerce_enum(Precision, "train.precision", self.precision)
        for name in (
            "batch_size",
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
    if path.is_file() or path.suffix in (".yaml", ".yml"):
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


def load_run(run_dir: Path, flag: str = "--out") -> RunConfig:
    """The resolved config saved in a run directory (``flag``: the option that named it, for errors)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{flag} {str(run_dir)!r} holds no run{' to resume' if flag == '--out' else ''} (no config.yaml)"
        )
    return run_config_from_dict(read_yaml(path))


def same_experiment(a: RunConfig, b: RunConfig) -> bool:
    """Whether two configs describe the same run, wherever it trains: equal but for ``train.device``
    (a run, a compare or a study started on one device may resume on another)."""

    def key(cfg: RunConfig) -> dict:
        d = to_dict(cfg)
        d["train"] = {k: v for k, v in d["train"].items() if k != "device"}
        return d

    return key(a) == key(b)


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to lr·min_lr_ratio."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    low = t.lr * t.min_lr_ratio
    return low + 0.5 * (t.lr - low) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: LM, t: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)  # fused: one kernel per step


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(t: TrainConfig, device: torch.device):
    """bf16 autocast on ``device`` under ``precision=bf16``, else nothing."""
    return device_autocast(device, t.precision is Precision.BF16)


@torch.no_grad()
def evaluate(model: LM, data: TokenData, t: TrainConfig) -> float:
    model.eval()
    device = model_device(model)
    losses = []
    for batch in data.val_batches(t.batch_size, t.eval_batches):
        with autocast(t, device):
            losses.append(model(*to_device(batch, device))[1].item())
    model.train()
    return sum(losses) / len(losses)


def check_memory(cfg: RunConfig) -> None:
    """Refuse a run that cannot fit in this machine's memory, before anything is allocated. The estimate is a
    lower bound: the attention weights (4·d_model² a block) and the embedding, in fp32 with their gradients and
    AdamW's two moments (16 bytes a parameter), and the larger of one batch's block inputs and q, k, v
    (4·d_model values a token and block) and the validation pass's window starts (16 bytes each)."""
    m, t = cfg.model, cfg.train
    n_params = 4 * m.n_layers * m.d_model**2 + m.vocab_size * m.d_model
    width = 2 if t.precision is Precision.BF16 else 4
    need = 16 * n_params + t.batch_size * max(t.seq_len * m.n_layers * 4 * m.d_model * width, 16 * t.eval_batches)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram:
        raise ConfigError(
            f"the run needs more than {need / 2**30:,.0f} GiB of memory (over {n_params:,} parameters, "
            f"batches of {t.batch_size:,}×{t.seq_len:,} tokens, {t.eval_batches:,} validation batches), "
            f"more than this machine's {ram / 2**30:,.0f} GiB: make model.d_model, model.n_layers, "
            "train.batch_size, train.seq_len or train.eval_batches smaller"
        )


# --- checkpoints ---------------------------------------------------------------------------

CHECKPOINT = re.compile(r"step-(\d+)")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first (a symbolic link is none: it may lead out of the run)."""
    dirs = [
        p
        for p in (Path(run_dir) / "checkpoints").glob("step-*")
        if CHECKPOINT.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    ]
    return sorted(dirs, key=lambda p: int(p.name[5:]), reverse=True)


def save_checkpoint(
    run_dir: Path, step: int, model: LM, opt: torch.optim.Optimizer, gen: torch.Generator, keep: int, **extra
):
    """Write checkpoint ``step`` (``extra``: more state, e.g. the divergence guard's) and keep the newest ``keep``
    (newer ones than ``step`` are the damaged ones a resume fell back past: deleted). Optimizer tensors are
    saved where they live and loaded onto the device of the run that resumes (any device)."""
    ckpts = run_dir / "checkpoints"
    name = f"step-{step:07d}"
    if (ckpts / name).exists():  # a damaged one a resume fell back past
        remove_dir(ckpts / name)
    with atomic_dir(ckpts / name) as tmp:
        _save_weights(model, tmp / "model.safetensors")
        state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "data_rng": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "device_rng": rng_state(model_device(model)),
            **extra,
        }
        _save_state(state, tmp / "state.pt")
        manifest = {f: _digest(tmp / f) for f in ("model.safetensors", "state.pt")}
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest))
    atomic_write_text(ckpts / "latest", name)
    dirs = checkpoint_dirs(run_dir)
    for old in [d for d in dirs if int(d.name[5:]) > step] + [d for d in dirs if int(d.name[5:]) <= step][keep:]:
        remove_dir(old)


def _save_weights(model: LM, path: Path) -> None:
    """safetensors' save_model; an I/O error (a full disk) is raised as the OSError it is."""
    from safetensors import SafetensorError

    try:
        save_model(model, str(path))
    except SafetensorError as e:
        if (m := re.search(r"\(os error (\d+)\)", str(e))) is None:
            raise
        raise OSError(int(m[1]), os.strerror(int(m[1])), str(path)) from None


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
    files = ("model.safetensors", "state.pt")
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        digests = {f: manifest[f] for f in files}
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"cannot read manifest.json ({type(e).__name__})"
    for fname in files:
        if not (ckpt / fname).is_file() or _digest(ckpt / fname) != digests[fname]:
            return f"{fname} is missing or does not match its sha256"
    return None


def find_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run whose files verify (None if the run has none yet); a damaged newer one
    is reported on stderr and passed over; if every one is damaged, an error."""
    latest = Path(run_dir) / "checkpoints" / "latest"
    if latest.is_file() and not CHECKPOINT.fullmatch(name := latest.read_text(errors="replace").strip()):
        raise SpannormError(f"{str(latest)!r} names {name!r}, not a checkpoint directory of this run: refused")
    damaged = []
    for ckpt in checkpoint_dirs(run_dir):
        if (problem := damage(ckpt)) is None:
            for bad, why in damaged:
                print(
                    f"spannorm: warning: checkpoint {str(bad)!r} is corrupt or truncated ({why}); using {ckpt.name}",
                    file=sys.stderr,
                )
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        ckpt, why = damaged[0]
        older = f" (and the {len(damaged) - 1} older ones)" if len(damaged) > 1 else ""
        raise SpannormError(f"checkpoint {str(ckpt)!r}{older} is corrupt or truncated: {why}")
    return None


def load_checkpoint(ckpt: Path, model: LM, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    """Restore a verified checkpoint (:func:`find_checkpoint`); returns its state (step, guard, ...)."""
    bad = f"checkpoint {str(ckpt)!r} is corrupt or truncated"
    try:
        device = model_device(model)
        missing, unexpected = load_model(model, str(ckpt / "model.safetensors"), strict=False, device=str(device))
        state = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(state["optimizer"])  # moves the optimizer state onto the parameters' device
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        set_rng_state(device, state.get("device_rng"))
    except Exception as e:  # any failure here means the files do not fit this run
        raise SpannormError(f"{bad} or does not match the run's config: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise SpannormError(f"{bad} or does not match the run's config: missing {missing}, unexpected {unexpected}")
    return state


# --- the training guard --------------------------------------------------------------------


@dataclass
class GuardState:
    """The training guard's state (``train.guard``), saved in each checkpoint so that a resume is exact.
    ``skipped``, ``rollbacks`` and ``lr_scale`` count over the whole run; ``streak``, ``unlogged`` and
    ``window`` belong to the weights' trajectory: a rollback takes them back to the checkpoint's."""

    skipped: int = 0  # steps skipped (non-finite loss or gradient: no update)
    rollbacks: int = 0  # rollbacks made
    lr_scale: float = 1.0  # multiplies the learning rate schedule: guard_lr_factor ** rollbacks
    streak: int = 0  # skipped steps in a row, up to now
    unlogged: int = 0  # skipped steps since the last metrics row (its "skipped" key)
    window: list = field(default_factory=list)  # the losses of the last guard_window steps taken

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict | None) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, value)

    def rewind(self, state: dict | None) -> None:
        """Take the trajectory's part back to a checkpoint's state (None: the start of the run)."""
        saved = GuardState()
        saved.load_state_dict(state)
        self.streak, self.unlogged, self.window = 0, saved.unlogged, saved.window

    def spike(self, loss: float, t: TrainConfig) -> float | None:
        """The z-score of ``loss`` over the window if it is a spike (the window full, z >= guard_spike_z)."""
        w = self.window
        if t.guard_spike_z <= 0 or len(w) < t.guard_window:
            return None
        mean = sum(w) / len(w)
        std = math.sqrt(sum((x - mean) ** 2 for x in w) / len(w))
        z = (loss - mean) / std if std > 0 else 0.0
        return z if z >= t.guard_spike_z else None

    def keep(self, loss: float, t: TrainConfig) -> None:
        self.window = (self.window + [loss])[-t.guard_window :]


def initial_model(cfg: RunConfig) -> LM:
    """The run's initial weights: torch seeded with ``train.seed``, then the model built on the CPU (the same
    weights on every device)."""
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model)


def rewind(run_dir: Path, cfg: RunConfig, model: LM, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict:
    """Roll the weights, optimizer and torch RNG back to the newest checkpoint (to the initial weights if there
    is none) for the guard; the data generator keeps its place, so the batches consumed since are not replayed.
    Returns the checkpoint's state ({"step": 0} for the initial weights)."""
    data_rng = gen.get_state()
    if (ckpt := find_checkpoint(run_dir)) is not None:
        state = load_checkpoint(ckpt, model, opt, gen)
    else:  # as _train builds them
        model.load_state_dict(initial_model(cfg).state_dict())
        opt.state.clear()
        state = {"step": 0}
    gen.set_state(data_rng)
    return state


def truncate_rows(run_dir: Path, step: int, keep_guard: bool = False) -> None:
    """Forget the rows of metrics.jsonl and diagnostics.jsonl past ``step`` (``keep_guard``: not the guard's)."""
    for name in ("metrics.jsonl", "diagnostics.jsonl"):
        rows = [r for r in read_jsonl(run_dir / name) if r["step"] <= step or (keep_guard and "kind" in r)]
        atomic_write_text(run_dir / name, "".join(dumps(r) + "\n" for r in rows))


# --- the loop ------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl with a loss (the guard's interventions: :func:`read_interventions`)."""
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "kind" not in r]


def read_interventions(run_dir: Path) -> list[dict]:
    """The training guard's rows of metrics.jsonl: step, kind (skip or rollback), reason (, to_step)."""
    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "kind" in r]


def is_diverged(rows: list[dict]) -> bool:
    """A run diverged if a loss became non-finite or the last training loss is not below the first (a row of
    a step the guard skipped, null loss and a skipped count, is left out: the guard saved it)."""
    losses = [r["loss"] for r in rows if not (r.get("skipped") and r["loss"] is None)]
    if not losses:
        return False
    if not all(x is not None and math.isfinite(x) for x in losses):  # (a non-finite loss is stored as null)
        return True
    return len(losses) > 1 and losses[-1] >= losses[0]


NON_FINITE = "non-finite loss"
NON_FINITE_GRAD = "non-finite gradient"
ABOVE_INITIAL = "loss above its initial value after warmup"
PATIENCE = 5  # consecutive steps at or above the first loss (after warmup) that make a run diverged
STALL_MARGIN = 0.05  # nats: a final val loss within this of the unigram entropy means the run stalled


def log(f, row: dict) -> None:
    f.write(dumps(row) + "\n")
    f.flush()


class DeferredInterrupt:
    """Ctrl-C (SIGINT) while training: the step in flight finishes, the trainer writes a checkpoint and
    then raises KeyboardInterrupt (``requested`` tells it); a second Ctrl-C interrupts at once. Only in
    the main thread, where Python delivers signals; elsewhere nothing changes."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def train(
    cfg: RunConfig, run_dir: Path, *, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> dict:
    """Train (or with ``resume`` continue) the run in ``run_dir``; returns the summary.

    ``stop_after`` ends the session after that many total steps without finishing the run,
    as if it had been killed right after a checkpoint (used by tests).

    Denormal floats (below 1.2e-38) are flushed to zero in this thread (``torch.set_flush_denormal``):
    where gradients vanish (PostNorm, unscaled deep stacks) they are otherwise computed 10-20x
    slower by the CPU, and a run that cannot learn would take hours.
    """
    run_dir = Path(run_dir)
    t = cfg.train

    def ended() -> dict | None:
        if not resume and (run_dir / "config.yaml").exists():
            raise ConfigError(
                f"--out {str(run_dir)!r} already holds a run: pass --resume to continue it or choose another --out"
            )
        if resume and (run_dir / "summary.json").is_file():  # the run already ended
            return read_json(run_dir / "summary.json", "delete it and resume the run to write it again")
        return None

    if (summary := ended()) is not None:
        return summary
    if t.compile and cfg.model.moe:
        raise ConfigError(
            f"train.compile=true is not supported with MoE (model.n_experts={cfg.model.n_experts}): "
            "set train.compile=false"
        )
    device = resolve_device(t.device)
    check_memory(cfg)
    dataset = TokenData(prepare(cfg.data), t.seq_len)  # validates before any file is written
    with locked(run_dir, "--out"):
        if (summary := ended()) is not None:  # (again: another process may have got here first)
            return summary
        sweep_temp(run_dir, run_dir / "checkpoints")  # what kills left
        try:
            return _train(cfg, run_dir, dataset, device, resume, progress, stop_after)
        except OSError as e:  # a full disk, mostly: the last checkpoint is intact (each is written atomically)
            raise os_error(e, f"the run {str(run_dir)!r}", "free space, then continue it with --resume") from None


def _train(
    cfg: RunConfig,
    run_dir: Path,
    dataset: TokenData,
    device: torch.device,
    resume: bool,
    progress: bool,
    stop_after: int | None,
) -> dict:
    """The body of :func:`train`, under the run directory's lock."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if device.type == "cuda":
        set_tf32(t.tf32)
    torch.set_flush_denormal(True)
    model = initial_model(cfg).to(device)
    opt = make_optimizer(model, t)
    forward = torch.compile(model) if t.compile else model
    gen = torch.Generator().manual_seed(t.seed)
    step, first_loss, above, last_val = 0, None, 0, None  # first_loss, above: the divergence guard's state
    guard = GuardState()  # the training guard's (train.guard)
    if resume:
        if (ckpt := find_checkpoint(run_dir)) is not None:
            state = load_checkpoint(ckpt, model, opt, gen)
            step, last_val = int(state["step"]), state.get("last_val")
            first_loss, above = state.get("first_loss"), state.get("above", 0)
            if "first_loss" not in state and t.stop_on_divergence:  # a checkpoint from before the guard's was saved:
                with torch.no_grad(), autocast(t, device):  # the first step's loss, recomputed with the initial weights
                    first_batch = to_device(dataset.sample(torch.Generator().manual_seed(t.seed), t.batch_size), device)
                    first_loss = initial_model(cfg).to(device)(*first_batch)[1].item()
                torch.set_rng_state(state["torch_rng"])
            if "last_val" not in state and step == t.max_steps:  # (the same) the final validation, recomputed
                last_val = evaluate(model, dataset, t)
            guard.load_state_dict(state.get("guard"))
        truncate_rows(run_dir, step)  # forget rows past the checkpoint
    else:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_text(run_dir / "metrics.jsonl", "")
        atomic_write_text(run_dir / "diagnostics.jsonl", "")

    start_step, tokens_per_step = step, t.batch_size * t.seq_len
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=t.max_steps,
            initial=step,
            desc=f"{cfg.model.scheme.value}",
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=None,
        )  # None: off when not a terminal
    lines = progress and bar.disable  # not a terminal: a progress line at each validation instead of a bar
    metrics = open(run_dir / "metrics.jsonl", "a")
    diagnostics = open(run_dir / "diagnostics.jsonl", "a")
    train_time, window_time, window_tokens = 0.0, 0.0, 0
    diverged, reason = False, None
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    moe = cfg.model.moe
    model.train()

    def checkpoint():
        for f in (metrics, diagnostics):  # the rows up to the checkpoint are on disk before it
            os.fsync(f.fileno())
        save_checkpoint(
            run_dir,
            step,
            model,
            opt,
            gen,
            t.keep_checkpoints,
            first_loss=first_loss,
            above=above,
            last_val=last_val,
            **({"guard": guard.state_dict()} if t.guard else {}),
        )

    interrupt = DeferredInterrupt().__enter__()  # left in the finally below
    try:
        while step < t.max_steps and (stop_after is None or step < stop_after):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t) * guard.lr_scale  # (x * 1.0 is x: no change without a rollback)
            x, y = to_device(dataset.sample(gen, t.batch_size), device)
            probing = t.probe_interval > 0 and (step + 1) % t.probe_interval == 0
            with autocast(t, device), taps(model) if probing else contextlib.nullcontext() as rec:
                _, loss = (model if probing else forward)(x, y)  # the pure cross-entropy: what is logged
            (loss + model.moe_loss() if moe else loss).backward()
            moe_row = {}
            if moe:  # this step's auxiliary terms (unweighted means over layers) and the worst layer's imbalance
                aux, z = model.moe_terms()
                moe_row = {
                    "aux_loss": aux.item(),
                    "z_loss": z.item(),
                    "moe_imbalance": max(s["imbalance"] for s in model.moe_stats()),
                }
            if probing:  # before clipping: the raw per-block gradient norms
                row = {
                    "step": step + 1,
                    "grad_norm": [g["total"] for g in grad_norms(model)],
                    "stream_rms": [s.float().pow(2).mean().sqrt().item() for s in rec["stream"]],
                }
                row |= forward_stats(model, rec)
                if moe:
                    row["moe"] = model.moe_stats()
                before = snapshot(model)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
            loss_value = loss.item()
            skip = t.guard and not (math.isfinite(loss_value) and math.isfinite(grad_norm))
            if not skip:
                opt.step()
            if probing:
                row["update_ratio"] = update_ratios(model, before)
                diagnostics.write(dumps(row) + "\n")
                diagnostics.flush()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            train_time += dt
            window_time += dt
            window_tokens += tokens_per_step
            finite = math.isfinite(loss_value)
            first_loss = loss_value if first_loss is None and (finite or not t.guard) else first_loss
            if t.guard:
                why = None  # why the guard rolls back
                if skip:
                    guard.skipped += 1
                    guard.streak += 1
                    guard.unlogged += 1
                    log(
                        metrics, {"step": step, "kind": "skip", "reason": NON_FINITE if not finite else NON_FINITE_GRAD}
                    )
                    if guard.streak >= t.guard_skip_limit:
                        why = f"{guard.streak} skipped steps in a row"
                else:
                    guard.streak = 0
                    z = guard.spike(loss_value, t) if step > t.warmup_steps else None
                    if z is not None and guard.rollbacks < t.guard_max_rollbacks:
                        why = f"loss spike: z={z:.1f} over the last {t.guard_window} losses"
                    else:
                        guard.keep(loss_value, t)
                if why is not None and guard.rollbacks < t.guard_max_rollbacks:
                    guard.rollbacks += 1
                    guard.lr_scale *= t.guard_lr_factor
                    state = rewind(run_dir, cfg, model, opt, gen)
                    guard.rewind(state.get("guard"))
                    rolled_from, step = step, int(state["step"])
                    above, last_val = state.get("above", 0), state.get("last_val")
                    metrics.close()
                    diagnostics.close()
                    truncate_rows(run_dir, step, keep_guard=True)  # the rows of the abandoned steps
                    metrics = open(run_dir / "metrics.jsonl", "a")
                    diagnostics = open(run_dir / "diagnostics.jsonl", "a")
                    log(metrics, {"step": rolled_from, "kind": "rollback", "reason": why, "to_step": step})
                    if bar is not None:
                        bar.n = step
                    continue
                if why is not None:  # the rollbacks are spent: the run is diverged as without the guard
                    reason = f"{NON_FINITE if not finite else NON_FINITE_GRAD} ({why}; no rollback left)"
            if skip:
                pass  # the guard saved the step: no verdict on it
            elif not finite:
                reason = NON_FINITE
            elif t.stop_on_divergence and step > max(1, t.warmup_steps):
                above = above + 1 if loss_value >= first_loss else 0  # "stays above": one spike is not enough
                reason = ABOVE_INITIAL if above >= PATIENCE else None
            done = step == t.max_steps or reason is not None
            val = evaluate(model, dataset, t) if step % t.eval_interval == 0 or (done and reason is None) else None
            last_val = val if val is not None else last_val
            if step % t.log_interval == 0 or done or val is not None:
                row = {
                    "step": step,
                    "loss": loss_value,
                    "val_loss": val,
                    "lr": lr_at(step - 1, t) * guard.lr_scale,
                    "grad_norm": grad_norm,
                    "tokens_per_s": window_tokens / window_time,
                }
                row |= moe_row
                if guard.unlogged:
                    row["skipped"], guard.unlogged = guard.unlogged, 0
                log(metrics, row)
                window_time, window_tokens = 0.0, 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
            if reason is not None:
                diverged = True
                break
            if step % t.ckpt_interval == 0 or step == t.max_steps or interrupt.requested:
                checkpoint()
            if lines and val is not None:
                print(
                    f"{cfg.model.scheme.value}: step {step}/{t.max_steps}, loss {loss_value:.4f}, val loss {val:.4f}, "
                    f"{tokens_per_step / dt:,.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
            if interrupt.requested:
                print(
                    f"spannorm: interrupted at step {step}, checkpoint written: continue with "
                    f"spannorm train --out {run_dir} --resume",
                    file=sys.stderr,
                    flush=True,
                )
                raise KeyboardInterrupt
    finally:
        interrupt.__exit__(None, None, None)
        metrics.close()
        diagnostics.close()
        if bar is not None:
            bar.close()
    if step < t.max_steps and not diverged:
        return {"step": step, "finished": False}
    rows = read_metrics(run_dir)
    if not diverged and is_diverged(rows):
        reason = "last training loss not below the first"
    unigram = dataset.unigram_entropy()
    summary = {
        "scheme": cfg.model.scheme.value,
        "steps": step,
        "finished": True,
        "final_loss": rows[-1]["loss"] if rows else None,
        "final_val_loss": last_val if not diverged else None,
        "diverged": reason is not None,
        "diverged_step": step if diverged else None,
        "diverged_reason": reason,
        "unigram_entropy": unigram,
        "stalled": reason is None and last_val is not None and last_val >= unigram - STALL_MARGIN,
        "tokens_per_s": ((step - start_step) * tokens_per_step / train_time) if train_time else None,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    if t.guard:
        summary |= {
            "guard_skipped": guard.skipped,
            "guard_rollbacks": guard.rollbacks,
            "guard_lr_scale": guard.lr_scale,
        }
    atomic_write_text(run_dir / "summary.json", dumps(summary, indent=1))
    return summary
