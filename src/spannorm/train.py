"""Training: AdamW with warmup + cosine, a loop over small stateful parts, checkpoints and resume.

The loop (:meth:`Trainer.fit`) reads like the algorithm, and a step (:meth:`Trainer.train_step`) is its math; each
part owns its state and saves it in every checkpoint (``state_dict`` / ``load_state_dict``), so a resume continues
exactly where a kill left the run. The parts (:class:`Part`) are called around each micro-batch's forward, before
and after the optimizer step, after each step, for each metrics row, for the summary and after a rollback; a new
monitor is one more ``Part`` (``train(..., parts=[...])``), with no edit to the loop:

    UnitWeights         nGPT: the matrices back on the unit sphere after each optimizer step (LM.normalize_weights)
    MoEStatistics       MoE runs: the step's aux and z losses and the worst layer's imbalance, in each metrics row
    TrainingGuard       train.guard (off by default): skips non-finite steps, rolls back on repeated skips or
                        a loss spike
    DivergenceMonitor   the divergence verdict: a non-finite loss, or the loss at or above the first step's
                        for PATIENCE steps in a row after warmup
    Throughput          tokens per second, of each logged interval and of the whole run
    Diagnostics         diagnostics.jsonl: every train.probe_interval steps, per-block measurements of the step
    Logs                metrics.jsonl and diagnostics.jsonl (appended; fsynced before each checkpoint)
    Progress            the progress bar on a terminal, a line per validation otherwise

The run directory (its config, logs, checkpoints, summary) is :class:`spannorm.run.RunDir`. Each step trains
on a global batch of batch_size × processes × train.grad_accum_steps sequences (several processes: torchrun
with train.distributed=ddp, :mod:`spannorm.distributed`; rank 0 alone writes the run directory).

The training guard (``train.guard``, off by default): a step whose loss or global gradient norm is not finite
is skipped (no update); ``guard.skip_limit`` skipped steps in a row, or a loss spike after warmup (a z-score
>= ``guard.spike_z`` over the last ``guard.window`` losses), roll the weights, optimizer and guard back to the
newest checkpoint (the initial weights if none) while the data keeps its place, so the batches consumed since
are not replayed; the learning rate is then multiplied by ``guard.lr_factor`` (for the rest of the run). After
``guard.max_rollbacks`` rollbacks, a skip streak makes the run diverged (a spike is left to the divergence
verdict). When it does not fire, the guard changes no number of the run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .checkpoint import load_checkpoint, rng_states, save_shards, sharded
from .config import ConfigError, dotted, to_dict
from .data import TokenData, prepare
from .data_config import absolute_corpus
from .device import autocast as device_autocast
from .device import resolve as resolve_device
from .device import set_tf32, slow_bf16_warning, to_device
from .distributed import Ranks
from .files import disk_full, dumps, os_error
from .model import LM, build_model
from .model_config import ModelConfig
from .parametrization import param_groups
from .probe import forward_stats, grad_norms, snapshot, taps, update_ratios
from .run import RunDir
from .run_config import Distributed, Precision, RunConfig, TrainConfig
from .schemes import SCHEMES
from .trackers import Tracker, check_trackers, make_trackers

NON_FINITE = "non-finite loss"
NON_FINITE_GRAD = "non-finite gradient"
ABOVE_INITIAL = "loss above its initial value after warmup"
NOT_BELOW_FIRST = "last training loss not below the first"
PATIENCE = 5  # consecutive steps at or above the first loss (after warmup) that make a run diverged
STALL_MARGIN = 0.05  # nats: a final val loss not at least this far below the unigram entropy: the run stalled


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to lr·min_lr_ratio."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    low = t.lr * t.min_lr_ratio
    return low + 0.5 * (t.lr - low) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: LM, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the parametrization's groups (``parametrization.param_groups``: decay on matrices only; under mup
    and completep each group's lr_scale, decay and ε of its rule)."""
    groups = param_groups(model, t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)  # fused: one kernel per step


def compiled_blocks(model: LM) -> LM:
    """The training forward of ``train.compile``: the same model (the same parameters) with each block compiled on
    its own, as torchtitan does. The blocks of a stack share their code, so inductor compiles one graph per block
    kind and reuses it at every depth, where compiling the whole model unrolls all L blocks (at L = 48, d_model 64:
    seconds instead of minutes, and 1.12× the eager step on one AVX2 core, docs/performance.md). The model itself
    stays eager: probing steps (their hooks) and evaluation use it."""
    fast = copy.copy(model)
    fast._modules = dict(model._modules)  # (a shallow copy shares the dict: the model's own blocks stay eager)
    fast.blocks = torch.nn.ModuleList(torch.compile(block) for block in model.blocks)
    return fast


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(t: TrainConfig, device: torch.device):
    """bf16 autocast on ``device`` under ``precision=bf16``, else nothing."""
    return device_autocast(device, t.precision is Precision.BF16)


@torch.no_grad()
def evaluate(model: LM, data: TokenData, t: TrainConfig, micro: int = 1, ranks: Ranks | None = None) -> float:
    """The mean validation loss over train.eval_batches global batches, each ``micro`` batches of batch_size
    (the micro-batches of all ranks): the same windows however the global batch is split. Each rank scores its
    share of the batches (batch i on rank i mod world; ``micro`` is a multiple of the world size, so every rank
    scores as many) and the ranks' means are averaged."""
    ranks = ranks or Ranks()
    model.eval()
    device = model_device(model)
    losses = []
    for i, batch in enumerate(data.val_batches(t.batch_size, t.eval_batches * micro)):
        if i % ranks.world == ranks.rank:
            with autocast(t, device):
                losses.append(model(*to_device(batch, device))[1].item())
    model.train()
    return ranks.mean(sum(losses) / len(losses))


