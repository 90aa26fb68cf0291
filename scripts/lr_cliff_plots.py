"""Training diagnostics of one or more runs against the step, to see why a run stalls above a
learning-rate cliff: train loss, mean branch RMS (FFN solid, attention dashed), Adam update-to-weight
ratio per weight role (mean over blocks), attention entropy (mean over blocks; dotted: uniform causal),
logit RMS and embedding collapse (mean pairwise cosine). One color per run directory.

    .venv/bin/python scripts/lr_cliff_plots.py RUN_DIR [RUN_DIR ...] --out lr_cliff.png [--table]

``--table`` also prints, per run, a Markdown table at a few steps of what enters SpanNorm's N_2: the
FFN branch as it is added to the skip (s·f; s·f/rms(f) under model.span.scale=norm) relative to the block input,
σ_l² = rms(s·f_l)² / rms(x_l)², and the skip-path gain it predicts, ∏_l (1 + σ_l²)^(-1/2) (SPANNORM.md).
"""

import argparse
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spannorm.files import read_jsonl  # noqa: E402
from spannorm.run import load_run  # noqa: E402
from spannorm.schemes import SCHEMES  # noqa: E402

MARKERS = "os^vDx+*P"  # one per update_ratio role


def mean(values) -> float:
    """Mean over blocks (a number stays itself), skipping None (no such weight); NaN if nothing is left."""
    values = [v for v in (values if isinstance(values, list) else [values]) if v is not None]
    return statistics.fmean(values) if values else float("nan")


def plot_run(axes, run_dir: Path, color, roles: list[str]) -> None:
    metrics = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "kind" not in r]  # not the guard's rows
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
        axes["update"].plot(
            steps, ys, color=color, marker=MARKERS[roles.index(role) % len(MARKERS)], markersize=4, linewidth=0.8
        )
    axes["entropy"].plot(steps, series("attn_entropy", mean), color=color, label=label)
    axes["entropy"].plot(steps, series("attn_entropy_max"), ":", color=color)
    axes["logit"].plot(steps, series("logit_rms"), color=color, label=label)
    axes["embed"].plot(steps, series("embed_cos"), color=color, label=label)


def branch_variances(block, row: dict) -> list[float] | None:
    """σ_l² of each SpanNorm block in one diagnostics row (None for other schemes; ``block``: one block
    of the run's scheme): the FFN branch as it enters N_2, relative to the block input (the embedding
    norm's output, RMS ≈ 1, for block 0)."""
    if not hasattr(block, "entering_rms"):
        return None
    inputs = [1.0] + row["stream_rms"][:-1]
    return [(block.entering_rms(f) / x) ** 2 for f, x in zip(row["ffn_rms"], inputs)]


TABLE_STEPS = (8, 32, 64, 128, 256)


def table(run_dir: Path) -> str:
    """A Markdown table of the run at TABLE_STEPS (the nearest diagnostics row at or before each)."""
    diag = [r for r in read_jsonl(run_dir / "diagnostics.jsonl") if "update_ratio" in r]
    loss = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "kind" not in r}
    model = load_run(run_dir).model
    block = SCHEMES[model.scheme](model, 0)  # s and the branch norm are the same in every block
    lines = [
        f"{run_dir.name}:",
        "",
        "| step | train loss | Σ_l σ_l² | max σ_l² | skip-path gain | ‖ΔW‖/‖W‖ ffn.down / ffn.up "
        "| attn.out / attn.qk | attention entropy | embedding cosine |",
        "|" + "---|" * 9,
    ]
    picked = {max((r["step"] for r in diag if r["step"] <= want), default=None) for want in TABLE_STEPS}
    for r in (r for r in diag if r["step"] in picked):
        var = branch_variances(block, r)
        gain = math.exp(-0.5 * sum(math.log1p(v) for v in var)) if var else None
        ur = r["update_ratio"]
        near = min(loss, key=lambda k: abs(k - r["step"]), default=None)
        cells = [
            str(r["step"]),
            f"{loss[near]:.3f}" if near is not None else "—",
            f"{sum(var):.2f}" if var else "—",
            f"{max(var):.3f}" if var else "—",
            f"{gain:.1e}" if gain is not None else "—",
            f"{mean(ur['ffn.down']) / mean(ur['ffn.up']):.1f}",
            f"{mean(ur['attn.out']) / mean(ur['attn.qk']):.1f}",
            f"{mean(r['attn_entropy']):.2f} of {r['attn_entropy_max']:.2f}",
            f"{r['embed_cos']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl, diagnostics.jsonl)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--table", action="store_true", help="also print a Markdown table per run (see above)")
    args = ap.parse_args()

    fig, grid = plt.subplots(2, 3, figsize=(16, 8))
    titles = {
        "loss": "train loss",
        "branch": "branch RMS, mean over blocks (solid: FFN, dashed: attn)",
        "update": "update ‖ΔW‖/‖W‖ per role, mean over blocks",
        "entropy": "attention entropy (nats), mean over blocks (dotted: uniform)",
        "logit": "logit RMS",
        "embed": "embedding mean pairwise cosine",
    }
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
    axes["update"].legend(
        [plt.Line2D([], [], color="k", marker=MARKERS[i % len(MARKERS)], linewidth=0.8) for i in range(len(roles))],
        roles,
        fontsize=7,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    if args.table:
        for run in args.runs:
            print("\n" + table(run))


if __name__ == "__main__":
    main()
