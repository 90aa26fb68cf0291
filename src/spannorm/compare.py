"""``spannorm compare``: train several schemes under one config and report them side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from .config import ConfigError, to_dict
from .files import atomic_write_bytes, atomic_write_text
from .model_config import Scheme
from .train import RunConfig, load_run, read_metrics, same_experiment, train

COLUMNS = ("scheme", "final val loss", "diverged", "tokens/s", "steps", "params")


def run_scheme(cfg: RunConfig, run_dir: Path, progress: bool) -> dict:
    """Train one cell, reusing a finished run or resuming an interrupted one with the same config."""
    if (run_dir / "config.yaml").is_file():
        if not same_experiment(load_run(run_dir), cfg):
            raise ConfigError(
                f"--out {str(run_dir.parent)!r} holds a {run_dir.name!r} run with another config: choose another --out"
            )
        finished = (run_dir / "summary.json").is_file()
        return train(cfg, run_dir, resume=True, progress=progress) | {"reused": finished}
    return train(cfg, run_dir, progress=progress)


def table(rows: list[dict]) -> str:
    """A Markdown table of the summaries."""

    def fmt(s: dict) -> list[str]:
        val = s["final_val_loss"]
        return [
            s["scheme"],
            "—" if val is None else f"{val:.4f}",
            "yes" if s["diverged"] else "no",
            f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "—",
            str(s["steps"]),
            f"{s['n_params']:,}",
        ]

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(s)) + " |" for s in rows]
    return "\n".join(lines)


def plot(out: Path, runs: dict[str, list[dict]]) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for scheme, rows in runs.items():
        ax_train.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=scheme)
        val = [r for r in rows if r["val_loss"] is not None]
        ax_val.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label=scheme)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def compare(
    base: RunConfig, schemes: list[Scheme], out: Path, command: str, progress: bool = True, log=print
) -> list[dict]:
    """Train ``base`` once per scheme into ``out/<scheme>``; write report.md and loss_curves.png."""
    out = Path(out)
    summaries, curves = [], {}
    for scheme in schemes:
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, scheme=scheme))
        log(f"[{scheme.value}] training into {out / scheme.value}")
        summary = run_scheme(cfg, out / scheme.value, progress)
        log(
            f"[{scheme.value}] {'reused finished run' if summary.get('reused') else 'done'}: "
            f"val loss {summary['final_val_loss']}, diverged {summary['diverged']}"
        )
        summaries.append(summary)
        curves[scheme.value] = read_metrics(out / scheme.value)
    plot(out / "loss_curves.png", curves)
    t = base.train
    report = "\n".join(
        [
            "# spannorm compare",
            "",
            f"Command: `{command}`",
            "",
            f"Every scheme trains the same model size, data and seed: {t.max_steps} steps of "
            f"{t.batch_size}×{t.seq_len} tokens ({t.max_steps * t.batch_size * t.seq_len:,} tokens), "
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
    return summaries