def check_memory(
    cfg: RunConfig,
    what: str = "the run",
    knobs: str = "model.d_model, model.n_layers, train.batch_size or train.seq_len",
) -> None:
    """Refuse a run that cannot fit in this machine's memory, before anything is allocated. The estimate is a
    lower bound: the attention weights (4·d_model² a block) and the embedding, in fp32 with their gradients and
    AdamW's two moments (16 bytes a parameter), and one batch's block inputs and q, k, v (4·d_model values a token
    and block). Validation windows are drawn batch by batch (any train.eval_batches allocates one batch)."""
    m, t = cfg.model, cfg.train
    n_params = 4 * m.n_layers * m.d_model**2 + m.vocab_size * m.d_model
    width = 2 if t.precision is Precision.BF16 else 4
    need = 16 * n_params + t.batch_size * t.seq_len * m.n_layers * 4 * m.d_model * width
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram:
        raise ConfigError(
            f"{what} needs more than {need / 2**30:,.0f} GiB of memory (over {n_params:,} parameters, "
            f"batches of {t.batch_size:,}×{t.seq_len:,} tokens), more than this machine's {ram / 2**30:,.0f} GiB: "
            f"make {knobs} smaller"
        )


def initial_model(cfg: RunConfig, warm: bool = True) -> LM:
    """The run's initial weights: torch seeded with ``train.seed``, then the model built on the CPU (the same
    weights on every device); with ``train.init_from`` (and ``warm``), that run's or folder's weights instead."""
    torch.manual_seed(cfg.train.seed)
    lm = build_model(cfg.model)
    if warm and cfg.train.init_from is not None:
        warm_loader(cfg.model, Path(cfg.train.init_from).expanduser())(lm)
    return lm


# model fields that only initialize or weight the loss: a warm start may change them (its weights replace the init)
NOT_ARCHITECTURE = {"init", "init_std", "init_scale", "dyt.alpha0", "dyt.alpha0_attn", "dyt.alpha0_other"}
NOT_ARCHITECTURE |= {"moe.aux_coef", "moe.z_coef", "moe.capacity_factor"}


def warm_loader(model: ModelConfig, source: Path):
    """What loads into a model built from ``model`` the weights of ``source``: a run directory (its newest
    checkpoint that verifies) or a folder of ``spannorm export`` (model.safetensors). The two models must be the
    same architecture, or the refusal names the first field that differs (checked here, before any model takes them)."""
    what = f"train.init_from={str(source)!r}"
    if (source / "config.yaml").is_file():
        theirs, load = RunDir(source, "train.init_from").config().model, RunDir(source, "train.init_from").load_weights
    elif (source / "config.json").is_file():
        from .hf import folder_weights  # (here: spannorm.hf imports transformers, an optional dependency)

        theirs, weights = folder_weights(source, what)

        def load(lm: LM) -> None:
            lm.load_state_dict(weights)

    else:
        raise ConfigError(f"{what} is neither a run directory (config.yaml) nor an exported folder (config.json)")
    ours, other = dotted(to_dict(model)), dotted(to_dict(theirs))
    for key in ours:
        if key not in NOT_ARCHITECTURE and ours[key] != other.get(key):
            raise ConfigError(
                f"{what} is a model with model.{key}={other.get(key)!r}, this run's has {ours[key]!r}: a warm start "
                "takes the weights of the same architecture"
            )
    return load


def is_diverged(rows: list[dict]) -> bool:
    """A run diverged if a loss became non-finite or the last training loss is not below the first (a row of
    a step the guard skipped, null loss and a skipped count, is left out: the guard saved it)."""
    losses = [r["loss"] for r in rows if not (r.get("skipped") and r["loss"] is None)]
    if not losses:
        return False
    if not all(x is not None and math.isfinite(x) for x in losses):  # (a non-finite loss is stored as null)
        return True
    return len(losses) > 1 and losses[-1] >= losses[0]


# --- the trainer's parts -------------------------------------------------------------------


@dataclass
class Verdict:
    """What a part concludes after a step: roll the weights back (``rollback``: why), or end the run as diverged
    (``diverged``: why)."""

    rollback: str | None = None
    diverged: str | None = None


class Part:
    """A part of the trainer (a dataclass): its state is its fields, saved in every checkpoint under ``name``,
    and the loop calls it at fixed points. A new monitor is one subclass, passed in ``train(..., parts=[...])``;
    every hook has a default that does nothing.

        micro_batch(trainer, i)      before micro-batch i's forward: a context manager it runs in, or None
                                     (a part that enters one gets the eager model: it watches the forward)
        before_optimizer_step(trainer)  the gradients of the step are in, unclipped
        after_optimizer_step(trainer, skipped)  the weights are updated (skipped: the guard kept them)
        after_step(trainer, result)  each step, every part in order: a Verdict, or None to train on (the
                                     first part's verdict wins)
        metrics()                    keys for the next metrics.jsonl row
        summary(t)                   keys for summary.json
        rolled_back(saved, t)        the guard rolled the weights back to a checkpoint whose state of this part is
                                     ``saved`` (None: the start of the run); a run-wide count keeps its value
    """

    name: ClassVar[str]

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict | None) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, value)

    def micro_batch(self, trainer: Trainer, micro: int) -> contextlib.AbstractContextManager | None:
        return None

    def before_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def after_optimizer_step(self, trainer: Trainer, skipped: bool) -> None:
        pass

    def after_step(self, trainer: Trainer, result: StepResult) -> Verdict | None:
        return None

    def metrics(self) -> dict:
        return {}

    def summary(self, t: TrainConfig) -> dict:
        return {}

    def rolled_back(self, saved: dict | None, t: TrainConfig) -> None:
        pass


