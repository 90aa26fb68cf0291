"""The probe command: probe fresh models or a run's checkpoint, and report the measurements.

``run_probe`` builds the models (or loads a checkpoint, as a resume would) and measures each with
``probe.probe``; ``probe_table`` and ``plot_probe`` report them; ``read_diagnostics`` and
``plot_heatmaps`` show the per-step diagnostics the trainer logged. It sits above the trainer (it
reads run directories); the measurements themselves (``probe``) sit below it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .config import SpannormError
from .data import TokenData, prepare
from .device import resolve, to_device
from .model import LM, build_model
from .model_config import Scheme
from .output import md_table, num
from .plotting import figure_legend, integer_ticks, log_y, panel_grid, pyplot, save_figure
from .probe import layer_drop, probe
from .run import RunDir
from .run_config import RunConfig


def load_checkpoint_model(run_dir) -> tuple[LM, RunConfig]:
    """The model of a run directory, with the weights of its newest checkpoint that verifies against its
    sha256 manifest (as a resume would load), and its RunConfig."""
    run = RunDir(run_dir, "--checkpoint")
    cfg = run.config()
    model = build_model(cfg.model)
    ckpt = run.load_weights(model)
    if not all(p.isfinite().all() for p in model.parameters()):
        raise SpannormError(f"--checkpoint {str(run_dir)!r}: {ckpt.name} holds non-finite weights")
    return model, cfg


def run_probe(
    cfg: RunConfig | None,
    schemes: list[Scheme],
    depths: list[int],
    batch_size: int,
    checkpoint=None,
    device: str | None = None,
) -> list[dict]:
    """Probe fresh models (every scheme × depth, built from ``cfg`` with seed cfg.train.seed) or one
    checkpoint; the batch is the first validation batch of the run's data. ``device``: a device
    setting (auto, cpu, cuda, cuda:N); default the config's ``train.device``."""
    if checkpoint is not None:
        model, cfg = load_checkpoint_model(checkpoint)
    # a bad device setting or a missing GPU is said before any model is built
    device = resolve(device or cfg.train.device, "--device" if device else "train.device")
    if checkpoint is not None:
        models = [model]
    else:
        models = []
        for scheme in schemes:
            for depth in depths:
                torch.manual_seed(cfg.train.seed)
                models.append(build_model(dataclasses.replace(cfg.model, scheme=scheme, n_layers=depth)))
    data = TokenData(prepare(cfg.data), cfg.train.seq_len)
    batches = [to_device(b, device) for b in data.val_batches(batch_size, cfg.train.eval_batches)]
    runs = []
    for model in models:
        model.to(device)
        row = probe(model, *batches[0])
        if checkpoint is not None:
            row["layer_drop"] = layer_drop(model, batches)
            # the closed forms assume unit norm gains, true only at init
            row["stream_rms_theory"] = row["skip_gain_theory"] = None
        runs.append(row)
    return runs


def probe_table(runs: list[dict]) -> str:
    """A Markdown table of the headline numbers of each probed model."""
    header = [
        "scheme",
        "L",
        "final stream RMS",
        "stream RMS theory",
        "grad ratio first/last",
        "skip gain",
        "skip gain theory",
        "full gain",
    ]
    rows = []
    for r in runs:
        theory_rms = r["stream_rms_theory"][-1] if r["stream_rms_theory"] else None
        numbers = [
            r["stream_rms"][-1],
            theory_rms,
            r["grad_ratio_first_last"],
            r["skip_gain_measured"],
            r["skip_gain_theory"],
            r["full_gain_measured"],
        ]
        rows.append([r["scheme"], str(r["depth"])] + [num(x, ".4g") for x in numbers])
    return md_table(header, rows)


def plot_probe(runs: list[dict], out: Path) -> None:
    """Per-block curves: stream RMS (theory dashed, drawn over the measured line), gradient norm, adjacent-block
    cosine; each quantity on its y axis, one legend beside the figure, whole-numbered block axes."""
    plt = pyplot()
    panels = [
        ("stream_rms", "residual stream RMS", "RMS after block l (dashed: theory)", True),
        ("grad_norm", "gradient norm per block", "‖∂loss/∂W‖ of block l", True),
        ("adjacent_cosine", "adjacent-block similarity", "cosine(block l, block l+1)", False),
    ]
    fig, axes = panel_grid(plt, len(panels), 5, 4)
    for ax, (key, title, ylabel, log) in zip(axes.flat, panels):
        for run in runs:
            blocks = range(1, len(run[key]) + 1)
            marker = "o" if len(blocks) < 4 else None  # (at L = 2 there is one cosine: a line alone shows nothing)
            ax.plot(blocks, run[key], marker=marker, label=f"{run['scheme']} L={run['depth']}")
            if key == "stream_rms" and run.get("stream_rms_theory"):  # black, over the measured lines
                ax.plot(blocks, run["stream_rms_theory"], "k--", linewidth=1, zorder=3, label="theory (dashed)")
        ax.set_title(title)
        ax.set_xlabel("block l")
        ax.set_ylabel(ylabel)
        integer_ticks(ax.xaxis)
        if log:
            log_y(ax)
        ax.grid(alpha=0.3)
    figure_legend(fig, axes)
    save_figure(fig, out, tight=True)


def read_diagnostics(run_dir) -> list[dict]:
    """The rows the trainer logged to diagnostics.jsonl (see the module docstring of ``train``)."""
    return RunDir(run_dir, "--checkpoint").diagnostics()


def plot_heatmaps(rows: list[dict], out: Path) -> None:
    """Layer × training-step heatmaps of log10 gradient norm and stream RMS."""
    plt = pyplot()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key in zip(axes, ("grad_norm", "stream_rms")):
        grid = np.log10(np.maximum(np.array([r[key] for r in rows], dtype=float).T, 1e-30))
        im = ax.imshow(grid, aspect="auto", origin="lower", extent=(steps[0], steps[-1], 0.5, grid.shape[0] + 0.5))
        ax.set_title(f"log10 {key}")
        ax.set_xlabel("step")
        ax.set_ylabel("block")
        integer_ticks(ax.yaxis)
        fig.colorbar(im, ax=ax, label=f"log10 {key}")
    save_figure(fig, out)
