"""``spannorm compare``: train several schemes under one config and report them side by side."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from .config import to_dict
from .files import atomic_write_text
from .model_config import Scheme
from .output import md_table, num
from .plotting import figure_legend, panel_grid, pyplot, save_figure, unigram_line
from .run import read_metrics
from .run_config import Distributed, RunConfig
from .train import train_or_reuse
from .webpage import html_report

COLUMNS = ("scheme", "final val loss", "diverged", "tokens/s", "steps", "params")


def table(rows: list[dict]) -> str:
    """A Markdown table of the summaries."""

    def cells(s: dict) -> list[str]:
        return [
            s["scheme"],
            num(s["final_val_loss"], ".4f"),
            "yes" if s["diverged"] else "no",
            num(s.get("tokens_per_s") or None, ",.0f"),
            str(s["steps"]),
            f"{s['n_params']:,}",
        ]

    return md_table(list(COLUMNS), [cells(s) for s in rows])


def plot(out: Path, runs: dict[str, list[dict]], unigram: float | None = None) -> None:
    """Training and validation loss against the step, one colour per scheme, on one y scale, with the unigram
    line (where a stalled run ends)."""
    fig, axes = panel_grid(pyplot(), 2, 5.5, 4, sharey=True)
    ax_train, ax_val = axes[0]
    for i, (scheme, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"
        ax_train.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, label=scheme)
        val = [r for r in rows if r["val_loss"] is not None]
        ax_val.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", color=color, label=scheme)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        unigram_line(ax, unigram)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    figure_legend(fig, axes)
    save_figure(fig, out, dpi=110, tight=True)


def budget(t) -> str:
    """The tokens a run of TrainConfig ``t`` trains on, in words: every step's global batch is batch_size sequences
    × grad_accum_steps micro-batches × the processes torchrun started."""
    processes = int(os.environ.get("WORLD_SIZE", "1")) if t.distributed is not Distributed.NONE else 1
    sequences = t.batch_size * t.grad_accum_steps * processes
    parts = [f"batch_size {t.batch_size}"]
    parts += [f"{t.grad_accum_steps} micro-batches"] if t.grad_accum_steps > 1 else []
    parts += [f"{processes} processes"] if processes > 1 else []
    how = f" ({' × '.join(parts)})" if len(parts) > 1 else ""
    return (
        f"{t.max_steps} steps of {sequences}×{t.seq_len} tokens{how} ({t.max_steps * sequences * t.seq_len:,} tokens)"
    )


def compare(
    base: RunConfig, schemes: list[Scheme], out: Path, command: str, progress: bool = True, log=print
) -> list[dict]:
    """Train ``base`` once per scheme into ``out/<scheme>``; write report.md, report.html and loss_curves.png."""
    out = Path(out)
    summaries, curves = [], {}
    for scheme in schemes:
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, scheme=scheme))
        log(f"[{scheme.value}] training into {out / scheme.value}")
        summary = train_or_reuse(
            cfg, out / scheme.value, progress, what=f"--out {str(out)!r} holds a {scheme.value!r} run"
        )
        log(
            f"[{scheme.value}] {'reused finished run' if summary.get('reused') else 'done'}: "
            f"val loss {summary['final_val_loss']}, diverged {summary['diverged']}"
        )
        summaries.append(summary)
        curves[scheme.value] = read_metrics(out / scheme.value)
    unigram = next((s["unigram_entropy"] for s in summaries if s.get("unigram_entropy") is not None), None)
    plot(out / "loss_curves.png", curves, unigram)
    t = base.train
    report = "\n".join(
        [
            "# spannorm compare",
            "",
            f"Command: `{command}`",
            "",
            f"Every scheme trains the same model size, data and seed: {budget(t)}, "
            f"lr {t.lr:g}, {t.precision.value}. *Diverged*: a loss became non-finite, or (with "
            "train.stop_on_divergence) was at or above the first step's loss after warmup, which stops the run, or the "
            "last training loss is not below the first. tokens/s is training throughput on this machine.",
            "",
            table(summaries),
            "",
            "![loss curves](loss_curves.png)",
            "",
            "## Config (scheme varied)",
            "",
            "```yaml",
            yaml.safe_dump(to_dict(base), sort_keys=False).rstrip(),
            "```",
            "",
        ]
    )
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "report.html", html_report(report, out, "spannorm compare"))
    return summaries