@dataclass
class DivergenceMonitor(Part):
    """The divergence verdict. A non-finite loss diverges the run at once; with ``train.stop_on_divergence``,
    so does a loss at or above the first step's for PATIENCE steps in a row after warmup (one spike is not
    enough). A step the guard skipped gets no verdict (the guard saved it)."""

    name: ClassVar[str] = "divergence"
    first_loss: float | None = None  # the reference: the first step's loss (the first finite one, with the guard)
    above: int = 0  # steps in a row at or above first_loss, up to now

    def after_step(self, trainer: Trainer, result: StepResult) -> Verdict | None:
        if self.first_loss is None and (math.isfinite(result.loss) or not trainer.t.guard.enabled):
            self.first_loss = result.loss
        if result.skipped:
            return None
        why = self.verdict(trainer.step, result.loss, trainer.t)
        return None if why is None else Verdict(diverged=why)

    def verdict(self, step: int, loss: float, t: TrainConfig) -> str | None:
        """Why the run diverged at ``step`` (None: it trains on)."""
        if not math.isfinite(loss):
            return NON_FINITE
        if t.stop_on_divergence and step > max(1, t.warmup_steps):
            self.above = self.above + 1 if loss >= self.first_loss else 0
            return ABOVE_INITIAL if self.above >= PATIENCE else None
        return None

    def rolled_back(self, saved: dict | None, t: TrainConfig) -> None:
        self.above = (saved or {}).get("above", 0)  # (first_loss is the run's: it stays)


@dataclass
class TrainingGuard(Part):
    """The training guard (``train.guard``). ``skipped``, ``rollbacks`` and ``lr_scale`` count over the whole
    run; ``streak``, ``unlogged`` and ``window`` belong to the weights' trajectory: a rollback takes them back
    to the checkpoint's. Off, it does nothing (a step is never skipped then)."""

    name: ClassVar[str] = "guard"
    skipped: int = 0  # steps skipped (non-finite loss or gradient: no update)
    rollbacks: int = 0  # rollbacks made
    lr_scale: float = 1.0  # multiplies the learning rate schedule: guard.lr_factor ** rollbacks
    streak: int = 0  # skipped steps in a row, up to now
    unlogged: int = 0  # skipped steps since the last metrics row (its "skipped" key)
    window: list = field(default_factory=list)  # the losses of the last guard.window steps taken

    def after_step(self, trainer: Trainer, result: StepResult) -> Verdict | None:
        t = trainer.t
        if not t.guard.enabled:
            return None
        why = self.judge(trainer.step, result.loss, result.skipped, t)
        if result.skipped:
            trainer.logs.write("metrics", {"step": trainer.step, "kind": "skip", "reason": skip_reason(result)})
        if why is None:
            return None
        if self.rollbacks < t.guard.max_rollbacks:
            return Verdict(rollback=why)
        return Verdict(diverged=f"{skip_reason(result)} ({why}; no rollback left)")  # (as without the guard)

    def judge(self, step: int, loss: float, skipped: bool, t: TrainConfig) -> str | None:
        """Account for the step just taken (or skipped); returns why the weights must roll back, if they must."""
        if skipped:
            self.skipped += 1
            self.streak += 1
            self.unlogged += 1
            return f"{self.streak} skipped steps in a row" if self.streak >= t.guard.skip_limit else None
        self.streak = 0
        z = self.spike(loss, t) if step > t.warmup_steps else None
        if z is not None and self.rollbacks < t.guard.max_rollbacks:
            return f"loss spike: z={z:.1f} over the last {t.guard.window} losses"
        self.window = (self.window + [loss])[-t.guard.window :]
        return None

    def spike(self, loss: float, t: TrainConfig) -> float | None:
        """The z-score of ``loss`` over the window if it is a spike (the window full, z >= guard.spike_z)."""
        w = self.window
        if t.guard.spike_z <= 0 or len(w) < t.guard.window:
            return None
        mean = sum(w) / len(w)
        std = math.sqrt(sum((x - mean) ** 2 for x in w) / len(w))
        z = (loss - mean) / std if std > 0 else 0.0
        return z if z >= t.guard.spike_z else None

    def rolled_back(self, state: dict | None, t: TrainConfig) -> None:
        """One rollback made, to a checkpoint whose guard state is ``state`` (None: the start of the run)."""
        self.rollbacks += 1
        self.lr_scale *= t.guard.lr_factor
        saved = TrainingGuard()
        saved.load_state_dict(state)
        self.streak, self.unlogged, self.window = 0, saved.unlogged, saved.window

    def metrics(self) -> dict:
        """The "skipped" key of the next metrics row (empty if no step was skipped since the last row)."""
        row = {"skipped": self.unlogged} if self.unlogged else {}
        self.unlogged = 0
        return row

    def summary(self, t: TrainConfig) -> dict:
        if not t.guard.enabled:
            return {}
        return {"guard_skipped": self.skipped, "guard_rollbacks": self.rollbacks, "guard_lr_scale": self.lr_scale}


