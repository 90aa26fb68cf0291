"""Coordinate checks: how the size of each role's activations, and of their change in training, follows the
width (or the depth) of the model under a parametrization (Yang et al., "Tensor Programs V", arXiv 2203.03466,
section 7: the coordinate check; CompleteP's own for depth, Dey et al. 2025, arXiv 2505.01618).

For each size, the same few Adam steps at one learning rate on the same batches, then on one fixed batch the RMS
of each role's activation a, and of its change a_t − a_0 since init:

    embedding   the first block's input x_0            attention   the blocks' attention outputs F
    ffn         the blocks' FFN outputs F              stream      the last block's output
    logits      the LM logits

The *exponent* of a role is the slope of log RMS(a_t − a_0) against log size, fitted over the sizes: 0 when the
update's effect on that coordinate does not grow or shrink with the size (µP's and CompleteP's promise), near 1
when it grows in proportion (standard parametrization under Adam: a fixed lr moves every one of fan_in inputs).
A branch's F is its own output, before CompleteP's multiplier 1/m_L: what each block learns (CompleteP's
"complete feature learning": Θ(1) at every depth), not its share of the stream.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .data import TokenData, prepare
from .model import build_model
from .model_config import ModelConfig, Parametrization
from .output import md_table
from .plotting import figure_legend, log_y, pyplot, save_figure
from .run_config import RunConfig, TrainConfig
from .train import make_optimizer

ROLES = ("embedding", "attention", "ffn", "stream", "logits")
AXES = {"width": "d_model", "depth": "n_layers"}
# a role is flat when its change grows or shrinks at most like size^FLAT over the sizes (µP's measured at widths
# 64-1024: within ±0.12; standard's branches: 1.8 to 3.4, docs/coord-check.md)
FLAT = 0.3
# the roles judged on each axis: every one in width; in depth the model's (a branch's own F is reported, not judged:
# at a finite depth its share of the update moves with L under every parametrization, docs/coord-check.md)
JUDGED = {"width": ROLES, "depth": ("embedding", "stream", "logits")}


def role_activations(model, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each role's activation of one forward of ``idx`` (the branches' stacked over the blocks)."""
    seen = {"attention": [], "ffn": []}

    def keep(role):  # the branch's own output, before a parametrization's multiplier
        return lambda module, inputs, out: seen[role].append(out / module.multiplier)

    hooks = [b.attn.register_forward_hook(keep("attention")) for b in model.blocks]
    hooks += [b.ffn.register_forward_hook(keep("ffn")) for b in model.blocks]
    try:
        x0 = model.embed_tokens(idx)
        stream = model.trunk(x0, model.rope(idx.shape[1], idx.device))
        logits = torch.nn.functional.linear(model.final(stream), model.head_weight)
    finally:
        for h in hooks:
            h.remove()
    return {
        "embedding": x0,
        "attention": torch.stack(seen["attention"]),
        "ffn": torch.stack(seen["ffn"]),
        "stream": stream,
        "logits": logits,
    }


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def measure(cfg: ModelConfig, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float, seed: int) -> dict:
    """For one model: the RMS of each role's activation at init and of its change after one Adam step per training
    batch (all but the first: the first batch is the fixed one measured)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    opt = make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0, warmup_steps=0))
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]
    fixed = batches[0][0]
    with torch.no_grad():
        start = role_activations(model, fixed)
    for x, y in batches[1:]:
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        now = role_activations(model, fixed)
    return {"start": {r: rms(start[r]) for r in ROLES}, "change": {r: rms(now[r] - start[r]) for r in ROLES}}


def exponent(sizes: list[int], values: list[float]) -> float:
    """The least-squares slope of log(value) against log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(values), 1)[0])


