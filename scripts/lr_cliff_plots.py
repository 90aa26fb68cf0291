"""Training diagnostics of one or more runs against the step, to see why a run stalls above a
learning-rate cliff: train loss, mean branch RMS (FFN solid, attention dashed), Adam update-to-weight
ratio per weight role (mean over blocks), attention entropy (mean over blocks; dotted: uniform causal),
logit RMS and embedding collapse (mean pairwise cosine). One color per run directory.

    .venv/bin/python scripts/lr_cliff_plots.py RUN_DIR [RUN_DIR ...] --out lr_cliff.png
"""

import argparse
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spannorm.io import read_jsonl  # noqa: E402

MARKERS = "os^vDx+*P"  # one per update_ratio role


def mean(values) -> float:
    """Mean over blocks (a number stays itself), skipping None (no such weight); NaN if nothing is left."""
    values = [v for v in (values if isinstance(values, list) else [values]) if v is not None]
    return statistics.fmean(values) if values else float("nan")


def plot_run(axes, run_dir: Path, color, roles: list[str]) -> None:
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    diag = [r for r in read_jsonl(run_dir / "diagnostics.jsonl") if "update_ratio" in r]  # older rows lack it
    label = run_dir.name
    axes["loss"].plot([r["step"] for r in metrics], [r["loss"] for r in metrics], color=color, label=label)
    if not diag:
        return
    steps = [r["step"] for r in diag]

    def series(key, reduce=lambda v: v):
        return [reduce(r[key]) for r in diag]

    axes["branch"].plot(steps, series("ffn_rms", mean), color=color, label=f"{label} ffn")
    axes["branch"].plot(steps, series("attn_rms", mean), "--", color=color, label=f"{label} attn")
    for role in diag[0]["update_ratio"]:
        ys = [mean(r["update_ratio"][role]) for r in diag]
        if role not in roles:
            roles.append(role)
        axes["update"].plot(steps, ys, color=color, marker=MARKERS[roles.index(role) % len(MARKERS)],
                            markersize=4, linewidth=0.8)
    axes["entropy"].plot(steps, series("attn_entropy", mean), color=color, label=label)
    axes["entropy"].plot(steps, series("attn_entropy_max"), ":", color=color)
    axes["logit"].plot(steps, series("logit_rms"), color=color, label=label)
    axes["embed"].plot(steps, series("embed_cos"), color=color, label=label)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl, diagnostics.jsonl)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args()

    fig, grid = plt.subplots(2, 3, figsize=(16, 8))
    titles = {"loss": "train loss", "branch": "branch RMS, mean over blocks (solid: FFN, dashed: attn)",
              "update": "update ‖ΔW‖/‖W‖ per role, mean over blocks", "entropy":
              "attention entropy (nats), mean over blocks (dotted: uniform)", "logit": "logit RMS",
              "embed": "embedding mean pairwise cosine"}
    axes = dict(zip(titles, grid.flat))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    roles: list[str] = []
    for i, run in enumerate(args.runs):
        plot_run(axes, run, colors[i % len(colors)], roles)
    for key, ax in axes.items():
        ax.set_title(titles[key], fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for key in ("branch", "update", "logit"):
        axes[key].set_yscale("log")
    axes["loss"].legend(fontsize=7)
    axes["update"].legend([plt.Line2D([], [], color="k", marker=MARKERS[i % len(MARKERS)], linewidth=0.8)
                           for i in range(len(roles))], roles, fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