@dataclass
class Throughput(Part):
    """Tokens per second: of the interval since the last metrics row, and of the whole run (timed steps)."""

    name: ClassVar[str] = "throughput"
    time: float = 0.0  # seconds spent in timed steps, over the run
    tokens: int = 0  # tokens of the timed steps, over the run
    interval_time: float = 0.0  # the same since the last metrics row
    interval_tokens: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        self.time += seconds
        self.tokens += tokens
        self.interval_time += seconds
        self.interval_tokens += tokens

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        self.add(result.seconds, trainer.tokens_per_step)

    def metrics(self) -> dict:
        """The tokens per second since the last row, which starts the next interval."""
        rate = self.interval_tokens / self.interval_time
        self.interval_time, self.interval_tokens = 0.0, 0
        return {"tokens_per_s": rate}

    def summary(self, t: TrainConfig) -> dict:
        return {"tokens_per_s": self.tokens / self.time if self.time else None}


@dataclass
class UnitWeights(Part):
    """Schemes that keep their matrices at unit norm (nGPT's ``unit_axes``): after each optimizer step that updated
    the weights, ``LM.normalize_weights`` puts them back; first among the parts, so that the others see the weights
    the next step uses. Nothing for the other schemes."""

    name: ClassVar[str] = "unit_weights"

    def after_optimizer_step(self, trainer: Trainer, skipped: bool) -> None:
        if not skipped:
            trainer.model.normalize_weights()


@dataclass
class MoEStatistics(Part):
    """MoE runs: each metrics row's aux_loss and z_loss (this step's, unweighted means over the MoE layers) and
    moe_imbalance (the worst layer's)."""

    name: ClassVar[str] = "moe"

    def __post_init__(self):
        self.row: dict = {}  # (the step's: not state)

    def before_optimizer_step(self, trainer: Trainer) -> None:
        self.row = {}
        if trainer.cfg.model.moe.enabled:
            aux, z = trainer.model.moe_terms()
            worst = max(s["imbalance"] for s in trainer.model.moe_stats())
            self.row = {"aux_loss": aux.item(), "z_loss": z.item(), "moe_imbalance": worst}

    def metrics(self) -> dict:
        return self.row


@dataclass
class Diagnostics(Part):
    """diagnostics.jsonl: every ``train.probe_interval`` steps, one row of per-block measurements of the step (its
    first micro-batch's forward, its gradients before clipping, the update it made; the keys: spannorm.run)."""

    name: ClassVar[str] = "diagnostics"

    def __post_init__(self):
        self.rec = self.row = self.before = None  # (the step's: not state)

    def probing(self, trainer: Trainer) -> bool:
        t = trainer.t
        return t.probe_interval > 0 and (trainer.step + 1) % t.probe_interval == 0

    def micro_batch(self, trainer: Trainer, micro: int) -> contextlib.AbstractContextManager | None:
        return self.tapped(trainer.model) if micro == 0 and self.probing(trainer) else None

    @contextlib.contextmanager
    def tapped(self, model: LM):
        with taps(model) as rec:
            yield
        self.rec = rec

    def before_optimizer_step(self, trainer: Trainer) -> None:
        if (rec := self.rec) is None:
            return
        model = trainer.model
        self.row = {
            "step": trainer.step + 1,
            "grad_norm": [g["total"] for g in grad_norms(model)],
            "stream_rms": [s.float().pow(2).mean().sqrt().item() for s in rec["stream"]],
        }
        self.row |= forward_stats(model, rec)
        if trainer.cfg.model.moe.enabled:
            self.row["moe"] = model.moe_stats()
        self.before = snapshot(model)

    def after_optimizer_step(self, trainer: Trainer, skipped: bool) -> None:
        if self.rec is None:
            return
        self.row["update_ratio"] = update_ratios(trainer.model, self.before)
        trainer.logs.write("diagnostics", self.row)  # (rank 0's)
        self.rec = self.row = self.before = None


class Logs:
    """metrics.jsonl and diagnostics.jsonl, open for appending while the trainer runs, and the experiment
    trackers (``train.trackers``) that mirror their rows (the files stay the record)."""

    def __init__(self, run: RunDir, cfg: RunConfig, enabled: bool = True, quiet: bool = False):
        self.run, self.cfg, self.enabled = run, cfg, enabled  # enabled: rank 0 (the others write nothing)
        self.quiet = quiet  # the trackers print nothing (no progress display: --quiet)
        self.files: dict = {}
        self.trackers = Tracker()  # (no tracker outside a session)

    @contextlib.contextmanager
    def session(self, step: int):
        """The logs open for a training session that starts at ``step``."""
        if not self.enabled:
            yield self
            return
        self.trackers = make_trackers(
            self.cfg.train.trackers,
            self.run.path,
            to_dict(self.cfg),
            start_step=step,
            quiet=self.quiet,
            run_id=self.run.run_id(),  # (W&B: a resumed session continues the run's W&B run)
        )
        self._open()
        try:
            yield self
        finally:
            self._close()
            self.trackers.close()

    def _open(self) -> None:
        self.files = {"metrics": open(self.run.metrics_file, "a"), "diagnostics": open(self.run.diagnostics_file, "a")}

    def _close(self) -> None:
        for f in self.files.values():
            f.close()

    def write(self, name: str, row: dict) -> None:
        """Append ``row`` to ``name`` (metrics or diagnostics) and show it to the trackers (not the guard's rows)."""
        if not self.enabled:
            return
        f = self.files[name]
        f.write(dumps(row) + "\n")
        f.flush()
        if name == "diagnostics":
            self.trackers.log_diagnostics(row)
        elif "kind" not in row:
            self.trackers.log_metrics(row)

    def sync(self) -> None:
        """The rows written so far are on disk (before a checkpoint that counts on them)."""
        for f in self.files.values():
            os.fsync(f.fileno())

    def truncate(self, step: int) -> None:
        """Forget the rows past ``step`` but the guard's (the steps a rollback abandoned)."""
        if not self.enabled:
            return
        self._close()
        self.run.truncate_logs(step, keep_guard=True)
        self._open()
        self.trackers.rewind(step)