def coord_check(
    cfg: ModelConfig,
    axis: str,
    sizes: list[int],
    parametrizations: list[Parametrization],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    seeds: list[int],
) -> list[dict]:
    """One row per parametrization: ``cfg`` at each size of ``axis`` (width: d_model, n_heads kept; depth:
    n_layers), its base shape the smallest size; each role's change RMS per size after the last step (the mean
    over ``seeds``) and its exponent."""
    field = AXES[axis]
    base = {"width": {"base_width": min(sizes)}, "depth": {"base_depth": min(sizes)}}[axis]
    rows = []
    for parametrization in parametrizations:
        per_size = []
        for size in sizes:
            shaped = dataclasses.replace(cfg, **{field: size}, parametrization=parametrization, **base)
            runs = [measure(shaped, batches, lr, seed) for seed in seeds]
            per_size.append(
                {r: float(np.mean([run["change"][r] for run in runs])) for r in ROLES}
                | {f"{r} at init": float(np.mean([run["start"][r] for run in runs])) for r in ROLES}
            )
        rows.append(
            {
                "scheme": cfg.scheme.value,
                "parametrization": parametrization.value,
                "axis": axis,
                "sizes": sizes,
                "change": {r: [s[r] for s in per_size] for r in ROLES},
                "at_init": {r: [s[f"{r} at init"] for s in per_size] for r in ROLES},
                "exponent": {r: exponent(sizes, [s[r] for s in per_size]) for r in ROLES},
            }
        )
    return rows


def verdict(row: dict) -> str:
    """``flat`` if every judged role's exponent is within ±FLAT, else the roles that grow or shrink."""
    off = [f"{r} {row['exponent'][r]:+.2f}" for r in JUDGED[row["axis"]] if abs(row["exponent"][r]) > FLAT]
    return "flat" if not off else "drifts: " + ", ".join(off)


def coord_table(rows: list[dict]) -> str:
    """A Markdown table: per scheme and parametrization, each role's exponent and the verdict."""
    header = ["scheme", "parametrization", *(f"{r} exponent" for r in ROLES), "verdict"]
    body = [[r["scheme"], r["parametrization"], *(f"{r['exponent'][x]:+.2f}" for x in ROLES), verdict(r)] for r in rows]
    return md_table(header, body)


def plot_coord_check(rows: list[dict], out: Path) -> None:
    """One panel per scheme and role: the RMS of the role's change after the last step against the size, log-log,
    a line per parametrization."""
    plt = pyplot()
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, axes = plt.subplots(len(schemes), len(ROLES), figsize=(3.2 * len(ROLES), 2.6 * len(schemes)), squeeze=False)
    for row in rows:
        for ax, role in zip(axes[schemes.index(row["scheme"])], ROLES):
            ax.plot(row["sizes"], row["change"][role], marker="o", label=row["parametrization"])
            ax.set_xscale("log", base=2)
            ax.set_xticks(row["sizes"], [str(s) for s in row["sizes"]])
            ax.minorticks_off()
            ax.set_title(f"{row['scheme']}: {role}", fontsize=9)
            ax.set_xlabel("d_model" if row["axis"] == "width" else "L")
            ax.grid(alpha=0.3)
    for ax in axes.flat:
        log_y(ax)
    for ax in axes[:, 0]:
        ax.set_ylabel("RMS of the change")
    figure_legend(fig, axes)
    save_figure(fig, out, tight=True)


def run_coord_check(
    cfg: RunConfig,
    axis: str,
    sizes: list[int],
    schemes: list,
    parametrization: Parametrization,
    steps: int,
    lr: float,
    seeds: list[int],
    batch_size: int,
) -> list[dict]:
    """The coordinate check of every scheme under standard and ``parametrization``, on ``steps`` + 1 batches of
    ``batch_size`` sequences of the run's data (the first: the one measured), drawn with train.seed."""
    data = TokenData(prepare(cfg.data), cfg.train.seq_len)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    batches = [data.sample(gen, batch_size) for _ in range(steps + 1)]
    rows = []
    for scheme in schemes:
        model = dataclasses.replace(cfg.model, scheme=scheme)
        rows += coord_check(model, axis, sizes, [Parametrization.STANDARD, parametrization], batches, lr, seeds)
    return rows