class Progress:
    """The progress bar on a terminal; elsewhere (a log file, a pipe) a line on stderr at each validation."""

    def __init__(self, enabled: bool, name: str, step: int, total: int):
        self.name, self.total = name, total
        self.bar = tqdm(  # disable=None: off when stderr is not a terminal
            total=total,
            initial=step,
            desc=name,
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=None if enabled else True,
        )
        self.lines = enabled and self.bar.disable

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def update(self, step: int, loss: float, val: float | None, tokens_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(step - self.bar.n)  # (back, after a rollback)
        if self.lines and val is not None:
            print(
                f"{self.name}: step {step}/{self.total}, loss {loss:.4f}, val loss {val:.4f}, "
                f"{tokens_per_s:,.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )


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


# --- the trainer ---------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float  # the pure cross-entropy (what is logged)
    grad_norm: float  # the global gradient norm before clipping
    skipped: bool  # the guard skipped the update (a non-finite loss or gradient)
    seconds: float = 0.0  # the step's wall time (set by the loop)
    interrupted: bool = False  # several ranks: a Ctrl-C reached one of them before the loss was averaged


def placed(model: LM, t: TrainConfig, ranks: Ranks) -> tuple[torch.nn.Module, bool]:
    """How the trainer runs ``model``: (its training forward, whether its weights are sharded). Under torchrun,
    FSDP2 shards each block's weights over the ranks, then the rest (in place), or DDP wraps the forward (the same
    initial weights everywhere, gradients averaged); ``train.compile`` compiles each block."""
    sharded = ranks.joined and t.distributed is Distributed.FSDP
    if sharded and SCHEMES[model.cfg.scheme].unit_axes:
        raise ConfigError(
            f"train.distributed=fsdp is invalid with model.scheme={model.cfg.scheme.value}: its weights are normalized "
            "along whole rows and columns after each step, which FSDP shards; use ddp or none"
        )
    if sharded:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    forward = compiled_blocks(model) if t.compile else model
    if ranks.joined and not sharded:
        forward = DistributedDataParallel(forward)
    return forward, sharded


class Trainer:
    """Trains one run: the model, AdamW, the data order and the parts above, in ``run``'s directory."""

    # long: one run's life cycle (the loop, a step's math, the state it checkpoints, restores and rolls back) reads
    # as one; what can stand alone already does (the parts, Logs, Progress, the checkpoint format)

    def __init__(
        self,
        cfg: RunConfig,
        run: RunDir,
        dataset: TokenData,
        device: torch.device,
        progress: bool,
        ranks: Ranks,
        resume: bool = False,
        parts: list[Part] = (),
    ):
        t = self.t = cfg.train
        self.cfg, self.run, self.dataset, self.device, self.ranks = cfg, run, dataset, device, ranks
        self.model = initial_model(cfg, warm=not resume).to(device)  # (a resume loads its checkpoint instead)
        self.forward, self.sharded = placed(self.model, t, ranks)
        self.opt = make_optimizer(self.model, t)  # (after sharding: over each rank's shards)
        self.accum = t.grad_accum_steps  # micro-batches per step here: the global batch is batch_size × ranks × accum
        self.gen = torch.Generator().manual_seed(t.seed)  # the data order
        self.step = 0
        self.last_val = None  # the newest validation loss
        self.guard, self.divergence, self.throughput = TrainingGuard(), DivergenceMonitor(), Throughput()
        builtin = [UnitWeights(), MoEStatistics(), self.guard, self.divergence, self.throughput, Diagnostics()]
        self.parts: list[Part] = [*builtin, *parts]
        if len({p.name for p in self.parts}) < len(self.parts):
            raise ConfigError(f"the trainer's parts need distinct names: {[p.name for p in self.parts]}")
        self.logs = Logs(run, cfg, ranks.main, quiet=not progress)
        self.show_progress = progress and ranks.main

    @property
    def tokens_per_step(self) -> int:
        """The global batch's tokens."""
        return self.t.batch_size * self.t.seq_len * self.accum * self.ranks.world

    def begin(self, dataset: Path, resume: bool) -> None:
        """A new run: its directory started (``dataset``: what it trains on); a resumed one: at its newest
        checkpoint (none yet: at step 0), its logs' rows past it forgotten."""
        if not resume and self.ranks.main:
            self.run.start(self.cfg, dataset)
        elif resume:
            if (ckpt := self.run.find_checkpoint()) is not None:
                self.restore(ckpt)
            if self.ranks.main:
                self.run.truncate_logs(self.step)
        self.ranks.barrier()

    # state

    def state_dict(self) -> dict:
        """The checkpoint's state besides the weights (and, sharded, the optimizer's: in the shards)."""
        return {
            **({} if self.sharded else {"optimizer": self.opt.state_dict()}),
            **rng_states(self.model, self.gen),
            "last_val": self.last_val,
            **{part.name: part.state_dict() for part in self.parts},
            "ranks": self.ranks.world,
            "micro_batches": self.accum * self.ranks.world,  # a step's global batch, kept by every resume
        }

    def restore(self, ckpt: Path) -> dict:
        """Load a checkpoint into the model, the optimizer, the RNGs and the parts; returns its state."""
        state = self.load(ckpt)
        self.step, self.last_val = int(state["step"]), state.get("last_val")
        for part in self.parts:
            part.load_state_dict(part_state(state, part))
        # the global batch of the saved run (micro-batches of batch_size; checkpoints before micro_batches was
        # recorded: grad_accum_steps in each of its processes, which a resume on other processes did not keep) ...
        self.accum = state.get("micro_batches", self.t.grad_accum_steps * state.get("ranks", 1))
        if self.accum % self.ranks.world:
            raise ConfigError(
                f"the run's steps are {self.accum} micro-batches of train.batch_size (saved by {state.get('ranks', 1)} "
                f"processes): resume it with a number of processes that divides {self.accum}, so that its global "
                "batch stays the same"
            )
        self.accum //= self.ranks.world  # ... kept with this number of processes
        return state

    def load(self, ckpt: Path) -> dict:
        """The weights, optimizer and RNGs of a checkpoint; returns its state. A whole checkpoint (of one
        process or DDP) goes into a sharded model through a whole copy, whose state every rank then shards."""
        if not self.sharded or sharded(ckpt):
            return load_checkpoint(ckpt, self.model, self.opt, self.gen)
        whole = initial_model(self.cfg, warm=False)  # (the checkpoint's weights replace them)
        whole_opt = make_optimizer(whole, self.t)
        state = load_checkpoint(ckpt, whole, whole_opt, self.gen)
        model_state, opt_state = get_state_dict(whole, whole_opt)
        full = StateDictOptions(full_state_dict=True)
        set_state_dict(self.model, self.opt, model_state_dict=model_state, optim_state_dict=opt_state, options=full)
        return state

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint (DDP: the other ranks hold the same weights, optimizer state and RNGs);
        sharded, every rank writes its shards into rank 0's temporary directory of it."""

        def write_shards(tmp: Path | None) -> None:
            save_shards(self.ranks.share(tmp) / "dcp", self.model, self.opt)

        if self.ranks.main:
            self.logs.sync()  # the rows up to the checkpoint are on disk before it
            write = write_shards if self.sharded else None
            self.run.save_checkpoint(self.step, self.model, self.state_dict(), self.t.keep_checkpoints, write)
        elif self.sharded:
            write_shards(None)
        self.ranks.barrier()  # (a rollback on any rank reads it)

    # the loop

    def fit(self, stop_after: int | None = None) -> dict:
        """Train until ``train.max_steps`` or divergence (``stop_after``: end the session after that many
        total steps, as if killed right after a checkpoint); returns the summary, or {"step", "finished":
        False} for a session that ended early."""
        t = self.t
        self.model.train()
        progress = Progress(self.show_progress, self.cfg.model.scheme.value, self.step, t.max_steps)
        with DeferredInterrupt() as interrupt, self.logs.session(self.step), progress:
            while self.step < t.max_steps and (stop_after is None or self.step < stop_after):
                t0 = time.perf_counter()
                result = self.train_step(lambda: interrupt.requested)
                self.step += 1
                result.seconds = seconds = time.perf_counter() - t0
                rollback, divergence = self.judge(result)
                if rollback is not None:
                    self.roll_back(rollback)
                    progress.update(self.step, result.loss, None, self.tokens_per_step / seconds)
                    continue
                done = self.step == t.max_steps or divergence is not None
                val = None
                if self.step % t.eval_interval == 0 or (done and divergence is None):
                    micro = self.accum * self.ranks.world
                    val = self.last_val = evaluate(self.model, self.dataset, t, micro, self.ranks)
                if self.step % t.log_interval == 0 or done or val is not None:
                    self.logs.write("metrics", self.metrics_row(result, val))
                progress.update(self.step, result.loss, val, self.tokens_per_step / seconds)
                if divergence is not None:
                    summary = self.summary(divergence)
                    if self.ranks.share(interrupt.requested):  # (a Ctrl-C while the summary was written)
                        raise KeyboardInterrupt
                    return summary
                # every rank stops at the same step: several ranks agreed in the step's one all-reduce
                interrupted = result.interrupted if self.ranks.world > 1 else interrupt.requested
                if self.step % t.ckpt_interval == 0 or self.step == t.max_steps or interrupted:
                    self.checkpoint()
                    interrupted = self.ranks.share(interrupt.requested)  # (also a Ctrl-C while it was written)
                if interrupted and self.ranks.main:
                    print(
                        f"spannorm: interrupted at step {self.step}, checkpoint written: continue with "
                        f"spannorm train --out {self.run} --resume",
                        file=sys.stderr,
                        flush=True,
                    )
                if interrupted:
                    raise KeyboardInterrupt
        if self.step < t.max_steps:
            return {"step": self.step, "finished": False}
        return self.summary(None)

    def judge(self, result: StepResult) -> tuple[str | None, str | None]:
        """After a step, every part in order: (why the weights roll back, why the run diverged), each None if
        not; the first part's verdict wins."""
        verdicts = [part.after_step(self, result) for part in self.parts]
        first = next((v for v in verdicts if v is not None), Verdict())
        return first.rollback, first.diverged

    def train_step(self, interrupt_requested=lambda: False) -> StepResult:
        """One optimizer step on the next batch: its math, with the parts' hooks around it. Several ranks
        average the loss and learn whether a Ctrl-C reached any of them (``interrupt_requested``) in one all-reduce,
        the step's only collective besides the gradients'."""
        t, model = self.t, self.model
        for group in self.opt.param_groups:
            # (x * 1.0 is x: no change without a rollback, nor under standard; checkpoints before lr_scale lack it)
            group["lr"] = lr_at(self.step, t) * self.guard.lr_scale * group.get("lr_scale", 1.0)
        # every rank draws the same global batch and trains on its rows, in accum micro-batches of batch_size
        x, y = self.dataset.sample(self.gen, t.batch_size * self.accum * self.ranks.world)
        rows = self.ranks.rows(len(x))
        x, y = to_device((x[rows], y[rows]), self.device)
        losses = []
        for micro in range(self.accum):
            part = slice(micro * t.batch_size, (micro + 1) * t.batch_size)
            watched = [c for p in self.parts if (c := p.micro_batch(self, micro)) is not None]
            last = micro == self.accum - 1  # DDP averages the gradients over the ranks after the last one
            if self.sharded:
                model.set_requires_gradient_sync(last)
            with (
                autocast(t, self.device),
                contextlib.ExitStack() as stack,
                contextlib.nullcontext() if last or not self.ranks.joined or self.sharded else self.forward.no_sync(),
            ):
                for context in watched:
                    stack.enter_context(context)
                _, loss = (self.forward if not watched or self.ranks.joined else model)(x[part], y[part])
            ((loss + model.moe_loss() if self.cfg.model.moe.enabled else loss) / self.accum).backward()
            losses.append(loss.detach())
        loss = torch.stack(losses).mean()
        for p in self.parts:
            p.before_optimizer_step(self)
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item()
        # (the gradients, averaged by DDP, are the same on every rank)
        loss_value, interrupted = self.ranks.mean_and_any(loss.item(), interrupt_requested())
        skipped = t.guard.enabled and not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if not skipped:
            self.opt.step()
        for p in self.parts:
            p.after_optimizer_step(self, skipped)
        self.opt.zero_grad(set_to_none=True)
        return StepResult(loss_value, grad_norm, skipped, interrupted=interrupted)

    def roll_back(self, why: str) -> None:
        """The guard's rollback: the weights, optimizer and torch RNG back to the newest checkpoint (the initial
        weights if there is none) while the data keeps its place, so the batches consumed since are not replayed;
        the rows of the abandoned steps are forgotten."""
        rolled_from, data_rng = self.step, self.gen.get_state()
        if (ckpt := self.run.find_checkpoint()) is not None:
            state = self.load(ckpt)
        else:  # as the trainer built them
            initial = initial_model(self.cfg).state_dict()
            if self.sharded:
                set_model_state_dict(self.model, initial, options=StateDictOptions(full_state_dict=True))
            else:
                self.model.load_state_dict(initial)
            self.opt.state.clear()
            state = {"step": 0}
        self.gen.set_state(data_rng)
        for part in self.parts:
            part.rolled_back(part_state(state, part), self.t)
        self.step, self.last_val = int(state["step"]), state.get("last_val")
        self.logs.truncate(self.step)
        self.logs.write("metrics", {"step": rolled_from, "kind": "rollback", "reason": why, "to_step": self.step})

    def metrics_row(self, result: StepResult, val: float | None) -> dict:
        return {
            "step": self.step,
            "loss": result.loss,
            "val_loss": val,
            "lr": lr_at(self.step - 1, self.t) * self.guard.lr_scale,
            "grad_norm": result.grad_norm,
            **{key: value for part in self.parts for key, value in part.metrics().items()},
        }

    def summary(self, divergence: str | None) -> dict:
        """The summary of the ended run, written to summary.json by rank 0 and returned on every rank
        (``divergence``: why it stopped early)."""
        return self.ranks.share(self.write_summary(divergence) if self.ranks.main else None)

    def write_summary(self, divergence: str | None) -> dict:
        rows = self.run.metrics()
        diverged_early = divergence is not None
        if not diverged_early and is_diverged(rows):
            divergence = NOT_BELOW_FIRST
        unigram = self.dataset.unigram_entropy()
        last_val = None if diverged_early else self.last_val
        summary = {
            "scheme": self.cfg.model.scheme.value,
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,  # (the global batch: every rank, every micro-batch)
            "finished": True,
            "final_loss": rows[-1]["loss"] if rows else None,
            "final_val_loss": last_val,
            "diverged": divergence is not None,
            "diverged_step": self.step if diverged_early else None,
            "diverged_reason": divergence,
            "unigram_entropy": unigram,
            "stalled": divergence is None and last_val is not None and last_val >= unigram - STALL_MARGIN,
            "n_params": sum(p.numel() for p in self.model.parameters()),
        }
        for part in self.parts:
            summary |= part.summary(self.t)
        self.run.write_summary(summary)
        return summary


def part_state(state: dict, part: Part) -> dict | None:
    """A part's state in a checkpoint's (checkpoints written before the parts had names keep the divergence
    state at the top level)."""
    if part.name == DivergenceMonitor.name and part.name not in state:
        return {"first_loss": state.get("first_loss"), "above": state.get("above", 0)}
    return state.get(part.name)


def diverged_at(summary: dict) -> str:
    """How a summary's run diverged: at step N (it stopped there), or by its end (its last loss was not below
    its first: summary.json's diverged_step is null, no step stopped it)."""
    step = summary.get("diverged_step")
    return f"diverged at step {step}" if step is not None else "diverged by its end"


def skip_reason(result: StepResult) -> str:
    return NON_FINITE if not math.isfinite(result.loss) else NON_FINITE_GRAD


def train(
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    cli: bool = False,
    parts: list[Part] = (),
) -> dict:
    """Train (or with ``resume`` continue) the run in ``run_dir``; returns the summary.

    ``parts``: more parts of the trainer (:class:`Part`: a monitor, a callback), after the built-in ones; a resume
    must pass the same (their state is in the checkpoints).

    ``stop_after`` ends the session after that many total steps, as if killed right after a checkpoint (tests);
    ``cli``: errors name the command line's options (--out, --resume), not this function's arguments.
    """
    out = "--out" if cli else "run_dir"
    if not str(run_dir).strip():  # (Path("") is the current directory)
        raise ConfigError(f"{out} '' is invalid: expected the path of a run directory")
    run = RunDir(run_dir, out)
    if not resume:  # (a relative corpus is recorded where it is: a resume from elsewhere reads the same text)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus=absolute_corpus(cfg.data.corpus)))
    t = cfg.train

    if (summary := ended_summary(run, resume, cli)) is not None:
        return summary
    device = preflight(cfg, resume)
    ranks = distributed.start(t, device)
    if ranks.joined and device.type == "cuda":
        device = torch.device(ranks.device)  # (torchrun: one GPU a process, cuda:LOCAL_RANK)
    # validates before any file is written; a resume reads the data the run was trained on, or refuses
    data_dir = run.dataset(cfg) if resume else prepare(cfg.data)
    dataset = TokenData(data_dir, t.seq_len)
    dataset.check_val(t.batch_size, t.eval_batches)
    with run.lock() if ranks.main else contextlib.nullcontext():  # (rank 0 writes the run directory)
        summary = ended_summary(run, resume, cli)  # (again: another process may have got here first)
        ranks.barrier()  # (every rank has looked before rank 0 writes)
        if summary is not None:
            return summary
        try:
            if t.threads:
                torch.set_num_threads(t.threads)
            if device.type == "cuda":
                set_tf32(t.tf32)
            # denormal floats (below 1.2e-38) flushed to zero in this thread: where gradients vanish (PostNorm,
            # unscaled deep stacks) the CPU computes them 10-20x slower, and a run that cannot learn takes hours
            torch.set_flush_denormal(True)
            trainer = Trainer(cfg, run, dataset, device, progress, ranks, resume, parts)
            trainer.begin(data_dir, resume)
            summary = trainer.fit(stop_after)
            del trainer  # (its DDP wrapper is freed while the process group still exists)
            distributed.stop(together=True)
            return summary
        except OSError as e:  # a full disk, mostly: the last checkpoint is intact (each is written atomically)
            fix = "free space, then continue it with --resume" if disk_full(e) else ""
            raise os_error(e, f"the run {str(run)!r}", fix) from None
        finally:
            distributed.stop()  # (after an error: at once, no barrier; torchrun ends the other ranks)


def ended_summary(run: RunDir, resume: bool, cli: bool) -> dict | None:
    """The summary of a resumed run that has ended (None: it goes on); a new run where one is, refused (``cli``:
    the error names the command line's options)."""
    out, again = ("--out", "--resume") if cli else ("run_dir", "resume=True")
    if not resume and run.has_run():
        raise ConfigError(
            f"{out} {str(run)!r} already holds a run: pass {again} to continue it or choose another {out}"
        )
    return run.summary() if resume else None


def preflight(cfg: RunConfig, resume: bool) -> torch.device:
    """The checks a run passes before its directory is written (each a one-line error); returns its device."""
    t = cfg.train
    if t.compile and cfg.model.moe.enabled:
        raise ConfigError(
            f"train.compile=true is not supported with MoE (model.moe.n_experts={cfg.model.moe.n_experts}): "
            "set train.compile=false"
        )
    check_trackers(t.trackers, t.wandb_mode)  # (a missing package)
    if t.init_from is not None and not resume:
        warm_loader(cfg.model, Path(t.init_from).expanduser())  # (its checks)
    device = resolve_device(t.device)
    if t.precision is Precision.BF16 and (warning := slow_bf16_warning(device, "train.precision=bf16")):
        print(warning, file=sys.stderr)
    check_memory(cfg)
    return device


def train_or_reuse(cfg: RunConfig, run_dir: Path, progress: bool, what: str) -> dict:
    """Train a run, resume it if it was interrupted, or reuse it if it ended; a directory that holds a run of
    another config is refused (``what`` names it). The summary says ``reused`` for a run that had ended."""
    run = RunDir(run_dir)
    if not run.has_run():
        return train(cfg, run_dir, progress=progress, cli=True)
    run.check_config(cfg, what)
    reused = run.summary_file.is_file()
    return train(cfg, run_dir, resume=True, progress=progress, cli=True) | {"reused": reused}
